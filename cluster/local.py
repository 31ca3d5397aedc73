"""The embedded local cluster: Ray head + MLflow server + S3-compatible store (moto), all on 127.0.0.1.

    python -m cluster.local up       # idempotent; writes var/cluster/env (source it, or jobs read it)
    python -m cluster.local status
    python -m cluster.local down     # stops exactly what `up` started (process groups + descendants)

Ray listens on every interface whatever it is told, so the head runs with token authentication
(RAY_AUTH_MODE=token, a generated token in var/cluster/ray_token, mode 0600); `ray job submit`
needs RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH from the env file.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path

from cluster.procs import descendants, free_port, group_alive, group_members, start_group, stop_group, wait_http

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("AUDIO_JEPA_CLUSTER_DIR", ROOT / "var" / "cluster"))
S3_KEY, S3_SECRET = "audio-jepa-local", "audio-jepa-local-secret"


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def read_env(state: Path = STATE) -> dict[str, str]:
    f = state / "env"
    if not f.exists():
        return {}
    out = {}
    for line in f.read_text().splitlines():
        if line.startswith("export "):
            k, _, v = line[len("export "):].partition("=")
            out[k] = v.strip("'\"")
    return out


def _pids(state: Path) -> dict:
    f = state / "pids.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _alive(state: Path) -> dict[str, bool]:
    return {name: group_alive(pid) for name, pid in _pids(state).items()}


def up(state: Path = STATE, num_cpus: int | None = None) -> dict[str, str]:
    alive = _alive(state)
    if alive and all(alive.values()):
        print("local cluster already up")
        return read_env(state)
    if alive:
        down(state)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    token_file = state / "ray_token"
    if not token_file.exists():
        token_file.write_text(secrets.token_hex(32))
    os.chmod(token_file, 0o600)
    ports: dict[str, int] = {}
    for k in ("gcs", "dashboard", "mlflow", "s3", "client", "metrics", "agent_http", "agent_grpc", "runtime_env",
              "node_manager", "object_manager"):
        ports[k] = free_port(exclude=set(ports.values()))
    env = {
        "RAY_ADDRESS": f"http://127.0.0.1:{ports['dashboard']}",
        "RAY_GCS_ADDRESS": f"127.0.0.1:{ports['gcs']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "AUDIO_JEPA_CLUSTER_DIR": str(state),
    }
    pids: dict[str, int] = {}
    logs = state / "logs"
    print(f"starting S3 (moto) on 127.0.0.1:{ports['s3']}", flush=True)
    pids["s3"] = start_group([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports["s3"])],
                             logs / "s3.log").pid
    mlflow_dir = state / "mlflow"
    mlflow_dir.mkdir(exist_ok=True)
    print(f"starting MLflow on 127.0.0.1:{ports['mlflow']}", flush=True)
    pids["mlflow"] = start_group([bin_path("mlflow"), "server", "--backend-store-uri",
                                  f"sqlite:///{mlflow_dir}/mlflow.db", "--artifacts-destination",
                                  str(mlflow_dir / "artifacts"), "--host", "127.0.0.1", "--port",
                                  str(ports["mlflow"]), "--workers", "1"], logs / "mlflow.log").pid
    temp_dir = Path("/tmp") / f"audio-jepa-ray-{ports['gcs']}"
    print(f"starting Ray head (GCS 127.0.0.1:{ports['gcs']}, dashboard 127.0.0.1:{ports['dashboard']}, "
          "token auth on)", flush=True)
    head_env = {**env, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    head_env.pop("RAY_ADDRESS")
    pids["ray"] = start_group([bin_path("ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                               f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
                               f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client']}",
                               f"--metrics-export-port={ports['metrics']}", f"--temp-dir={temp_dir}",
                               # every port free and our own: a second Ray on the machine must not collide
                               f"--dashboard-agent-listen-port={ports['agent_http']}",
                               f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
                               f"--runtime-env-agent-port={ports['runtime_env']}",
                               f"--node-manager-port={ports['node_manager']}",
                               f"--object-manager-port={ports['object_manager']}",
                               f"--num-cpus={num_cpus or max(4, os.cpu_count() or 1)}", "--disable-usage-stats"],
                              logs / "ray.log", env=head_env).pid
    (state / "pids.json").write_text(json.dumps(pids))
    (state / "ray_temp_dir").write_text(str(temp_dir))
    try:
        wait_http(env["AWS_ENDPOINT_URL"], timeout=60)
        wait_http(env["RAY_ADDRESS"] + "/api/version", timeout=120)
        wait_http(env["MLFLOW_TRACKING_URI"] + "/health", timeout=180)
    except Exception:
        print(f"a service did not start; logs in {logs}", file=sys.stderr)
        down(state)
        raise
    _wait_jobs_ready(env, logs)
    (state / "env").write_text("".join(f"export {k}='{v}'\n" for k, v in env.items()))
    print_status(state)
    return env


def _wait_jobs_ready(env: dict, logs: Path, timeout: float = 180.0) -> None:
    """The dashboard answers before its job agent can take jobs: submit a no-op job until one succeeds."""
    import subprocess
    deadline = time.time() + timeout
    full = {**os.environ, **env}
    while True:
        r = subprocess.run([bin_path("ray"), "job", "submit", "--address", env["RAY_ADDRESS"], "--", "true"],
                           env=full, capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            return
        if time.time() > deadline:
            raise RuntimeError(f"Ray job submission not ready after {timeout:.0f} s: {r.stderr[-500:]} "
                               f"(logs in {logs})")
        time.sleep(2)


def down(state: Path = STATE) -> None:
    pids = _pids(state)
    if not pids:
        print("local cluster is not running")
        return
    # everything we started: the groups' members and all their descendants, collected before killing
    ours = set()
    for pgid in pids.values():
        members = group_members(pgid)
        ours.update(members)
        ours.update(descendants(members))
    for name in ("ray", "mlflow", "s3"):
        if name in pids:
            print(f"stopping {name} (process group {pids[name]})", flush=True)
            stop_group(pids[name])
    for pid in ours:  # stragglers in other sessions (job drivers, workers)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    (state / "pids.json").unlink(missing_ok=True)
    (state / "env").unlink(missing_ok=True)
    temp = state / "ray_temp_dir"
    if temp.exists():
        shutil.rmtree(temp.read_text(), ignore_errors=True)
        temp.unlink()
    print("local cluster stopped")


def print_status(state: Path = STATE) -> bool:
    env, alive = read_env(state), _alive(state)
    if not alive:
        print("local cluster: down")
        return False
    urls = {"ray": env.get("RAY_ADDRESS", "?") + " (dashboard, job submission)",
            "mlflow": env.get("MLFLOW_TRACKING_URI", "?") + " (MLflow UI)",
            "s3": env.get("AWS_ENDPOINT_URL", "?") + " (S3 endpoint)"}
    for name, ok in alive.items():
        print(f"  {name:7s} {'up  ' if ok else 'DOWN'}  {urls.get(name, '')}")
    print(f"  env file: {state / 'env'}   logs: {state / 'logs'}")
    return all(alive.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for the Ray head (default max(4, cores))")
    args = p.parse_args(argv)
    if args.command == "up":
        up(num_cpus=args.num_cpus)
    elif args.command == "down":
        down()
    else:
        return 0 if print_status() else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The embedded local cluster: Ray head + MLflow server + S3-compatible store (moto), all on 127.0.0.1.

    python -m cluster.local up       # idempotent; writes var/cluster/env (source it, or jobs read it)
    python -m cluster.local status
    python -m cluster.local down     # stops exactly what `up` started (process groups + descendants)

Every service listens on 127.0.0.1 only.  The Ray head runs with token authentication (RAY_AUTH_MODE=token, a
generated token in var/cluster/ray_token, mode 0600): `ray job submit` needs RAY_AUTH_MODE and
RAY_AUTH_TOKEN_PATH from the env file.  MLflow runs its basic-auth app when MLflow's `auth` extra is installed
(admin password generated into var/cluster/mlflow_password, mode 0600); clients get MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD from the env file (mode 0600), and Ray workers inherit them, with the S3 credentials,
from the head's environment, never through a job's runtime_env.  S3 (moto, `cluster.s3`) takes signed requests
only: its access key's secret is generated into var/cluster/s3_secret (mode 0600) and reaches clients through the
env file (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); moto's admin API (`/moto-api/`, which could reset the
store or switch authentication off) is refused.

`down` signals a PID only while its start time and boot id match what `up` recorded (a PID reused after a reboot
or by another program is left alone), by PID or process group, never by name.  A failed `up` stops what it
had started before raising.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path

from cluster.procs import (RAY_LOOPBACK_ENV, descendants, free_port, group_members, identity, process_group,
                           same_process, start_group, stop_group, wait_http, write_private)

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("AUDIO_JEPA_CLUSTER_DIR", ROOT / "var" / "cluster"))
S3_KEY = "AKIAAUDIOJEPALOCAL01"  # the access key id is no secret; its secret key is generated (var/cluster/s3_secret)
MLFLOW_ADMIN = "admin"
SERVICES = ("ray", "mlflow", "s3")  # the order `down` stops them in: jobs first, then what they write to


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


def _records(state: Path) -> dict:
    """pids.json: {"services": {name: identity of its process-group leader}, "members": [identities]}."""
    f = state / "pids.json"
    rec = json.loads(f.read_text()) if f.exists() else {}
    if rec and "services" not in rec:  # written by an older version: bare PIDs, which can never be confirmed
        rec = {"services": {k: {"pid": v} for k, v in rec.items() if isinstance(v, int)}, "members": []}
    return rec


def _save(state: Path, rec: dict) -> None:
    tmp = state / "pids.json.tmp"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, state / "pids.json")


def _alive(state: Path) -> dict[str, bool]:
    return {name: same_process(r) for name, r in _records(state).get("services", {}).items()}


def _ours(rec: dict) -> tuple[list[int], dict[int, dict]]:
    """The process groups and processes that are provably what `up` started, with their identities.

    A recorded PID counts only while its start time and boot id still match.  A recorded group counts while
    such a process is in it: the kernel reuses no group id while a member lives, and only processes of the
    session `up` created can join it (this catches MLflow's consumers, forked after the record was taken).
    Live descendants of all of these count too (Ray's job drivers and workers start sessions of their own).
    """
    services = rec.get("services", {})
    verified = [r["pid"] for r in [*services.values(), *rec.get("members", [])] if same_process(r)]
    in_groups = {process_group(p) for p in verified}
    groups = [services[n]["pid"] for n in SERVICES if n in services and services[n]["pid"] in in_groups]
    pids = set(verified)
    for g in groups:
        pids.update(group_members(g))
    pids.update(descendants(list(pids)))
    return groups, {p: i for p in pids if (i := identity(p))}


def _secret(path: Path, make=lambda: secrets.token_hex(32)) -> tuple[str, bool]:
    """A generated secret kept across restarts: (value, newly made).  Created 0600 from the first byte; one that
    others could read (an older version wrote, then chmod-ed) is replaced."""
    if path.is_symlink() or (path.exists() and path.stat().st_mode & 0o077):
        path.unlink()
    if path.exists():
        return path.read_text().strip(), False
    value = make()
    write_private(path, value)
    return value, True


def _mlflow_auth(state: Path) -> dict[str, str] | None:
    """Environment for MLflow's basic-auth app, or None where MLflow's `auth` extra (Flask-WTF) is missing.

    MLflow creates the admin user on its first start only, so a password made anew (its file was removed)
    clears the old user store, whose admin would keep a password nobody knows.
    """
    if importlib.util.find_spec("flask_wtf") is None:
        return None
    d = state / "mlflow"
    password, fresh = _secret(state / "mlflow_password", lambda: secrets.token_urlsafe(24))
    if fresh:
        (d / "basic_auth.db").unlink(missing_ok=True)
    ini = d / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = sqlite:///{d / 'basic_auth.db'}\nadmin_username = {MLFLOW_ADMIN}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            # signs the login forms' CSRF tokens; the auth app refuses to start without a fixed one
            "MLFLOW_FLASK_SERVER_SECRET_KEY": _secret(state / "mlflow_secret_key")[0]}


def _write_env(state: Path, env: dict[str, str]) -> None:
    """The env file carries the MLflow password: 0600 from creation, swapped in whole."""
    tmp = state / "env.tmp"
    tmp.unlink(missing_ok=True)
    write_private(tmp, "".join(f"export {k}='{v}'\n" for k, v in env.items()))
    os.replace(tmp, state / "env")


def up(state: Path = STATE, num_cpus: int | None = None) -> dict[str, str]:
    alive = _alive(state)
    if alive and all(alive.values()) and (state / "env").exists():
        print("local cluster already up")
        return read_env(state)
    if _records(state):
        down(state)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    token_file = state / "ray_token"
    _secret(token_file)
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
        "AWS_SECRET_ACCESS_KEY": _secret(state / "s3_secret")[0],
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "AUDIO_JEPA_CLUSTER_DIR": str(state),
        # the head listens on 127.0.0.1 only; a driver on this machine must not rewrite that address either
        **RAY_LOOPBACK_ENV,
    }
    mlflow_dir = state / "mlflow"
    mlflow_dir.mkdir(exist_ok=True)
    auth = _mlflow_auth(state)
    if auth:
        env.update(MLFLOW_TRACKING_USERNAME=MLFLOW_ADMIN, MLFLOW_TRACKING_PASSWORD=auth["MLFLOW_AUTH_ADMIN_PASSWORD"])
    rec: dict = {"services": {}, "members": []}
    procs = {}

    def started(name: str, proc) -> None:  # recorded at once: whatever happens next, `down` can stop it
        procs[name] = proc
        rec["services"][name] = identity(proc.pid) or {"pid": proc.pid}
        _save(state, rec)

    try:
        print(f"starting S3 (moto, signed requests only) on 127.0.0.1:{ports['s3']}", flush=True)
        started("s3", start_group([sys.executable, "-m", "cluster.s3", "--port", str(ports["s3"])], logs / "s3.log",
                                  env={"AUDIO_JEPA_S3_KEY": S3_KEY, "AUDIO_JEPA_S3_SECRET": env["AWS_SECRET_ACCESS_KEY"]}))
        print(f"starting MLflow on 127.0.0.1:{ports['mlflow']} "
              f"({'basic auth' if auth else 'NO authentication: install mlflow[auth] to turn it on'})", flush=True)
        started("mlflow", start_group([bin_path("mlflow"), "server", *(["--app-name", "basic-auth"] if auth else []),
                                       "--backend-store-uri", f"sqlite:///{mlflow_dir}/mlflow.db",
                                       "--artifacts-destination", str(mlflow_dir / "artifacts"), "--host",
                                       "127.0.0.1", "--port", str(ports["mlflow"]), "--workers", "1"],
                                      logs / "mlflow.log", env=auth))
        temp_dir = Path("/tmp") / f"audio-jepa-ray-{ports['gcs']}"
        (state / "ray_temp_dir").write_text(str(temp_dir))
        print(f"starting Ray head (GCS 127.0.0.1:{ports['gcs']}, dashboard 127.0.0.1:{ports['dashboard']}, "
              "token auth on)", flush=True)
        # the head's environment is every worker's: the S3 and MLflow credentials reach jobs from here
        head_env = {**env, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        head_env.pop("RAY_ADDRESS")
        started("ray", start_group([bin_path("ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                    f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
                                    f"--dashboard-port={ports['dashboard']}",
                                    f"--ray-client-server-port={ports['client']}",
                                    f"--metrics-export-port={ports['metrics']}", f"--temp-dir={temp_dir}",
                                    # every port free and our own: a second Ray on the machine must not collide
                                    f"--dashboard-agent-listen-port={ports['agent_http']}",
                                    f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
                                    f"--runtime-env-agent-port={ports['runtime_env']}",
                                    f"--node-manager-port={ports['node_manager']}",
                                    f"--object-manager-port={ports['object_manager']}",
                                    f"--num-cpus={num_cpus or max(4, os.cpu_count() or 1)}", "--disable-usage-stats"],
                                   logs / "ray.log", env=head_env))
        wait_http(env["AWS_ENDPOINT_URL"], timeout=60, proc=procs["s3"])
        wait_http(env["RAY_ADDRESS"] + "/api/version", timeout=120, proc=procs["ray"])
        wait_http(env["MLFLOW_TRACKING_URI"] + "/health", timeout=180, proc=procs["mlflow"])
        _wait_jobs_ready(env, logs)
        rec["members"] = list(_ours(rec)[1].values())
        _save(state, rec)
        _write_env(state, env)
    except BaseException:
        print(f"the local cluster did not come up; stopping what was started (logs in {logs})", file=sys.stderr)
        down(state)
        raise
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


def _not_ours_any_more(rec: dict) -> list[str]:
    """Recorded PIDs that now name another process (after a reboot, or reused by another program)."""
    return [f"{name}: PID {r['pid']} is not the process `up` started (its PID was reused after a reboot or by "
            "another program); left alone" for name, r in rec.get("services", {}).items()
            if not same_process(r) and identity(r["pid"]) is not None]


def down(state: Path = STATE) -> None:
    rec = _records(state)
    if not rec.get("services"):
        print("local cluster is not running")
        return
    for line in _not_ours_any_more(rec):
        print(line, flush=True)
    groups, ours = _ours(rec)  # collected before anything is signalled
    for name, r in rec["services"].items():
        if r["pid"] in groups:
            print(f"stopping {name} (process group {r['pid']})", flush=True)
            stop_group(r["pid"])
    for pid, ident in ours.items():  # stragglers in other sessions (job drivers, workers), if still the same
        if same_process(ident):
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
    env, rec = read_env(state), _records(state)
    if not rec.get("services"):
        print("local cluster: down")
        return False
    urls = {"ray": env.get("RAY_ADDRESS", "?") + " (dashboard, job submission)",
            "mlflow": env.get("MLFLOW_TRACKING_URI", "?") + " (MLflow UI"
                      + (", login: MLFLOW_TRACKING_USERNAME/PASSWORD in the env file)" if env.get(
                          "MLFLOW_TRACKING_PASSWORD") else ")"),
            "s3": env.get("AWS_ENDPOINT_URL", "?") + " (S3 endpoint)"}
    alive = {name: same_process(r) for name, r in rec["services"].items()}
    for name, ok in alive.items():
        print(f"  {name:7s} {'up  ' if ok else 'DOWN'}  {urls.get(name, '')}")
    for line in _not_ours_any_more(rec):
        print("  " + line)
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

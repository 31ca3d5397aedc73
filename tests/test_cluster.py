"""The embedded local cluster: up/down leaves nothing behind, token auth on job submission, and an
end-to-end `ray job submit` pretraining that registers a model `load_encoder` can load."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import upload_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def local(state: Path, *args, check=True):
    env = {**os.environ, "AUDIO_JEPA_CLUSTER_DIR": str(state)}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "cluster.local", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=400, check=check)


def read_env(state: Path) -> dict:
    out = {}
    for line in (state / "env").read_text().splitlines():
        k, _, v = line[len("export "):].partition("=")
        out[k] = v.strip("'")
    return out


def port_free(port: int) -> bool:
    """No socket LISTENs on the port (TIME_WAIT leftovers of clients do not count)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                return False
    return True


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def tree(pids):
    """All live processes in the given process groups and below them."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(f[2]) in pids and f[0] != "Z":
                out.add(int(d))
    return out


def test_cluster_up_submit_e2e_and_down(tmp_path, clean_corpus_dir):
    state = tmp_path / "cluster"
    r = local(state, "up", "--num-cpus", "4")
    assert "up" in r.stdout, r.stdout + r.stderr
    try:
        env = read_env(state)
        pgids = set(json.loads((state / "pids.json").read_text()).values())
        assert oct((state / "ray_token").stat().st_mode & 0o777) == "0o600"
        assert local(state, "up").stdout.strip().startswith("local cluster already up")  # idempotent
        for url in (env["RAY_ADDRESS"], env["MLFLOW_TRACKING_URI"], env["AWS_ENDPOINT_URL"]):
            assert "127.0.0.1" in url
        base = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
        job = ["python", "-c", "print('hello from a job')"]
        # without the token: refused
        no_token = {k: v for k, v in base.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"], "--", *job],
                                 env=no_token, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert "auth" in (refused.stdout + refused.stderr).lower()
        # with it: the tiny pretraining end to end, data in the cluster's S3, model in its MLflow
        full = {**base, **env}
        src = upload_dir(env["AWS_ENDPOINT_URL"], clean_corpus_dir, "e2e", "corpus")
        summary = tmp_path / "pretrain.json"
        sets = ["model.width=64", "model.depth=2", "model.heads=2", "model.pred_width=32", "model.pred_depth=1",
                "model.pred_heads=2", "train.batch_size=8", "train.steps=10", "train.log_every=5",
                "checkpoint.every_steps=10", f"data.source={src}", "checkpoint.storage_path=s3://e2e/runs",
                "mlflow.registered_model=e2e-model", "run_name=e2e"]
        cmd = [str(BIN / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"], "--submission-id", "e2e-1", "--",
               "python", "-m", "jobs.pretrain", "--config", "tiny", *[a for s in sets for a in ("--set", s)],
               "--summary-json", str(summary)]
        out = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        assert "Job 'e2e-1' succeeded" in out.stdout + out.stderr
        # the user's terminal: each progress line once, no per-report framework dump
        logs = out.stdout + out.stderr
        assert sum("step 5/10 (50%)" in line for line in logs.splitlines()) == 1, logs[-4000:]
        assert "Reporting training result" not in logs and "TrainingReport(" not in logs
        s = json.loads(summary.read_text())
        assert s["status"] == "succeeded" and s["final_step"] == 10 and s["checkpoint"].startswith("s3://e2e/runs/")
        assert s["registered_model"]["name"] == "e2e-model"
        code = ("from service.registry import load_encoder; import torch; "
                "e = load_encoder('models:/e2e-model@current', 'cpu'); "
                "print(e.embed(torch.zeros(1, 16000)).shape[1] == e.embedding_dim == 2 * 64 * e.cfg.features.grid[0])")
        loaded = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
        assert loaded.returncode == 0 and "True" in loaded.stdout, loaded.stderr[-2000:]
        ports = [int(u.rsplit(":", 1)[1]) for u in (env["RAY_ADDRESS"], env["MLFLOW_TRACKING_URI"],
                                                     env["AWS_ENDPOINT_URL"])] + [int(env["RAY_GCS_ADDRESS"].rsplit(":", 1)[1])]
        ours = tree(pgids)
        assert ours
    finally:
        local(state, "down", check=False)
    time.sleep(1)
    assert not [p for p in ours if alive(p)], "processes of the local cluster survived `down`"
    assert not tree(pgids)
    assert all(port_free(p) for p in ports), "a port of the local cluster is still held"
    assert "down" in local(state, "status", check=False).stdout

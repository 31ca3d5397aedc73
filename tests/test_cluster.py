"""The embedded local cluster (started once for this module): it listens on 127.0.0.1 only and refuses anonymous
clients, jobs' metadata carries no secret while their workers still get the credentials, an end-to-end
`ray job submit` pretraining registers a model `load_encoder` can load, and `down` leaves nothing behind."""
import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.procs import descendants
from conftest import upload_dir
from test_security import http_status, listeners_of, listening_sockets, loopback

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
    return all(p != port for _, p in listening_sockets().values())


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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(state dir, env file contents, process groups `up` recorded); `down` at the end in any case."""
    state = tmp_path_factory.mktemp("local") / "cluster"
    r = local(state, "up", "--num-cpus", "4", check=False)
    assert r.returncode == 0 and "up" in r.stdout, r.stdout + r.stderr
    pgids = {s["pid"] for s in json.loads((state / "pids.json").read_text())["services"].values()}
    try:
        yield state, read_env(state), pgids
    finally:
        local(state, "down", check=False)


def submit_env(env: dict) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1", **env}


def test_cluster_listens_on_loopback_only_and_refuses_anonymous_clients(cluster):
    state, env, pgids = cluster
    ours = tree(pgids)
    ours.update(descendants(list(ours)))
    socks = listeners_of(ours)
    ports = {port for _, _, port in socks}
    for url in (env["RAY_ADDRESS"], env["MLFLOW_TRACKING_URI"], env["AWS_ENDPOINT_URL"], env["RAY_GCS_ADDRESS"]):
        assert int(url.rsplit(":", 1)[1]) in ports, f"{url} is not served by the cluster's processes"
    assert all(loopback(addr) for _, addr, _ in socks), f"listening beyond 127.0.0.1: {socks}"
    assert http_status(env["RAY_ADDRESS"] + "/api/jobs/") in (401, 403), "Ray's job API answered without a token"
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert http_status(env["RAY_ADDRESS"] + "/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200
    for name in ("ray_token", "env"):
        assert oct((state / name).stat().st_mode & 0o777) == "0o600", name


@pytest.mark.skipif(importlib.util.find_spec("flask_wtf") is None,
                    reason="MLflow's auth extra (mlflow[auth]) is not installed: the local MLflow runs without login")
def test_cluster_mlflow_requires_a_login(cluster):
    state, env, _ = cluster
    assert env["MLFLOW_TRACKING_USERNAME"] and oct((state / "mlflow_password").stat().st_mode & 0o777) == "0o600"
    search = env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search) == 401, "MLflow answered without a login"
    wrong = base64.b64encode(f"{env['MLFLOW_TRACKING_USERNAME']}:not-the-password".encode()).decode()
    assert http_status(search, {"Authorization": f"Basic {wrong}"}) == 401
    login = base64.b64encode(f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()
    assert http_status(search, {"Authorization": f"Basic {login}"}) == 200


def test_cluster_s3_refuses_anonymous_and_wrongly_signed_requests_and_its_admin_api(cluster):
    """The store holds checkpoints and corpora: only the cluster's access key reads or writes it, and moto's admin
    API (reset the store, switch authentication off, dump every object) is out of reach."""
    import boto3
    import botocore
    state, env, _ = cluster
    assert oct((state / "s3_secret").stat().st_mode & 0o777) == "0o600"
    endpoint = env["AWS_ENDPOINT_URL"]

    def client(**kw):
        return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **kw)
    ours = client(aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    ours.create_bucket(Bucket="guarded")
    ours.put_object(Bucket="guarded", Key="ckpt/state.pt", Body=b"weights")
    others = {"anonymous": client(config=botocore.config.Config(signature_version=botocore.UNSIGNED)),
              "wrong secret": client(aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key="x" * 40),
              "unknown key": client(aws_access_key_id="AKIAOTHERUSER0000000", aws_secret_access_key="x" * 40)}
    for who, c in others.items():
        for call in (lambda: c.get_object(Bucket="guarded", Key="ckpt/state.pt"),
                     lambda: c.put_object(Bucket="guarded", Key="ckpt/state.pt", Body=b"overwritten"),
                     lambda: c.list_objects_v2(Bucket="guarded")):
            with pytest.raises(botocore.exceptions.ClientError):
                call()
            assert ours.get_object(Bucket="guarded", Key="ckpt/state.pt")["Body"].read() == b"weights", who
    for path, method in (("/moto-api/reset", "POST"), ("/moto-api/reset-auth", "POST"), ("/moto-api/data.json", "GET"),
                         ("/guarded/ckpt/state.pt", "GET")):
        assert http_status(endpoint + path, method=method) == 403, path
    assert ours.get_object(Bucket="guarded", Key="ckpt/state.pt")["Body"].read() == b"weights"


SECRET_PROBE = """
import hashlib, json, os
from jobs.common import init_ray
init_ray()
import ray

@ray.remote
def probe():  # digests only: a secret printed here would end up in the job's logs
    return {k: hashlib.sha256(os.environ.get(k, "").encode()).hexdigest()
            for k in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD")}

print("PROBE", json.dumps(ray.get(probe.remote())), flush=True)
"""


def test_jobs_metadata_carries_no_secrets_and_workers_get_them_from_the_cluster(cluster):
    """Two drivers with secrets in their environment, one submitted (`ray job submit`), one connecting directly
    (RAY_ADDRESS = the GCS, as a notebook would): their workers have the cluster's credentials, and no secret shows
    in what anyone holding the token can read: the job listings and the cluster's Ray logs."""
    state, env, _ = cluster
    mine = {"AWS_SESSION_TOKEN": "submitter-session-c0ffee", "MLFLOW_TRACKING_TOKEN": "submitter-token-c0ffee"}
    full = {**submit_env(env), **mine}
    runs = {"submitted": [str(BIN / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"], "--submission-id",
                          "secrets-1", "--", "python", "-c", SECRET_PROBE],
            "direct driver": [sys.executable, "-c", SECRET_PROBE]}
    for how, cmd in runs.items():
        run_env = {**full, "RAY_ADDRESS": env["RAY_GCS_ADDRESS"]} if how == "direct driver" else full
        out = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert out.returncode == 0, how + ": " + out.stdout[-3000:] + out.stderr[-2000:]
        digests = json.loads(out.stdout.split("PROBE ", 1)[1].splitlines()[0])
        assert digests["AWS_SECRET_ACCESS_KEY"] == hashlib.sha256(env["AWS_SECRET_ACCESS_KEY"].encode()).hexdigest(), how
        assert digests["MLFLOW_TRACKING_PASSWORD"] == hashlib.sha256(
            env.get("MLFLOW_TRACKING_PASSWORD", "").encode()).hexdigest(), how
    listed = subprocess.run([str(BIN / "ray"), "list", "jobs", "--detail", "--format", "json", "--address",
                             env["RAY_GCS_ADDRESS"]], env=full, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and "secrets-1" in listed.stdout, listed.stderr[-2000:]
    assert "runtime_env" in listed.stdout
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(env["RAY_ADDRESS"] + "/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as r:  # what JobSubmissionClient.list_jobs reads
        info = r.read().decode()
    assert "secrets-1" in info
    # the runtime env agent logs every runtime_env it sets up; `ray logs` serves these files
    logs = "".join(f.read_text(errors="replace") for f in
                   Path((state / "ray_temp_dir").read_text()).glob("session_*/logs/*") if f.is_file())
    assert "runtime_env" in logs
    secrets = [env["AWS_SECRET_ACCESS_KEY"], *mine.values(), *([env["MLFLOW_TRACKING_PASSWORD"]] if env.get("MLFLOW_TRACKING_PASSWORD")
                                             else [])]
    for where, text in (("ray list jobs --detail", listed.stdout), ("the job API's /api/jobs/", info),
                        ("the cluster's Ray logs", logs)):
        leaked = [s[:6] + "…" for s in secrets if s in text]
        assert not leaked, f"secrets in {where}: {leaked}"


def test_cluster_up_submit_e2e(cluster, tmp_path, clean_corpus_dir):
    state, env, _ = cluster
    assert oct((state / "ray_token").stat().st_mode & 0o777) == "0o600"
    assert local(state, "up").stdout.strip().startswith("local cluster already up")  # idempotent
    for url in (env["RAY_ADDRESS"], env["MLFLOW_TRACKING_URI"], env["AWS_ENDPOINT_URL"]):
        assert "127.0.0.1" in url
    base = submit_env({})
    job = ["python", "-c", "print('hello from a job')"]
    # without the token: refused
    no_token = {k: v for k, v in base.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"], "--", *job],
                             env=no_token, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower()
    # with it, as `make demo` does: prepare the corpus in the cluster's S3 once, then the tiny pretraining
    # end to end from its shards, the model in the cluster's MLflow
    full = {**base, **env}
    raw = upload_dir(env["AWS_ENDPOINT_URL"], clean_corpus_dir, "e2e", "corpus", env)
    src = "s3://e2e/shards"
    prep = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"], "--submission-id",
                           "e2e-prepare", "--", "python", "-m", "jobs.prepare", "--source", raw, "--out", src],
                          env=full, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert prep.returncode == 0, prep.stdout[-4000:] + prep.stderr[-2000:]
    assert "prepare: committed s3://e2e/shards: 6 files" in prep.stdout + prep.stderr
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
    assert s["data"]["prepared"] == src
    assert s["registered_model"]["name"] == "e2e-model"
    code = ("from service.registry import load_encoder; import torch; "
            "e = load_encoder('models:/e2e-model@current', 'cpu'); "
            "print(e.embed(torch.zeros(1, 16000)).shape[1] == e.embedding_dim == 2 * 64 * e.cfg.features.grid[0])")
    loaded = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and "True" in loaded.stdout, loaded.stderr[-2000:]


EMBED_CHECK = """
import json, sys
import numpy as np
from mlflow import MlflowClient
from service.audio import decode
from service.config import StorageConfig
from service.corpus import read_json
from service.embed import read_embeddings
from service.encoder import load_encoder
from service.storage import read_bytes
out, source = sys.argv[1], sys.argv[2]
s = read_json(out + "/embeddings.json", StorageConfig())
enc = load_encoder("models:/e2e-model@current", "cpu")
rows = read_embeddings(out).to_pylist()
worst = 0.0
for r in rows:
    wav = decode(read_bytes(source + "/" + r["key"]), enc.sample_rate)
    worst = max(worst, float(np.abs(np.asarray(r["embedding"]) - enc.embed(wav[None])[0].numpy()).max()))
    assert len(r["frames"]) == len(r["frame_ms"]) == enc.frame_count(len(wav))
run = MlflowClient().get_run(s["mlflow"]["run_id"])
print("EMBED", json.dumps({"rows": len(rows), "worst": worst, "resolved": s["resolved_model_uri"],
                           "digest_ok": s["weights_sha256"] == enc.digest(), "status": s["status"],
                           "link": run.data.tags.get(s["mlflow"]["tag"])}))
"""


def test_embed_job_submitted_with_the_clusters_s3_and_registry(cluster):
    """After the e2e run (its corpus in the cluster's S3, its model in the registry): `ray job submit` of jobs.embed
    embeds every file as `load_encoder(...).embed` does and links the output from the model's MLflow run."""
    state, env, _ = cluster
    full = {**submit_env({}), **env}
    source, out = "s3://e2e/corpus", "s3://e2e/embeddings/e2e-current"
    probe = subprocess.run([sys.executable, "-c", "from service.encoder import resolve_model_uri as r; "
                            "print(r('models:/e2e-model@current'))"], env=full, capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    if probe.returncode != 0:
        pytest.skip("needs the model test_cluster_up_submit_e2e registers: " + probe.stderr[-300:])
    cmd = [str(BIN / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"], "--submission-id", "e2e-embed", "--",
           "python", "-m", "jobs.embed", "--model-uri", "models:/e2e-model@current", "--source", source, "--out", out,
           "--frames"]
    r = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=600, cwd=ROOT)
    logs = r.stdout + r.stderr
    assert r.returncode == 0 and "Job 'e2e-embed' succeeded" in logs, logs[-4000:]
    assert "embed: finished s3://e2e/embeddings/e2e-current: 6 of 6 files embedded" in logs, logs[-4000:]
    check = subprocess.run([sys.executable, "-c", EMBED_CHECK, out, source], env=full, capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-3000:]
    got = json.loads(check.stdout.split("EMBED ", 1)[1].splitlines()[0])
    assert got["rows"] == 6 and got["worst"] < 1e-3 and got["digest_ok"] and got["status"] == "succeeded"
    assert got["resolved"] == probe.stdout.strip() and got["link"] == out


def test_down_leaves_nothing_behind(cluster):
    """Last in the module: stops the shared cluster."""
    state, env, pgids = cluster
    ports = [int(u.rsplit(":", 1)[1]) for u in (env["RAY_ADDRESS"], env["MLFLOW_TRACKING_URI"],
                                                 env["AWS_ENDPOINT_URL"], env["RAY_GCS_ADDRESS"])]
    ours = tree(pgids)
    ours.update(descendants(list(ours)))
    assert ours
    local(state, "down", check=False)
    time.sleep(1)
    assert not [p for p in ours if alive(p)], "processes of the local cluster survived `down`"
    assert not tree(pgids)
    assert all(port_free(p) for p in ports), "a port of the local cluster is still held"
    assert "down" in local(state, "status", check=False).stdout

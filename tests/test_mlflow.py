"""MLflow: one run per pretraining run (also across failures), registry + aliases, loading models
in a fresh process, pyfunc serving, HEAR and X-ARES adapters."""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from service import checkpoint as ckpt
from service.config import load_config
from cluster.procs import free_port, start_group, stop_group, wait_http
from service.encoder import AudioEncoder, load_encoder
from service.train import run_pretraining

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

SMALL = ["model.width=64", "model.depth=2", "model.heads=2", "model.pred_width=32", "model.pred_depth=1",
         "model.pred_heads=2", "train.batch_size=8", "train.log_every=5", "optim.warmup_steps=5"]
NAME = "jepa-test"


@pytest.fixture(scope="module")
def trained(clean_corpus_dir, tmp_path_factory, mlflow_server):
    """One 2-worker run, registered in MLflow (test_train's fault test: a worker failure keeps one run)."""
    from service.registry import register_run
    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config("tiny", SMALL + [
        f"data.source={clean_corpus_dir}", f"checkpoint.storage_path={storage}", "run_name=tracked",
        "train.workers=2", "train.steps=20", "checkpoint.every_steps=10",
        f"mlflow.tracking_uri={mlflow_server}", f"mlflow.registered_model={NAME}", "mlflow.experiment=tests"])
    summary = run_pretraining(cfg)
    assert summary["status"] == "succeeded", summary["error"]
    summary["registered_model"] = register_run(cfg, summary["mlflow_run_id"], summary["checkpoint"])
    return cfg, summary


def test_one_run_with_params_metrics_artifacts(trained, mlflow_server):
    from mlflow import MlflowClient
    cfg, summary = trained
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("tests")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["masking.geometry"] == "unstructured" and run.data.params["train.steps"] == "20"
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "loss")]
    assert 20 in steps and 5 in steps and len(steps) >= 4
    for key in ("tau", "lr", "target_erank", "target_std", "mask_ratio", "clips_per_s", "data_wait_fraction",
                "target_silence_fraction"):
        assert c.get_metric_history(run.info.run_id, key), key
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "masks.png", "history.png"} <= arts
    assert (run.data.tags["audio_jepa.checkpoint"]).endswith("checkpoint_00000020")


def test_registered_version_tags_and_alias(trained, mlflow_server):
    from mlflow import MlflowClient
    cfg, summary = trained
    reg = summary["registered_model"]
    c = MlflowClient(mlflow_server)
    mv = c.get_model_version_by_alias(NAME, "current")
    assert mv.version == reg["version"]
    assert mv.tags["run_id"] == summary["mlflow_run_id"] and mv.tags["steps"] == "20"
    trained_cfg = ckpt.config_of(ckpt.load_state(summary["checkpoint"]))  # with the measured normalisation
    assert mv.tags["config_hash"] == trained_cfg.hash() != cfg.hash() and mv.tags["data_source"] == cfg.data.source
    subprocess.run([sys.executable, "-m", "jobs.promote", NAME, reg["version"], "--alias", "champion",
                    "--tracking-uri", mlflow_server], check=True)
    assert c.get_model_version_by_alias(NAME, "champion").version == reg["version"]
    bad = subprocess.run([sys.executable, "-m", "jobs.promote", NAME, "999", "--alias", "champion",
                          "--tracking-uri", mlflow_server], capture_output=True, text=True)
    assert bad.returncode != 0 and "999" in bad.stderr


def test_registered_model_loads_in_fresh_process_and_matches_training_encoder(trained, mlflow_server, tmp_path):
    cfg, summary = trained
    wav = np.random.default_rng(0).standard_normal((3, 40000)).astype(np.float32) * 0.1
    np.save(tmp_path / "wav.npy", wav)
    code = ("import numpy as np, sys; from service.registry import load_encoder; "
            f"e = load_encoder('models:/{NAME}@current', 'cpu'); "
            f"x = np.load('{tmp_path}/wav.npy'); f, t = e.embed_frames(x); "
            f"np.save('{tmp_path}/clip.npy', e.embed(x).numpy()); np.save('{tmp_path}/frames.npy', f.numpy()); "
            "print(e.cfg.features.mean, e.cfg.features.std, e.sample_rate, e.embedding_dim, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server})
    assert out.returncode == 0, out.stderr[-2000:]
    mean, std, sr, dim, used_ray = out.stdout.split()[-5:]
    # the in-training target encoder, straight from the checkpoint state
    state = ckpt.load_state(summary["checkpoint"])
    ref = AudioEncoder(ckpt.config_of(state), state["target_encoder"], "cpu")
    assert (int(sr), int(dim), used_ray) == (16000, ref.embedding_dim, "False")
    # the normalisation stats were measured on the run's data and travel with the registered model
    assert cfg.features.mean is None and ref.cfg.features.mean is not None
    assert (float(mean), float(std)) == (ref.cfg.features.mean, ref.cfg.features.std)
    np.testing.assert_allclose(np.load(tmp_path / "clip.npy"), ref.embed(wav).numpy(), rtol=1e-5, atol=1e-5)
    frames = np.load(tmp_path / "frames.npy")
    assert frames.shape[0] == 3 and frames.shape[2] == ref.frame_dim == 64 * ref.cfg.features.grid[0]


def test_embedding_api_any_length(trained):
    enc = load_encoder(trained[1]["checkpoint"], "cpu")
    sr = enc.sample_rate
    for n in (100, sr // 2, enc.cfg.features.clip_samples, 5 * sr + 123):
        frames, t = enc.embed_frames(torch.randn(2, n) * 0.1)
        assert frames.shape[0] == 2 and frames.shape[2] == enc.frame_dim and t.shape == frames.shape[:2]
        assert torch.isfinite(frames).all()
        assert (t[0, 1:] > t[0, :-1]).all() if t.shape[1] > 1 else True
        assert t[0, -1] <= n / sr * 1000 + enc.hop_ms  # no frames far past the end
    long_frames, t = enc.embed_frames(torch.randn(1, 10 * sr) * 0.1)
    assert long_frames.shape[1] == pytest.approx(10_000 / enc.hop_ms, abs=2)
    assert enc.embed(torch.randn(4, sr)).shape == (4, enc.embedding_dim)


def test_pyfunc_serving_returns_embeddings(trained, mlflow_server, tmp_path):
    import mlflow.pyfunc
    uri = f"models:/{NAME}@current"
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(np.random.default_rng(1).standard_normal((2, 16000)).astype(np.float32))
    dim = load_encoder(trained[1]["checkpoint"], "cpu").embedding_dim
    assert np.asarray(out).shape == (2, dim)
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = start_group([mlflow_bin, "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                        "-p", str(port)], tmp_path / "serve.log",
                       env={"MLFLOW_TRACKING_URI": mlflow_server,  # serve execs uvicorn from PATH
                            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=120, proc=proc)
        body = json.dumps({"inputs": (np.random.default_rng(2).standard_normal((3, 8000)) * 0.1).tolist()}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            preds = np.asarray(json.loads(r.read())["predictions"])
        assert preds.shape == (3, dim) and np.isfinite(preds).all()
    finally:
        stop_group(proc)
        time.sleep(0.2)


def test_hear_and_xares_adapters(trained):
    from xares.audio_encoder_checker import check_audio_encoder

    from service.adapters import hear
    from service.adapters.xares import AudioJEPAEncoder
    uri = trained[1]["checkpoint"]
    assert check_audio_encoder(AudioJEPAEncoder(uri, "cpu")) is True
    model = hear.load_model(uri, "cpu")
    audio = torch.randn(3, 2 * model.sample_rate) * 0.1
    scene = hear.get_scene_embeddings(audio, model)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert scene.shape == (3, model.scene_embedding_size)
    assert emb.shape[0] == 3 and emb.shape[2] == model.timestamp_embedding_size and ts.shape == emb.shape[:2]
    assert torch.allclose(ts[:, 1:] - ts[:, :-1], torch.tensor(model.hop_ms))


def test_evaluate_registered_model_reports_baselines_and_logs_to_its_run(trained, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from test_evaluate import make_task
    task = make_task(tmp_path / "bands", per_split=(8, 4, 4))
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--model-uri", f"models:/{NAME}@current",
                        "--task", str(task), "--cache-dir", str(tmp_path / "cache"), "--summary-json", str(out)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server})
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(out.read_text())
    assert {(x["model"], x["probe"]) for x in s["results"]} == {(m, p) for m in ("jepa", "random", "logmel")
                                                               for p in ("linear", "knn")}
    run = MlflowClient(mlflow_server).get_run(trained[1]["mlflow_run_id"])
    assert "eval.bands.jepa.linear.accuracy" in run.data.metrics
    assert "eval.bands.logmel.knn.macro_f1" in run.data.metrics


def test_evaluate_after_promote_never_reuses_the_old_models_embeddings(trained, mlflow_server, tmp_path,
                                                                        monkeypatch):
    """The cache keys on the version the alias resolved to and the weights' sha256, not the URI string."""
    from service.evaluate import evaluate
    from service.registry import promote, register_run
    from test_evaluate import make_task
    cfg, summary = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    task, cache = make_task(tmp_path / "bands", per_split=(6, 3, 3)), tmp_path / "cache"
    run = lambda: evaluate(f"models:/{NAME}@current", [str(task)], cache_dir=str(cache),  # noqa: E731
                           progress=lambda *_: None)
    v1 = summary["registered_model"]["version"]
    first = run()
    assert first["resolved_model_uri"] == f"models:/{NAME}/{v1}"
    cached = set(cache.glob("*.npy"))
    assert run()["results"] == first["results"] and set(cache.glob("*.npy")) == cached  # same model: reused
    older = str(Path(summary["checkpoint"]).parent / "checkpoint_00000010")  # other weights, same run
    v2 = register_run(cfg, summary["mlflow_run_id"], older, alias="candidate")["version"]
    promote(NAME, v2, "current", mlflow_server)
    try:
        second = run()
        assert second["resolved_model_uri"] == f"models:/{NAME}/{v2}"
        assert len(set(cache.glob("*.npy")) - cached) == 1  # the new version's embeddings, random/log-mel reused
    finally:
        promote(NAME, v1, "current", mlflow_server)


def test_a_finished_run_resubmitted_registers_no_new_version(trained, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from jobs.pretrain import main
    cfg, summary = trained
    before = MlflowClient(mlflow_server).search_model_versions(f"name='{NAME}'")
    sets = [a for k, v in cfg.flat().items() if k in ("data.source", "checkpoint.storage_path", "run_name",
                                                       "train.workers", "train.steps", "checkpoint.every_steps",
                                                       "mlflow.tracking_uri", "mlflow.registered_model",
                                                       "mlflow.experiment")
            for a in ("--set", f"{k}={v}")]
    out = tmp_path / "again.json"
    assert main(["--config", "tiny", *[a for s in SMALL for a in ("--set", s)], *sets,
                 "--summary-json", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["finished_before"] and again["registered_model"]["version"] == summary["registered_model"]["version"]
    after = MlflowClient(mlflow_server).search_model_versions(f"name='{NAME}'")
    assert len(after) == len(before)

"""Ray Train DDP pretraining: 2-worker run, checkpoints, fault injection + exact resume (model and data),
resubmission of finished and failed runs."""
import json
from pathlib import Path

import pytest

from node_loss import weights_digest
from service import checkpoint as ckpt
from service.config import load_config
from service.model import AudioJEPA
from service.optim import build_optimizer, tau_at
from service.train import run_pretraining

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

SMALL = ["model.width=64", "model.depth=2", "model.heads=2", "model.pred_width=32", "model.pred_depth=1",
         "model.pred_heads=2", "train.batch_size=8", "train.log_every=5", "optim.warmup_steps=5"]


def cfg_for(source, storage, name, **over):
    sets = SMALL + [f"data.source={source}", f"checkpoint.storage_path={storage}", f"run_name={name}"]
    return load_config("tiny", sets + [f"{k}={v}" for k, v in over.items()])


def checkpoints(storage: Path, name: str) -> list[Path]:
    return sorted(p for p in (storage / name).glob("checkpoint_*") if (p / ckpt.MARKER).exists())


def expected_digests(cfg, corpus_dir: Path, steps: list[int]) -> dict[int, float]:
    """What `data_digest` must read at each step if every rank consumed exactly its stream's clips in order."""
    import zlib

    import numpy as np

    from service.corpus import clip_ids, load_corpus
    corpus, per = load_corpus(str(corpus_dir), cfg), cfg.train.batch_size // cfg.train.workers
    out = {}
    for r in range(cfg.train.workers):
        ids, d = clip_ids(cfg, corpus, r, cfg.train.workers, max(steps) * per), 0
        for s in range(max(steps)):
            d = zlib.crc32(np.asarray(ids[s * per:(s + 1) * per], dtype="<i8").tobytes(), d)
            if s + 1 in steps:
                out[s + 1] = out.get(s + 1, 0) + d * (r + 1)
    return out


def test_fault_injection_resumes_exactly_and_resubmission_continues(clean_corpus_dir, tmp_path, mlflow_server):
    """A 2-worker run from a prepared corpus, one worker killed mid-pass: the model state and the data
    position resume exactly (every checkpoint's clip digest is what an uninterrupted stream gives, and the run
    ends with the losses and the bit-identical weights of the same config run uninterrupted), and neither the
    failure nor a resubmission makes a second MLflow run."""
    from mlflow import MlflowClient
    from service.prepare import PrepareOptions, prepare
    corpus = tmp_path / "corpus"
    prepare(load_config("tiny", [f"data.source={clean_corpus_dir}"]), str(corpus),
            PrepareOptions(segment_seconds=1.0, row_group=2, task_files=2))
    over = {"train.workers": 2, "train.steps": 12, "checkpoint.every_steps": 4, "checkpoint.keep": 10,
            "failure.inject_kill_at_step": 6, "failure.inject_kill_rank": 1, "failure.max_failures": 2,
            "data.shuffle_blocks": 2, "mlflow.tracking_uri": mlflow_server, "mlflow.experiment": "fault"}
    cfg = cfg_for(corpus, tmp_path, "fault", **over)
    summary = run_pretraining(cfg)
    # a 2-worker CPU run completes and checkpoints, with every metric
    assert summary["status"] == "succeeded", summary["error"]
    assert summary["final_step"] == 12
    state = ckpt.load_state(summary["checkpoint"])
    assert state["step"] == 12 and ckpt.config_of(state).train.workers == 2
    m = summary["metrics"]
    for key in ("loss", "lr", "wd", "tau", "grad_norm", "mask_ratio", "clips_per_s", "data_wait_fraction",
                "target_std", "target_erank", "data_position", "data_digest"):
        assert key in m, key
    assert m["tau"] == pytest.approx(cfg.ema.tau_end)  # tau reaches its end value at the last step
    assert m["skipped_steps"] == 0  # no rehearsal knob set: no step skipped
    assert m["target_silence_fraction"] == 0.0  # short files are looped, never zero-padded
    assert ckpt.config_of(state).features.mean is not None  # the corpus's normalisation is in the checkpoint
    assert summary["data"]["files"] == 6 and summary["data"]["skipped"] == {}
    assert 0 < m["data_files_seen"] <= 6  # the ledger counts the source files behind the shards' clips
    assert summary["data"]["prepared"] == str(corpus)
    # the injected failure happened and was recovered from
    assert (tmp_path / "fault" / "fault_injected_at_step_6").exists()
    resumes = [json.loads(p.read_text()) for p in sorted((tmp_path / "fault" / "resumes").glob("*.json"))]
    assert [r["step"] for r in resumes] == [4], resumes
    # the restored state equals the checkpoint it came from: weights, optimiser, step, tau
    state = ckpt.load_state(tmp_path / "fault" / "checkpoint_00000004")
    model = AudioJEPA(cfg)
    opt = build_optimizer(model, cfg.optim)
    step, _ = ckpt.restore(state, model, opt)
    expected = ckpt.fingerprint(model, opt)
    for k, v in expected.items():
        assert resumes[0][k] == pytest.approx(v, rel=1e-9, abs=1e-9), k
    assert resumes[0]["tau"] == pytest.approx(tau_at(4, 12, cfg.ema)) and step == 4
    # the run's history was not restarted: checkpoints 4, 8, 12 exist once each
    assert [p.name for p in checkpoints(tmp_path, "fault")] == [f"checkpoint_{s:08d}" for s in (4, 8, 12)]
    # the data resumed exactly: each rank consumed exactly its stream, no clip replayed or skipped
    marks = {int(p.name[-8:]): json.loads((p / ckpt.MARKER).read_text()) for p in checkpoints(tmp_path, "fault")}
    assert {s: mk["data_position"] for s, mk in marks.items()} == {4: 16, 8: 32, 12: 48}
    assert {s: mk["metrics"]["data_digest"] for s, mk in marks.items()} == expected_digests(cfg, corpus, [4, 8, 12])
    # and the model resumed exactly: the run ends where the same config uninterrupted ends, losses and weights
    calm = {k: v for k, v in over.items() if not k.startswith("failure.inject")}
    steady = run_pretraining(cfg_for(corpus, tmp_path, "steady", **{**calm, "mlflow.experiment": "fault-steady"}))
    assert steady["status"] == "succeeded" and steady["metrics"]["data_digest"] == m["data_digest"]
    assert weights_digest(ckpt.load_state(steady["checkpoint"])) == weights_digest(ckpt.load_state(summary["checkpoint"]))
    c = MlflowClient(mlflow_server)

    def losses_after_the_resume(run_id):
        history = {h.step: h.value for h in c.get_metric_history(run_id, "loss")}  # a step logged twice: its last
        return {step: loss for step, loss in history.items() if step > 4}
    assert losses_after_the_resume(summary["mlflow_run_id"]) == losses_after_the_resume(steady["mlflow_run_id"])
    assert {5, 10, 12} <= set(losses_after_the_resume(steady["mlflow_run_id"]))  # log_every=5, and the last step

    # resubmitting the finished run name trains nothing and starts no worker (none restored, none resumed)
    said = []
    again = run_pretraining(cfg_for(corpus, tmp_path, "fault", **over), progress=said.append)
    assert again["status"] == "succeeded" and again["final_step"] == 12, again
    assert again["checkpoint"].endswith("checkpoint_00000012") and again["metrics"] == summary["metrics"]
    assert any("finished before (step 12" in line for line in said), said
    assert resume_steps(tmp_path, "fault") == [4]
    assert [p.name for p in checkpoints(tmp_path, "fault")][-1] == "checkpoint_00000012"
    runs = c.search_runs([c.get_experiment_by_name("fault").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]] == [again["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["audio_jepa.status"] == "succeeded"


def test_incomplete_checkpoint_is_refused(tmp_path):
    cfg = load_config("tiny", SMALL)
    model = AudioJEPA(cfg)
    d = ckpt.save(tmp_path / "c", cfg, model, build_optimizer(model, cfg.optim), 5, 0)
    assert ckpt.load_state(d)["step"] == 5
    (d / ckpt.STATE).write_bytes((d / ckpt.STATE).read_bytes()[:-100])  # crash mid-write
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load_state(d)
    (d / ckpt.MARKER).unlink()
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.load_state(d)


def resume_steps(storage: Path, name: str) -> list[int]:
    return sorted(json.loads(p.read_text())["step"] for p in (storage / name / "resumes").glob("*.json"))


def test_nan_gradients_are_skipped_and_a_damaged_checkpoint_falls_back(clean_corpus_dir, tmp_path):
    over = {"train.steps": 4, "checkpoint.every_steps": 2, "checkpoint.keep": 3, "train.log_every": 1,
            "failure.inject_nan_grad_at_step": 1}
    summary = run_pretraining(cfg_for(clean_corpus_dir, tmp_path, "nan", **over))
    assert summary["status"] == "succeeded", summary["error"]
    assert summary["final_step"] == 4 and summary["metrics"]["skipped_steps"] == 1
    state = ckpt.load_state(summary["checkpoint"])
    model = AudioJEPA(load_config("tiny", SMALL))
    ckpt.restore(state, model)
    assert ckpt.nonfinite_tensors(model) == []  # the NaN step reached neither the weights nor the EMA target
    assert state["skipped_steps"] == 1

    # the newest checkpoint is damaged after the fact: the previous complete one is used, verified by sha256
    newest = tmp_path / "nan" / "checkpoint_00000004" / ckpt.STATE
    newest.write_bytes(newest.read_bytes()[:-64] + b"\0" * 64)  # same size, marker intact: only the hash tells
    cfg = cfg_for(clean_corpus_dir, tmp_path, "nan", **over)
    assert ckpt.latest_checkpoint(cfg).endswith("checkpoint_00000004")  # by its marker: bytes not read
    said = []
    again = run_pretraining(cfg, progress=said.append)  # the driver verifies the resume point's bytes first
    assert any("checkpoint_00000004 is damaged" in line for line in said), said
    assert again["status"] == "succeeded", again["error"]
    assert again["final_step"] == 4 and resume_steps(tmp_path, "nan") == [2]
    assert ckpt.load_state(again["checkpoint"])["step"] == 4  # rewritten, verifies
    assert ckpt.latest_checkpoint(cfg).endswith("checkpoint_00000004")  # the note was about the old bytes


def test_a_stop_no_restart_can_fix_fails_at_once(clean_corpus_dir, tmp_path, mlflow_server):
    from mlflow import MlflowClient
    over = {"train.steps": 6, "checkpoint.every_steps": 1, "train.max_nonfinite": 1, "failure.max_failures": 3,
            "failure.inject_nan_grad_at_step": 2, "mlflow.tracking_uri": mlflow_server}
    summary = run_pretraining(cfg_for(clean_corpus_dir, tmp_path, "stop", **over))
    assert summary["status"] == "failed" and "non-finite gradient norm at step 2" in summary["error"]
    run = MlflowClient(mlflow_server).get_run(summary["mlflow_run_id"])  # closed once, with the final status
    assert run.info.status == "FAILED" and run.data.tags["audio_jepa.status"] == "failed"
    assert not (tmp_path / "stop" / "resumes").exists()  # no worker-group restart was spent on it
    assert [p.name for p in checkpoints(tmp_path, "stop")][-1] == "checkpoint_00000002"
    # resubmitting the failed run (the fault fixed) resumes from its last checkpoint and finishes
    fixed = {**over, "failure.inject_nan_grad_at_step": 0}
    resumed = run_pretraining(cfg_for(clean_corpus_dir, tmp_path, "stop", **fixed))
    assert resumed["status"] == "succeeded", resumed["error"]
    assert resumed["final_step"] == 6 and resume_steps(tmp_path, "stop") == [2]


def test_nonfinite_state_is_never_checkpointed(tmp_path):
    import torch
    cfg = load_config("tiny", SMALL)
    model = AudioJEPA(cfg)
    with torch.no_grad():
        next(model.target_encoder.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(ckpt.CheckpointError, match="non-finite values in target_encoder"):
        ckpt.save(tmp_path / "c", cfg, model, build_optimizer(model, cfg.optim), 5, 0)
    assert not (tmp_path / "c" / ckpt.MARKER).exists()


def test_resubmitting_with_a_changed_config_is_refused_unless_allowed(clean_corpus_dir, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    from service.config import ConfigError
    over = {"train.steps": 2, "checkpoint.every_steps": 2}
    assert run_pretraining(cfg_for(clean_corpus_dir, tmp_path, "cfg", **over))["status"] == "succeeded"
    with pytest.raises(ConfigError) as e:
        run_pretraining(cfg_for(clean_corpus_dir, tmp_path, "cfg", **over, **{"masking.ratio": 0.7,
                                                                               "optim.lr": 0.002}))
    assert "masking.ratio: [0.6, 0.8] -> 0.7" in str(e.value) and "optim.lr: 0.001 -> 0.002" in str(e.value)
    assert "resume.allow_config_change" in str(e.value)
    other = clean_corpus_dir / "a"  # the same run name over other data: old weights, new data
    with pytest.raises(ConfigError, match=f"data.source: '{clean_corpus_dir}' -> '{other}'"):
        run_pretraining(cfg_for(other, tmp_path, "cfg", **over))
    allowed = run_pretraining(cfg_for(clean_corpus_dir, tmp_path, "cfg", **over, **{
        "masking.ratio": 0.7, "resume.allow_config_change": "true", "mlflow.tracking_uri": mlflow_server}))
    assert allowed["status"] == "succeeded", allowed["error"]
    tags = MlflowClient(mlflow_server).get_run(allowed["mlflow_run_id"]).data.tags
    assert json.loads(tags["audio_jepa.config_change.1"]) == {"masking.ratio": [[0.6, 0.8], 0.7]}


@pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter")  # meta: copies are no-ops
def test_the_worker_restores_a_checkpoint_into_a_model_on_another_device(tmp_path):
    """A GPU run's resume, with `meta` standing in for the GPU: the state is loaded on the CPU and placed by
    load_state_dict (loaded onto the device, the RNG state is a device tensor `torch.set_rng_state` refuses,
    and every preemption of a GPU run ended in retries of that error)."""
    from types import SimpleNamespace

    import torch

    from service.worker import WorkerRun
    cfg = load_config("tiny", SMALL)
    model = AudioJEPA(cfg)
    opt = build_optimizer(model, cfg.optim)
    sum(p.square().sum() for p in model.parameters() if p.requires_grad).backward()
    opt.step()  # AdamW now holds moments and step counters
    rng = torch.get_rng_state()
    d = ckpt.save(tmp_path / "c", cfg, model, opt, 7, 1, data_position=56, data_digests=[5, 123])
    torch.manual_seed(99)

    device = torch.device("meta")
    on_device = AudioJEPA(cfg).to(device)
    run = SimpleNamespace(cfg=cfg, rank=1, world=2, device=device, core=on_device,
                          opt=build_optimizer(on_device, cfg.optim))
    WorkerRun._restore(run, str(d))
    assert (run.step, run.epoch, run.data_position, run.data_digest) == (7, 1, 56, 123)
    assert torch.equal(torch.get_rng_state(), rng)  # the RNG continues where the checkpoint left it
    assert {p.device.type for p in on_device.parameters()} == {"meta"}
    moments = list(run.opt.state.values())
    assert moments and all(s["exp_avg"].device.type == "meta" for s in moments)
    assert all(s["step"].device.type == "cpu" for s in moments)  # where torch keeps them: no host sync per step


def test_a_step_reads_the_device_once_and_a_report_reads_the_rest(monkeypatch):
    """Host reads (`.item()`, `float(t)`, …) made by the service's code during steps that report nothing: one
    per step (the ranks' agreement that the step is finite); losses and norms stay on the device until the
    report.  Run on the CPU with the worker's own methods; on a GPU each such read is a sync."""
    import sys

    import numpy as np
    import torch

    import service
    from service.worker import WorkerRun
    cfg = load_config("tiny", SMALL + ["features.mean=-5.0", "features.std=5.0", "loss.var_weight=1.0",
                                       "loss.cov_weight=0.04", "train.batch_size=4", "data.features_in=trainer"])
    run = WorkerRun(cfg, 0, 1, torch.device("cpu"))  # the worker's step without Ray Train around it
    g = torch.Generator().manual_seed(0)
    run.stream = iter([{"x": torch.randn(4, cfg.features.clip_samples, generator=g) * 0.1,
                        "epoch": torch.zeros(4, dtype=torch.int64), "clip": torch.arange(4 * i, 4 * i + 4)}
                       for i in range(6)])
    ours, reads = str(Path(service.__file__).parent), []

    def counted(name, read):
        def wrapper(self, *a, **k):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(ours):
                reads.append(f"{name} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
            return read(self, *a, **k)
        return wrapper
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for _ in range(5):
        run.train_step()
    assert run.step == 5 and run.skipped_steps == 0
    assert len(reads) == 5, reads
    metrics = run.metrics(run.last_h)  # the report reads what accumulated
    monkeypatch.undo()
    assert np.isfinite(metrics["loss"]) and metrics["vc_loss"] > 0 and metrics["grad_norm"] > 0


def test_a_damaged_corpus_segment_stops_the_run_at_once_naming_it(clean_corpus_dir, tmp_path):
    """A checksum failure inside a Ray Data task reaches the trainer wrapped by Ray; the run still ends at once
    (no worker-group restart spent on it), with the shard and the segment named."""
    import pyarrow.parquet as pq

    from service.prepare import PrepareOptions, prepare
    corpus = tmp_path / "corpus"
    prepare(load_config("tiny", [f"data.source={clean_corpus_dir}"]), str(corpus),
            PrepareOptions(segment_seconds=1.0, row_group=2, task_files=2))
    shard = sorted((corpus / "shards").glob("*.parquet"))[0]
    table = pq.read_table(shard).to_pylist()
    pcm = bytearray(table[0]["pcm"])
    pcm[10] ^= 0xFF  # one flipped byte; the recorded crc32 stays
    table[0]["pcm"] = bytes(pcm)
    pq.write_table(pq.ParquetFile(shard).schema_arrow and __import__("pyarrow").Table.from_pylist(
        table, schema=pq.ParquetFile(shard).schema_arrow), shard, row_group_size=2)
    over = {"train.steps": 8, "checkpoint.every_steps": 8, "failure.max_failures": 3, "data.shuffle_blocks": 100}
    summary = run_pretraining(cfg_for(corpus, tmp_path, "damaged", **over))
    assert summary["status"] == "failed"
    assert summary["error"].startswith("DataSourceError") and "fails its checksum" in summary["error"], summary
    assert shard.name in summary["error"] and f"segment {table[0]['segment']} of {table[0]['key']}" in summary["error"]


def test_the_data_and_the_model_resume_from_the_same_checkpoint(clean_corpus_dir, tmp_path):
    """A checkpoint complete on storage that Ray Train never registered (a worker or the driver died between
    the upload and the registration): the dataset factories and the workers both resume from it."""
    import shutil
    from service.prepare import PrepareOptions, prepare
    corpus = tmp_path / "corpus"
    prepare(load_config("tiny", [f"data.source={clean_corpus_dir}"]), str(corpus),
            PrepareOptions(segment_seconds=1.0, row_group=2, task_files=2))
    over = {"train.steps": 8, "checkpoint.every_steps": 2, "checkpoint.keep": 10, "failure.max_failures": 0,
            "data.shuffle_blocks": 2}
    # the run stops after its checkpoint at step 4 (registered); its twin, the same config, after step 6
    for name, kill in (("agree", 5), ("twin", 7)):
        stopped = run_pretraining(cfg_for(corpus, tmp_path, name, **over, **{"failure.inject_kill_at_step": kill}))
        assert stopped["status"] == "failed"
    shutil.copytree(tmp_path / "twin" / "checkpoint_00000006", tmp_path / "agree" / "checkpoint_00000006")
    resumed = run_pretraining(cfg_for(corpus, tmp_path, "agree", **over))
    assert resumed["status"] == "succeeded", resumed["error"]
    assert resumed["final_step"] == 8 and resume_steps(tmp_path, "agree") == [6]
    assert resumed["metrics"]["data_position"] == 8 * 8


def test_every_way_out_closes_the_mlflow_run_with_its_status(clean_corpus_dir, tmp_path, mlflow_server, monkeypatch):
    """An error escaping the driver (here: while fitting) still ends the MLflow run, FAILED, not RUNNING."""
    from mlflow import MlflowClient

    import service.train

    def broken_fit(*args, **kwargs):
        raise RuntimeError("the driver lost its node")
    monkeypatch.setattr(service.train, "_fit", broken_fit)
    cfg = cfg_for(clean_corpus_dir, tmp_path, "escape", **{"train.steps": 2, "mlflow.tracking_uri": mlflow_server,
                                                             "mlflow.experiment": "escape"})
    with pytest.raises(RuntimeError, match="lost its node"):
        run_pretraining(cfg)
    c = MlflowClient(mlflow_server)
    runs = c.search_runs([c.get_experiment_by_name("escape").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.tags["audio_jepa.status"] == "failed"

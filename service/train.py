"""Ray Train (V2) DDP pretraining: the driver.

`run_pretraining` reads as its steps: open the source, check the resume, fit, summarise.  The run's
status is decided in one place (`_outcome`).  Resuming is Ray's: the same RunConfig(name,
storage_path) restores the latest checkpoint, after a worker failure (FailureConfig) or when the same
run name is submitted again; the workers (`service.worker`) continue at the saved step.  A run
submitted again after it finished returns its summary from its newest checkpoint without starting
workers.
"""
from __future__ import annotations

import os
import tempfile
from typing import NamedTuple

import ray
import ray.train
import torch
import yaml
from ray.train.torch import TorchTrainer

from service import checkpoint as ckpt
from service import tracking
from service.config import Config, ConfigError, config_from_dict
from service.features import LogMel
from service.ledger import check_skips, skip_summary, write_skipped_csv
from service.masks import render_masks
from service.raydata import refuse_local_paths
from service.source import open_source
from service.storage import join, ray_storage, read_bytes, uri_for
from service.worker import train_loop_per_worker


class Checkpointed(NamedTuple):
    """A run's newest verified checkpoint: where it is, the config it was trained with, its marker."""
    uri: str
    config: Config
    marker: dict


def run_pretraining(cfg: Config, progress=print, parent_run_id: str | None = None, callbacks=None) -> dict:
    """Open the source, check the resume, fit, summarise; returns the summary dict.

    `parent_run_id` nests the MLflow run (sweeps); `callbacks` are Ray Train callbacks (Tune reporting).
    """
    refuse_local_paths(cfg.worker_paths())
    source = open_source(cfg)
    progress(f"data: {source.describe()}")
    newest = _newest_checkpoint(cfg, progress)
    cfg, changes = _check_resume(cfg, source, newest, progress)
    run_id = tracking.start_or_resume(cfg, parent_run_id=parent_run_id)
    try:
        if changes:
            progress("resuming with a changed config (resume.allow_config_change): " + _describe(changes))
            tracking.record_config_change(cfg, run_id, changes)
        if newest and newest.marker["step"] >= cfg.train.steps:
            return _finished_before(cfg, newest, run_id, source, progress)
        ledger = source.new_ledger()
        result, error = _fit(cfg, source, ledger, run_id, callbacks)
        totals = _totals(ledger, source, progress)
        summary = _summarise(cfg, source, run_id, result, error, totals)
        if totals["skipped"]:
            progress(skip_summary(totals))
        _close(cfg, source, ledger, run_id, summary)
        return summary
    except BaseException:  # every way out closes the MLflow run with its true status, an error's included
        if run_id and not tracking.is_closed(cfg, run_id):
            tracking.close_run(cfg, run_id, "failed")
        raise


def _totals(ledger, source, progress) -> dict:
    """The skip ledger's counts; when the ledger is gone with its node, what the source listed, said so."""
    try:
        return ray.get(ledger.totals.remote())
    except ray.exceptions.RayError as e:
        progress(f"data: the skip ledger was lost ({type(e).__name__}); file and skip counts are unavailable")
        return {"files": source.listed, "files_seen": 0, "clips": 0, "skipped": {}, "examples": {},
                "ledger_lost": True}


def _newest_checkpoint(cfg: Config, progress) -> Checkpointed | None:
    """The run's newest checkpoint whose bytes verify (a resubmission): where the dataset factories and the
    workers will resume; newer damaged ones are noted and passed over.  None when it has none."""
    found = ckpt.verify_latest(cfg, log=progress)
    if not found:
        return None
    uri, marker = found
    config = read_bytes(join(uri, ckpt.CONFIG), cfg.storage.s3_endpoint, cfg.storage.s3_region)
    return Checkpointed(uri, config_from_dict(yaml.safe_load(config)), marker)


def _describe(changes: dict) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


def _check_resume(cfg: Config, source, newest: Checkpointed | None, progress) -> tuple[Config, dict]:
    """The config to train with (normalisation filled in: the resumed run's own, else the source's) and the
    settings that differ from the checkpoint's; a change that would resume old weights under new settings
    is refused unless `resume.allow_config_change`."""
    previous = newest.config if newest else None
    if cfg.features.mean is None:
        if previous is not None and previous.features.mean is not None:
            stats = {"features.mean": previous.features.mean, "features.std": previous.features.std}
        else:
            stats = source.stats(cfg, progress)
        cfg = cfg.with_overrides(stats)
    changes = previous.shaping_changes(cfg) if previous is not None else {}
    if previous is not None and previous.data.source != cfg.data.source:  # other data under the same run
        changes["data.source"] = (previous.data.source, cfg.data.source)
    if changes and not cfg.resume.allow_config_change:
        raise ConfigError(f"run '{cfg.run_name}' in {cfg.checkpoint.storage_path} has checkpoints trained with "
                          "another config; it would resume old weights under new settings: " + _describe(changes)
                          + ". Resubmit with the run's config, use a new run_name, or set "
                          "resume.allow_config_change=true (the change is then recorded on the MLflow run).")
    return cfg, changes


def _fit(cfg: Config, source, ledger, run_id: str | None, callbacks) -> tuple[object | None, Exception | None]:
    """TorchTrainer over the source's per-rank datasets: (result, None), or (None, the error)."""
    datasets, data_config = source.datasets(cfg, ledger)
    storage_path, storage_fs = ray_storage(cfg.checkpoint.storage_path, cfg.storage.s3_endpoint, cfg.storage.s3_region)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "mlflow_run_id": run_id, "tracking_uri": tracking.tracking_uri(cfg),
                           "ledger": ledger, "batches": source.batches},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.failure.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or None),
        datasets=datasets, dataset_config=data_config,
    )
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
        return result, None
    except Exception as e:  # noqa: BLE001 - reported in the summary and re-raised by the job
        return None, e


def _summarise(cfg: Config, source, run_id: str | None, result, error: Exception | None, totals: dict) -> dict:
    summary = {"status": None, "run_name": cfg.run_name, "mlflow_run_id": run_id, "final_step": None,
               "checkpoint": None, "metrics": {}, "data": source.data_summary(totals), "error": None}
    if result is not None and result.checkpoint is not None:
        marker = ckpt.read_marker(result.checkpoint)
        summary.update(checkpoint=uri_for(result.checkpoint.path, cfg.checkpoint.storage_path),
                       final_step=marker["step"], metrics=marker.get("metrics", {}))
    summary["status"], summary["error"] = _outcome(cfg, result, error, summary, totals)
    return summary


def _outcome(cfg: Config, result, error: Exception | None, summary: dict, totals: dict) -> tuple[str, str | None]:
    """The run's status and its reason: failed (an error, a stop no restart could fix, too many skipped
    files), collapsed (the rank floor), else succeeded."""
    fatal = ((result.return_value if result is not None else None) or {}).get("fatal_error")
    if fatal or error is not None:
        return "failed", fatal or f"{type(error).__name__}: {error}"
    if summary["metrics"].get("collapsed"):
        return "collapsed", f"representation collapse at step {summary['final_step']}"
    problem = check_skips(totals, cfg.data)
    return ("failed", problem) if problem else ("succeeded", None)


def _close(cfg: Config, source, ledger, run_id: str | None, summary: dict) -> None:
    """Close the MLflow run with the summary's status, the mask picture and the skipped files."""
    if not (tracking.tracking_uri(cfg) and run_id):
        return
    skipped = source.skipped_files(ledger)
    with tempfile.TemporaryDirectory() as tmp:
        files = [_mask_picture(cfg, source, os.path.join(tmp, "masks.png"))]
        if skipped:
            files.append(write_skipped_csv(skipped, os.path.join(tmp, "skipped.csv")))
        tracking.close_run(cfg, run_id, summary["status"], summary["checkpoint"], summary["data"],
                           tuple(f for f in files if f))


def _finished_before(cfg: Config, newest: Checkpointed, run_id: str | None, source, progress) -> dict:
    """A resubmitted run whose newest checkpoint is at `train.steps`: its summary, without starting any
    worker (on a cluster that would hold GPUs, or wait for them, only to find nothing to train)."""
    step, metrics = newest.marker["step"], newest.marker.get("metrics", {})
    status = "collapsed" if metrics.get("collapsed") else "succeeded"
    progress(f"run {cfg.run_name} finished before (step {step}, {newest.uri}): nothing to train")
    if run_id:
        tracking.close_run(cfg, run_id, status, newest.uri)
    data = source.data_summary({"files": source.listed, "clips": 0, "skipped": {}, "examples": {}})
    return {"status": status, "run_name": cfg.run_name, "mlflow_run_id": run_id, "final_step": step,
            "checkpoint": newest.uri, "metrics": metrics, "data": data, "finished_before": True,
            "error": f"representation collapse at step {step}" if status == "collapsed" else None}


def _mask_picture(cfg: Config, source, path: str) -> str | None:
    """The run's mask geometry drawn on the first decodable clip of its source (a convenience: never fails)."""
    try:
        wav = source.example_clip(cfg)
        if wav is None:
            return None
        fc = cfg.features
        spec = LogMel(fc)(torch.as_tensor(wav)[None])[0]
        return render_masks(spec, fc.grid, (fc.patch_freq, fc.patch_time), cfg.masking, path, seed=cfg.seed)
    except Exception as e:  # noqa: BLE001
        print(f"could not draw masks.png: {type(e).__name__}: {e}", flush=True)
        return None


__all__ = ["run_pretraining"]

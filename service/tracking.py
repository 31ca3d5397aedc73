"""MLflow tracking for pretraining runs.

One MLflow run per pretraining run, found again by the tag `audio_jepa.run_key`
(storage path + run name): Ray Train restarts and resubmissions log into the same run.
Only the driver creates/finishes runs; rank 0 logs metrics with the run id it is given.
"""
from __future__ import annotations

import json
import logging
import os
import time

from service.config import Config

log = logging.getLogger("audio_jepa.tracking")
RUN_KEY = "audio_jepa.run_key"


def tracking_uri(cfg: Config) -> str:
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")


def client(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # created concurrently
        return c.get_experiment_by_name(name).experiment_id


def start_or_resume(cfg: Config, extra_tags: dict | None = None, parent_run_id: str | None = None) -> str | None:
    """The MLflow run id for this pretraining run (created once, reused after failures)."""
    uri = tracking_uri(cfg)
    if not uri:
        return None
    c = client(uri)
    exp = experiment_id(c, cfg.mlflow.experiment)
    key = cfg.run_dir
    run_id = find_run(cfg)
    if run_id:
        c.update_run(run_id, status="RUNNING")
        log.info("resuming MLflow run %s (%s)", run_id, key)
        return run_id
    tags = {RUN_KEY: key, "data.source": cfg.data.source, "config_hash": cfg.hash(), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp, run_name=cfg.run_name, tags=tags)
    log_params(c, run.info.run_id, cfg.flat())
    return run.info.run_id


def find_run(cfg: Config) -> str | None:
    """The MLflow run of this pretraining run (storage path + run name), if it exists."""
    uri = tracking_uri(cfg)
    c = client(uri)
    exp = c.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        return None
    found = c.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY}` = '{cfg.run_dir}'",
                          max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def log_params(c, run_id: str, params: dict) -> None:
    from mlflow.entities import Param
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Best effort: a tracking hiccup must not kill a training step."""
    from mlflow.entities import Metric
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if isinstance(v, (int, float))]
    try:
        client(uri).log_batch(run_id, metrics=items)
    except Exception as e:
        log.warning("MLflow log_metrics failed at step %d: %s", step, e)


def log_artifact(uri: str, run_id: str, path: str, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, path, artifact_path)


def finish(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def plot_history(uri: str, run_id: str, path: str) -> str | None:
    """PNG of loss and the collapse monitors (target std, effective rank) against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("loss", "target_std", "target_erank")
    hist = {k: metric_history(uri, run_id, k) for k in keys}
    if not hist["loss"]:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for ax, k in zip(axes, keys):
        if hist[k]:
            s, v = zip(*hist[k])
            ax.plot(s, v)
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def record_config_change(cfg: Config, run_id: str | None, changes: dict) -> None:
    """A resume under a changed config (resume.allow_config_change), kept on the run: one tag per change
    (`audio_jepa.config_change.<n>`: JSON of key -> [old, new]); params keep the values the run started with."""
    uri = tracking_uri(cfg)
    if not (uri and run_id):
        return
    c = client(uri)
    n = sum(1 for k in c.get_run(run_id).data.tags if k.startswith("audio_jepa.config_change."))
    c.set_tag(run_id, f"audio_jepa.config_change.{n + 1}",
              json.dumps({k: list(v) for k, v in changes.items()}, default=str)[:4900])


def is_closed(cfg: Config, run_id: str) -> bool:
    """Whether the run has ended (FINISHED, FAILED or KILLED)."""
    return client(tracking_uri(cfg)).get_run(run_id).info.status != "RUNNING"


def close_run(cfg: Config, run_id: str, status: str, checkpoint: str | None = None, data: dict | None = None,
              files: tuple[str, ...] = ()) -> None:
    """The end of every pretraining run, whoever ends it: tags, run artifacts (+ `files`), terminated."""
    uri = tracking_uri(cfg)
    c = client(uri)
    if checkpoint:
        c.set_tag(run_id, "audio_jepa.checkpoint", checkpoint)
    if data is not None:
        c.set_tag(run_id, "audio_jepa.data", json.dumps(data, default=str)[:4900])
    try:
        log_run_artifacts(cfg, run_id, files)
    except Exception as e:  # artifacts are a convenience, never a reason to fail the run
        log.warning("could not log run artifacts: %s", e)
    c.set_tag(run_id, "audio_jepa.status", status)
    finish(uri, run_id, "FAILED" if status == "failed" else "FINISHED")


def log_run_artifacts(cfg: Config, run_id: str, files: tuple[str, ...] = ()) -> None:
    """The resolved config YAML, the loss/collapse history plot, and the caller's files (pictures, lists)."""
    import tempfile

    from service.config import to_yaml

    uri = tracking_uri(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = os.path.join(tmp, "config.yaml")
        with open(cfg_path, "w") as f:
            f.write(to_yaml(cfg))
        log_artifact(uri, run_id, cfg_path)
        hist = plot_history(uri, run_id, os.path.join(tmp, "history.png"))
        for path in (*files, *([hist] if hist else [])):
            log_artifact(uri, run_id, path)

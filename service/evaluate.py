"""Evaluate frozen embeddings on labeled tasks, always beside the baselines (random init, log-mel).

Every model goes through the encoder's one readout and the same probes on the same splits; the
metrics are logged on the MLflow run that produced a registered version.
"""
from __future__ import annotations

import os
import time

import numpy as np

from service import tracking
from service.config import load_config
from service.controls import blend_encoder, projection_encoder
from service.encoder import checkpoint_state, load_encoder, random_encoder
from service.features import FEATURES_VERSION, logmel_sums, stats_from_sums
from service.probe import (cached, cached_probes, encoder_features, load_audio, load_task, logmel_features,
                           markdown_table)


def evaluate(model_uri: str, tasks: list[str], config: str | None = None, overrides: list[str] | None = None,
             cache_dir: str | None = None, pooling: str | None = None, endpoint: str | None = None,
             log_to_mlflow: bool = True, progress=print, readout: dict | None = None, controls: bool = False) -> dict:
    """Probe `model_uri` (or only `random` init of `config`) on each task's test split; returns the summary.

    `readout` ({"frames": …, "pooling": …}) reads every model out another way than its config says.
    `controls` adds the study's controls (`service.controls`): `projection` (no network) always, `blend`
    (online encoder and init mixed at the EMA's init weight) when `model_uri` is a checkpoint directory.
    """
    if model_uri == "random":
        if not config:
            raise ValueError("--model-uri random needs --config (the architecture to initialise)")
        cfg = load_config(config, overrides)
        encoder = None
    else:
        encoder = load_encoder(model_uri)
        cfg = encoder.cfg
    if readout:
        cfg = cfg.with_overrides({f"readout.{k}": v for k, v in readout.items()})
        if encoder is not None:
            encoder.cfg = cfg
    if cfg.features.mean is None:  # a random-init config without stats: measured on every task's train split
        cfg = cfg.with_overrides(train_split_stats(tasks, cfg, endpoint))
        progress(f"features.mean/std measured on the train splits of {len(tasks)} task(s): "
                 f"{cfg.features.mean} / {cfg.features.std}")
    results, tables, models = [], [], None
    for task_uri in tasks:
        t0 = time.time()
        task = load_task(task_uri, endpoint)
        wavs, keep = load_audio(task, cfg.features.sample_rate, endpoint)
        y = np.asarray(task.labels)[keep]
        split = np.asarray(task.splits)[keep]
        if models is None:
            rnd = random_encoder(cfg, seed=cfg.seed)
            models = {"jepa": encoder, "random": rnd} if encoder is not None else {"random": rnd}
            if controls:
                models["projection"] = projection_encoder(cfg, seed=cfg.seed)
                if encoder is not None and model_uri != "random" and not model_uri.startswith("models:/"):
                    models["blend"] = blend_encoder(checkpoint_state(model_uri, endpoint))
                    models["blend"].cfg = cfg
            # caches key on what was read: the resolved version and the weights' sha256, never the URI string
            ids = {name: f"{enc.resolved}#{enc.digest()}" for name, enc in models.items()}
        progress(f"task {task.name}: {len(wavs)} clips ({len(task.skipped)} skipped), "
                 f"{len(set(y))} classes, splits {dict(zip(*np.unique(split, return_counts=True)))}")
        rows = []
        for name, enc in models.items():
            key = {"model": ids[name],
                   "task": task_uri, "manifest": task.manifest_sha, "readout": enc.cfg.readout.frames, "layers": enc.cfg.readout.layers,
                   "pooling": pooling or enc.cfg.readout.pooling, "short_audio": enc.cfg.data.short_audio,
                   "version": FEATURES_VERSION}
            X = cached(cache_dir, key, lambda enc=enc: encoder_features(enc, wavs, pooling))
            rows += [{"model": name, **r} for r in cached_probes(cache_dir, key, X, y, split)]
        key = {"model": "logmel", "features": repr(cfg.features), "task": task_uri, "manifest": task.manifest_sha,
               "version": FEATURES_VERSION}
        X = cached(cache_dir, key, lambda: logmel_features(wavs, cfg.features))
        rows += [{"model": "logmel", **r} for r in cached_probes(cache_dir, key, X, y, split)]
        for r in rows:
            r["task"] = task.name
        results += rows
        table = markdown_table(rows, task.name)
        tables.append(table)
        progress(table + f"\n({time.time() - t0:.1f} s)")
    summary = {"status": "succeeded", "model_uri": model_uri, "results": results, "markdown": "\n\n".join(tables)}
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if log_to_mlflow and uri and model_uri.startswith("models:/"):  # to the version read, not where the alias is now
        summary["resolved_model_uri"] = encoder.resolved
        summary["mlflow_run_id"] = log_results(uri, encoder.resolved, results)
    return summary


def train_split_stats(tasks: list[str], cfg, endpoint: str | None = None) -> dict[str, float]:
    """`features.mean/std` pooled over the train clips of all `tasks`, so a random init is normalised the same
    whatever the tasks' order (one pass per task; its audio is decoded again by the probe pass)."""
    sums = [0.0, 0.0, 0]
    for task_uri in tasks:
        task = load_task(task_uri, endpoint)
        wavs, keep = load_audio(task, cfg.features.sample_rate, endpoint)
        for wav, split in zip(wavs, np.asarray(task.splits)[keep]):
            if split == "train":
                sums = [a + b for a, b in zip(sums, logmel_sums(wav, cfg.features))]
    stats = stats_from_sums(*sums)
    if stats is None:
        raise ValueError(f"tasks {', '.join(tasks)}: no decodable train clips to measure features.mean/std on")
    return stats


def log_results(uri: str, model_uri: str, results: list[dict]) -> str | None:
    """Metrics eval.<task>.<model>.<probe>.<metric> on the run that produced the registered version."""
    c = tracking.client(uri)
    name, _, ref = model_uri[len("models:/"):].partition("@")
    mv = c.get_model_version_by_alias(name, ref) if ref else c.get_model_version(*name.split("/", 1))
    if not mv.run_id:
        return None
    for r in results:
        for m in ("accuracy", "macro_f1"):
            c.log_metric(mv.run_id, f"eval.{r['task']}.{r['model']}.{r['probe']}.{m}", r[m])
    return mv.run_id

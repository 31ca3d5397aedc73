"""Evaluate frozen embeddings on labeled tasks, always beside the baselines.

    python -m jobs.evaluate --model-uri models:/audio-jepa@champion --task DIR_OR_S3 [--task …]
    python -m jobs.evaluate --model-uri random --config tiny --task DIR

Prints a table (JEPA vs random-init vs log-mel; linear and kNN; accuracy and macro-F1 on test),
writes Markdown and the summary JSON, and logs the metrics to the model's MLflow run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from jobs.common import die, setup_logging, write_summary


def evaluate(model_uri: str, tasks: list[str], config: str | None = None, overrides: list[str] | None = None,
             cache_dir: str | None = None, pooling: str = "mean", endpoint: str | None = None,
             log_to_mlflow: bool = True, progress=print) -> dict:
    import numpy as np

    from service.config import load_config
    from service.probe import (cached, encoder_features, load_audio, load_task, logmel_features, markdown_table,
                               run_probes)
    from service.registry import load_encoder, random_encoder

    if model_uri == "random":
        if not config:
            raise ValueError("--model-uri random needs --config (the architecture to initialise)")
        cfg = load_config(config, overrides)
        encoder = None
    else:
        encoder = load_encoder(model_uri)
        cfg = encoder.cfg
    rnd = random_encoder(cfg, seed=cfg.seed)
    models = {"jepa": encoder, "random": rnd} if encoder is not None else {"random": rnd}
    results, tables = [], []
    for task_uri in tasks:
        t0 = time.time()
        task = load_task(task_uri, endpoint)
        wavs, keep = load_audio(task, cfg.features.sample_rate, endpoint)
        y = np.asarray(task.labels)[keep]
        split = np.asarray(task.splits)[keep]
        progress(f"task {task.name}: {len(wavs)} clips ({len(task.skipped)} skipped), "
                 f"{len(set(y))} classes, splits {dict(zip(*np.unique(split, return_counts=True)))}")
        rows = []
        for name, enc in models.items():
            key = {"model": model_uri if name == "jepa" else f"random:{cfg.hash()}:{cfg.seed}",
                   "task": task_uri, "manifest": task.manifest_sha, "pooling": pooling}
            X = cached(cache_dir, key, lambda enc=enc: encoder_features(enc, wavs, pooling))
            rows += [{"model": name, **r} for r in run_probes(X, y, split)]
        key = {"model": "logmel", "features": repr(cfg.features), "task": task_uri, "manifest": task.manifest_sha}
        X = cached(cache_dir, key, lambda: logmel_features(wavs, cfg.features))
        rows += [{"model": "logmel", **r} for r in run_probes(X, y, split)]
        for r in rows:
            r["task"] = task.name
        results += rows
        table = markdown_table(rows, task.name)
        tables.append(table)
        progress(table + f"\n({time.time() - t0:.1f} s)")
    summary = {"status": "succeeded", "model_uri": model_uri, "results": results, "markdown": "\n\n".join(tables)}
    if log_to_mlflow and model_uri.startswith("models:/"):
        summary["mlflow_run_id"] = log_results(model_uri, results)
    return summary


def log_results(model_uri: str, results: list[dict]) -> str | None:
    """Metrics eval.<task>.<model>.<probe>.<metric> on the run that produced the registered version."""
    from mlflow import MlflowClient
    c = MlflowClient()
    name, _, ref = model_uri[len("models:/"):].partition("@")
    mv = c.get_model_version_by_alias(name, ref) if ref else c.get_model_version(*name.split("/", 1))
    if not mv.run_id:
        return None
    for r in results:
        for m in ("accuracy", "macro_f1"):
            c.log_metric(mv.run_id, f"eval.{r['task']}.{r['model']}.{r['probe']}.{m}", r[m])
    return mv.run_id


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint dir, random")
    p.add_argument("--task", action="append", required=True, help="task dir or s3:// prefix with manifest.csv")
    p.add_argument("--config", help="config for --model-uri random (YAML or tiny/base)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--pooling", choices=["mean", "meanmax"], default="mean")
    p.add_argument("--cache-dir", default=os.environ.get("AUDIO_JEPA_CACHE", str(Path.home() / ".cache/audio-jepa")))
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--summary-json", type=Path)
    args = p.parse_args(argv)
    setup_logging()
    from service.probe import TaskError
    try:
        summary = evaluate(args.model_uri, args.task, args.config, args.overrides, args.cache_dir, args.pooling,
                           args.s3_endpoint)
    except (TaskError, ValueError, FileNotFoundError) as e:
        write_summary(args.summary_json, {"status": "failed", "error": str(e)})
        die(str(e), 1)
    if args.markdown:
        args.markdown.write_text(summary["markdown"] + "\n")
    write_summary(args.summary_json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

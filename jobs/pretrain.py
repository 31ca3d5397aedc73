"""Pretrain an Audio-JEPA encoder: `python -m jobs.pretrain --config tiny --set data.source=s3://b/p`.

Runs the same under `ray job submit` (joins that cluster) and directly (starts a local Ray).
Resubmitting the same run_name with the same checkpoint.storage_path resumes the run.
"""
from __future__ import annotations

import argparse
import sys

from jobs.common import config_args, die, init_ray, load, setup_logging, write_summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.pretrain", description=__doc__)
    config_args(p)
    args = p.parse_args(argv)
    cfg = load(args)
    if not cfg.data.source:
        die("data.source is empty: pass --set data.source=s3://bucket/prefix (or a local dir or a manifest)")
    setup_logging()
    from service.config import ConfigError
    from service.data import DataSourceError
    from service.train import run_pretraining

    init_ray(min_cpus=cfg.train.workers * cfg.train.cpus_per_worker + 1)
    try:
        summary = run_pretraining(cfg)
    except (DataSourceError, ConfigError) as e:  # nothing a retry could fix: fail before training
        write_summary(args.summary_json, {"status": "failed", "run_name": cfg.run_name, "error": str(e)})
        die(str(e), 1)
    if summary["status"] == "succeeded" and cfg.mlflow.registered_model and summary.get("mlflow_run_id"):
        from service.registry import register_run, registered_version
        # a finished run resubmitted reports the version its checkpoint already has: no second copy
        existing = (registered_version(cfg, summary["mlflow_run_id"], summary["checkpoint"])
                    if summary.get("finished_before") else None)
        summary["registered_model"] = existing or register_run(cfg, summary["mlflow_run_id"], summary["checkpoint"])
    write_summary(args.summary_json, summary)
    if summary["status"] != "succeeded":
        print(f"error: pretraining failed: {summary.get('error')}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

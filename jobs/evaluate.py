"""Evaluate frozen embeddings on labeled tasks, always beside the baselines.

    python -m jobs.evaluate --model-uri models:/audio-jepa@champion --task DIR_OR_S3 [--task …]
    python -m jobs.evaluate --model-uri random --config tiny --task DIR

Prints a table (JEPA vs random-init vs log-mel; linear and kNN; accuracy and macro-F1 on test),
writes Markdown and the summary JSON, and logs the metrics to the model's MLflow run.  A random init whose
config has no `features.mean/std` is normalised with stats pooled over every task's train split.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jobs.common import die, setup_logging, write_summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint dir, random")
    p.add_argument("--task", action="append", required=True, help="task dir or s3:// prefix with manifest.csv")
    p.add_argument("--config", help="config for --model-uri random (YAML or tiny/base)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--pooling", choices=["mean", "meanstd", "meanmax"], default=None,
                   help="clip pooling (default: the model's readout.pooling)")
    p.add_argument("--cache-dir", default=os.environ.get("AUDIO_JEPA_CACHE", str(Path.home() / ".cache/audio-jepa")))
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--summary-json", type=Path)
    args = p.parse_args(argv)
    setup_logging()
    from service.evaluate import evaluate
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

"""Prepare a corpus once: `python -m jobs.prepare --source SRC --out DIR_OR_S3 [--config C]`.

Lists SRC (s3:// prefix, directory or manifest), decodes, downmixes and resamples every file to the
config's sample rate once, cuts long files into segments and writes Parquet shards, an index and
`corpus.json` (files, segments, hours, skips by reason, log-mel mean/std).  Training reads the corpus
when `data.source` points at OUT.  Re-running resumes: finished tasks are kept.  Runs the same under
`ray job submit`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.common import die, init_ray, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__)
    p.add_argument("--source", required=True, help="raw audio: s3://bucket/prefix, a directory or a manifest")
    p.add_argument("--out", required=True, help="corpus directory or s3:// prefix")
    p.add_argument("--config", default="tiny", help="sample rate and bad-input limits come from it (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set data.max_skip_fraction=0.2")
    p.add_argument("--segment-seconds", type=float, default=10.0, help="segment length (default 10)")
    p.add_argument("--row-group", type=int, default=64, help="segments per Parquet row group (default 64)")
    p.add_argument("--shard-mb", type=float, default=128.0, help="shard size (default 128 MB)")
    p.add_argument("--task-files", type=int, default=1000, help="files per task at most (default 1000)")
    p.add_argument("--task-mb", type=float, default=256.0, help="source MB per task at most (default 256)")
    p.add_argument("--summary-json", type=Path, help="write corpus.json's summary (without the block list) here too")
    args = p.parse_args(argv)
    from service.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, [*args.overrides, f"data.source={args.source}"])
    except ConfigError as e:
        die(str(e))
    setup_logging()
    from service.prepare import PrepareOptions, prepare
    from service.data import DataSourceError

    try:
        opts = PrepareOptions(args.segment_seconds, args.row_group, args.shard_mb, args.task_mb, args.task_files)
        opts.validate()
    except ValueError as e:
        die(str(e))
    init_ray(min_cpus=2)
    try:
        summary = prepare(cfg, args.out, opts)
    except DataSourceError as e:
        die(str(e), 1)
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps({k: v for k, v in summary.items()
                                                 if k not in ("blocks", "skipped_files")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sweep pretraining settings with Ray Tune: `python -m jobs.sweep --config tuning/mask_ratio_geometry.yaml`.

Trials are full pretraining runs scored by the downstream probe (valid split of `probe.task`).
Running the same command again resumes an interrupted sweep without repeating finished trials.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from jobs.common import die, init_ray, setup_logging, write_summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__)
    p.add_argument("--config", required=True, help="sweep YAML (tuning/…) or its name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base pretraining config for every trial")
    p.add_argument("--summary-json", type=Path)
    args = p.parse_args(argv)
    from service.config import ConfigError
    from service.sweep import load_sweep, run_sweep, trial_cpus
    try:
        sweep, base = load_sweep(args.config, args.overrides)
    except ConfigError as e:
        die(str(e))
    setup_logging()
    per_trial = trial_cpus(base)
    if not os.environ.get("RAY_ADDRESS"):
        # a private local Ray: trials run as many at a time as the real cores fit, and logical CPUs are
        # declared for every trial so a placement group left behind by a finished trial cannot starve
        # the next one (Ray Train's own clean-up of it can lose a race when the trial actor exits)
        if sweep.max_concurrent == 0:
            sweep.max_concurrent = max(1, (os.cpu_count() or 1) // per_trial)
        n_trials = sweep.search.num_samples * (math.prod(len(next(iter(v.values()))) for v in sweep.search.params.values())
                                               if sweep.search.algorithm == "grid" else 1)
        init_ray(min_cpus=min(per_trial * (n_trials + 1), 256))
    else:
        init_ray()
    summary = run_sweep(sweep, base)
    print(f"{'run':40s} {'params':60s} {'status':14s} {'step':>6s} {'probe':>7s}")
    for r in summary["trials"]:
        params = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["params"].items())
        print(f"{r['run_name']:40s} {params:60s} {r['status']:14s} {r['step']:6d} {r['best_probe_score']:7.3f}")
    if summary.get("best"):
        print(f"best: {summary['best']['run_name']} {summary['best']['params']} "
              f"probe {summary['best']['best_probe_score']:.3f}")
    write_summary(args.summary_json, summary)
    return 0 if summary["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())

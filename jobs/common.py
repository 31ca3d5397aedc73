"""Shared CLI plumbing for the jobs: config arguments, Ray connection, summary JSON, exit codes."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from service.config import Config, ConfigError, load_config

# Framework chatter off at the default log level.  Read at import or worker start, so set when this module is
# imported (before ray.data / mlflow are) and shipped to every Ray worker through the runtime env.
QUIET_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",            # Train V2's print() writes each line twice (stdout + log)
    "RAY_DATA_LOG_LEVEL": "WARNING",                # "Starting execution of Dataset…", execution plans
    "RAY_TQDM": "0",                                # Ray Data progress bars: a line per update in job logs
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a line per downloaded file in job logs
    "MLFLOW_LOGGING_LEVEL": "WARNING",              # `import mlflow` resets its logger to INFO otherwise
    "PYTHONWARNINGS": "ignore:`ExecutionOptions.exclude_resources` is deprecated",  # Ray-internal
}
for _k, _v in QUIET_ENV.items():
    os.environ.setdefault(_k, _v)

PASS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
            "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL")


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML path or shipped config name (tiny, base)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--summary-json", type=Path, help="write the run's outcome as one JSON object")


def load(args) -> Config:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        die(str(e))


def tracking_uri_or_die(explicit: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI; a clear error when neither is set."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        die("no tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return uri


def die(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("ray.data", "ray.train", "ray.tune", "urllib3", "botocore", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def init_ray(min_cpus: int = 1) -> None:
    """Join the cluster in RAY_ADDRESS (what `ray job submit` sets), else start a private local Ray.

    Never joins a cluster merely recorded on this machine.  Locally, at least `min_cpus` logical
    CPUs are declared so Train workers and Ray Data tasks cannot starve each other on 2 cores.
    """
    import ray
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in PASS_ENV + tuple(QUIET_ENV) if k in os.environ}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env}, log_to_driver=True, logging_level=logging.WARNING)
    else:
        # the dashboard (127.0.0.1 only) serves the state API that Ray Train's placement-group
        # cleaner needs; without it a finished run's CPUs stay reserved and later runs starve
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, min_cpus), include_dashboard=True,
                 dashboard_host="127.0.0.1", runtime_env={"env_vars": env}, logging_level=logging.WARNING)


def write_summary(path: Path | None, summary: dict) -> None:
    text = json.dumps(summary, indent=2, default=str)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print("summary: " + json.dumps({k: summary.get(k) for k in ("status", "run_name", "final_step", "checkpoint",
                                                                  "mlflow_run_id", "registered_model")},
                                   default=str), flush=True)

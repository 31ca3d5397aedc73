"""Shared CLI plumbing for the jobs: config arguments, Ray connection, summary JSON, exit codes."""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from cluster.procs import RAY_LOOPBACK_ENV, write_private
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
if not os.environ.get("RAY_ADDRESS"):
    # run directly: the private Ray must listen on 127.0.0.1 only, and Ray reads this when imported.  (Under
    # `ray job submit` the driver must find its node by the cluster's address, so it is left alone there.)
    for _k, _v in RAY_LOOPBACK_ENV.items():
        os.environ.setdefault(_k, _v)

# Settings a job's Ray workers get from the driver, through the job's runtime_env.  Never credentials: the
# runtime_env is job metadata that anyone who can list jobs reads (`ray list jobs --detail`, the dashboard).
# Workers get AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY/SESSION_TOKEN and MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN
# from the cluster's own environment (cluster/local.py's head, Kubernetes Secrets, instance roles), or, for a
# job run directly, by inheriting the job's environment through its private Ray.
PASS_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI",
            "MLFLOW_S3_ENDPOINT_URL")


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
    The private Ray listens on 127.0.0.1 only, with token authentication (a fresh token in a 0600 file),
    and is shut down when the job is stopped with SIGTERM or Ctrl-C.
    """
    import ray
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in PASS_ENV + tuple(QUIET_ENV) if k in os.environ}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env}, log_to_driver=True, logging_level=logging.WARNING)
        return
    _private_token()
    # the dashboard (127.0.0.1 only) serves the state API that Ray Train's placement-group
    # cleaner needs; without it a finished run's CPUs stay reserved and later runs starve
    _start_private_ray(address="local", _node_ip_address="127.0.0.1", num_cpus=max(os.cpu_count() or 1, min_cpus),
                       include_dashboard=True, dashboard_host="127.0.0.1", runtime_env={"env_vars": env},
                       logging_level=logging.WARNING)
    gcs = ray.get_runtime_context().gcs_address
    if not gcs.startswith("127.0.0.1:"):
        logging.getLogger(__name__).warning(
            "the private Ray listens on %s, not only 127.0.0.1: `ray` was imported before jobs.common, so it "
            "missed %s", gcs, ", ".join(f"{k}={v}" for k, v in RAY_LOOPBACK_ENV.items()))
    _shutdown_ray_on_signals()


def _start_private_ray(attempts: int = 3, **init_args) -> None:
    """ray.init for a new local node, tried again when the node does not come up on a loaded machine.

    Ray 2.60's raylet gives its dashboard agent a fixed 15 s to start and exits when it is slower (all
    CPUs busy: ray-project/ray#65983); ray.init then reports "The current node timed out during start-up".
    The half-started node's processes are stopped before the next try.
    """
    import ray
    from ray._private.node import Node
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**init_args)
            return
        except Exception as e:  # noqa: BLE001 - only Ray's start-up timeout is retried
            if attempt == attempts or "timed out during startup" not in str(e):
                raise
            tb = e.__traceback__
            while tb is not None:  # the Node that raised holds the processes it started
                node = tb.tb_frame.f_locals.get("self")
                if isinstance(node, Node):
                    node.kill_all_processes(check_alive=False)
                    break
                tb = tb.tb_next
            ray.shutdown()
            logging.getLogger(__name__).warning("the local Ray node did not start (%s); the machine may be "
                                                "overloaded, starting it again (%d of %d)", e, attempt + 1, attempts)


def _private_token() -> None:
    """A fresh token for the private Ray, in a 0600 file in a 0700 directory that goes when the job ends.

    Not Ray's default ~/.ray/auth_token: that one Ray writes with the umask's mode (world-readable) and shares
    with every other Ray of the user.  RayConfig was read when `ray` was imported, so it is re-read (as Ray's
    own token setup does) for this process to send the token too.
    """
    from ray._raylet import Config
    d = tempfile.mkdtemp(prefix="audio-jepa-ray-auth-")
    write_private(Path(d) / "token", secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(Path(d) / "token"))
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    Config.initialize("")

    def cleanup() -> None:  # registered after `import ray`, so it runs before Ray's own atexit
        import ray
        ray.shutdown()
        shutil.rmtree(d, ignore_errors=True)
    atexit.register(cleanup)


def _shutdown_ray_on_signals() -> None:
    """SIGTERM / Ctrl-C: shut the private Ray down, then exit 128+signal.

    Ray's own SIGTERM handler only raises SystemExit and leaves the shutdown to atexit, which a job blocked in
    a Ray call or holding up the exit does not reach in time.  A second signal kills at once.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        import ray
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        ray.shutdown()
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, stop)


def write_summary(path: Path | None, summary: dict) -> None:
    text = json.dumps(summary, indent=2, default=str)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print("summary: " + json.dumps({k: summary.get(k) for k in ("status", "run_name", "final_step", "checkpoint",
                                                                  "mlflow_run_id", "registered_model")},
                                   default=str), flush=True)

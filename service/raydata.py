"""Shims around Ray that every job of ours uses: paths refused that other nodes cannot reach, quiet
progress output, a scheduling loop that does not spin in the trainer's process (`data.calm_loop`), and
object-store values fetched once per worker process."""
from __future__ import annotations

import time

import ray

from service.config import ConfigError


def refuse_local_paths(paths: dict[str, str]) -> None:
    """On a Ray cluster of more than one node, refuse paths on this machine's disk among `paths` (a dotted key
    or option -> path or URI): the workers on other nodes cannot read or write them.  Checked before any work
    starts; without it a local source ends as every file "missing", a local probe task as a retried
    FileNotFoundError on rank 0, a local storage path as checkpoints no other node can restore."""
    local = {k: v for k, v in paths.items() if v and "://" not in v}
    if not local:
        return
    if not ray.is_initialized():
        ray.init()  # what the first Ray call would do anyway: the nodes are those of the cluster it joins
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1:
        raise ConfigError(f"{', '.join(f'{k}={v}' for k, v in local.items())}: a path on this machine's disk, and "
                          f"this Ray cluster has {nodes} nodes; workers on the other nodes cannot read or write it. "
                          "On a cluster of several nodes, data, tasks, checkpoints and outputs live in object storage "
                          "(s3://bucket/prefix; storage.s3_endpoint for S3-compatible stores).")


def quiet_ray_data() -> None:
    """Our own training log line replaces Ray Data's per-operator progress bars (a line per update in logs)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def calm_streaming_executor(pause_s: float = 0.05) -> bool:
    """Make Ray Data's scheduling loop pause `pause_s` after each step while its consumer has output waiting.

    Ray Data 2.60's loop (`StreamingExecutor._scheduling_loop_step`) does not block while backpressure
    keeps it from reading output that tasks in flight have ready: it spins, using a core in the process
    that iterates the dataset. For our per-rank streams that process is the trainer. On the 2-core
    reference machine a 2400-step `tiny` run from shards trained at ~20 clips/s instead of ~42 until
    its stream's last blocks were produced. A consumer with a batch waiting loses nothing to the
    pause; a starving one gets the loop at full speed. Idempotent; returns False and changes nothing
    if this Ray lacks the method."""
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return False
    step = getattr(StreamingExecutor, "_scheduling_loop_step", None)
    if step is None or not hasattr(StreamingExecutor, "_consumer_idling"):
        return False
    if getattr(step, "calm", False):
        return True

    def calm_step(self, topology):
        more = step(self, topology)
        if more and not self._consumer_idling():
            time.sleep(pause_s)
        return more

    calm_step.calm, calm_step.plain = True, step
    StreamingExecutor._scheduling_loop_step = calm_step
    return True


_FETCHED: dict = {}


def fetch_once(value):
    """An object-store value fetched once per worker process (keyed by the ref's id: every task receives a
    new ObjectRef object for the same value); plain values pass through."""
    if not isinstance(value, ray.ObjectRef):
        return value
    if value.hex() not in _FETCHED:
        _FETCHED.clear()
        _FETCHED[value.hex()] = ray.get(value)
    return _FETCHED[value.hex()]

"""Rehearsal faults (`failure.inject_*`), for fire drills and tests: kill one worker process once at a
step, or make one step's gradients non-finite.

`install` wraps the worker's own methods only when a fault is configured, so a normal run's step has
no fault code in it at all.
"""
from __future__ import annotations

import json
import os
import signal
import time

import ray.train

from service.config import Config
from service.storage import join, read_bytes, write_bytes


def install(run) -> None:
    """Hook the configured faults into a `WorkerRun` (its `next_batch` and `backward`)."""
    f = run.cfg.failure
    if f.inject_kill_at_step > 0 and run.rank == f.inject_kill_rank:
        next_batch = run.next_batch

        def next_batch_or_die():
            if run.step == f.inject_kill_at_step:
                _kill_once(run.cfg, run.step, run.rank)
            return next_batch()
        run.next_batch = next_batch_or_die
    if f.inject_nan_grad_at_step > 0 and run.rank == 0:
        backward = run.backward

        def backward_then_nan(loss):
            backward(loss)
            if run.step == f.inject_nan_grad_at_step:
                print(f"[fault injection] NaN gradients on rank 0 at step {run.step}", flush=True)
                run.trainable[0].grad.fill_(float("nan"))
        run.backward = backward_then_nan


def _kill_once(cfg: Config, step: int, rank: int) -> None:
    """SIGKILL this worker process, once per run (a marker in the run directory remembers it)."""
    marker = join(cfg.run_dir, f"fault_injected_at_step_{cfg.failure.inject_kill_at_step}")
    try:
        read_bytes(marker, cfg.storage.s3_endpoint, retries=1)
        return  # already injected once
    except (FileNotFoundError, OSError):
        pass
    write_bytes(marker, json.dumps({"step": step, "rank": rank, "time": time.time()}).encode(), cfg.storage.s3_endpoint)
    ray.train.get_all_reported_checkpoints()  # a rehearsal kills after the last checkpoint is registered
    print(f"[fault injection] killing worker rank {rank} at step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

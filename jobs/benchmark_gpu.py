"""`python -m jobs.benchmark gpu`: the one prepared check of a GPU, in a single short run.

On the trainer's device (CUDA when present, else the CPU) it measures, in the same run:
  - the card's matmul rate (bf16 on a GPU; fp32 and bf16 on a CPU),
  - the train step of the worker itself (`service.worker.WorkerRun`, not a copy): clips/s and its model
    FLOP rate as a fraction of the matmul rate (MFU), eager and with `train.compile`,
  - the trainer's log-mel front end (`data.features_in: trainer`), clips/s,
  - a checkpoint saved on the device and restored on the device: the step, the losses of the steps
    after it and the RNG continue as in an uninterrupted run,
  - NCCL all-reduce bus bandwidth when the machine has more than one GPU.
It prints a table and writes JSON with the device's name.  On a GPU use `--config base`; the test suite
runs it on the CPU at toy size (`--config tiny` with a small model).
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from service.config import Config, load_config
from service.features import LogMel
from service.model import model_flops_per_clip
from service.worker import WorkerRun


def matmul_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batches(cfg: Config, per_worker: int, device: torch.device, position: int = 0):
    """A rank's batches as the source adapters deliver them (x on the device, bookkeeping on the host), each
    a function of the seed and its stream position, so a restored run sees exactly what the original saw."""
    fc = cfg.features
    shape = (fc.clip_samples,) if cfg.data.features_in == "trainer" else (fc.n_mels, fc.n_frames)
    while True:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + position)
        x = torch.randn(per_worker, *shape, generator=g)
        x = x * 0.1 if cfg.data.features_in == "trainer" else x
        yield {"x": x.to(device, non_blocking=True), "epoch": torch.zeros(per_worker, dtype=torch.int64),
               "clip": torch.arange(position, position + per_worker)}
        position += per_worker


def local_run(cfg: Config, device: torch.device) -> WorkerRun:
    """The worker of a 1-rank run on `device`, fed synthetic batches from where its state stands."""
    run = WorkerRun(cfg, 0, 1, device)
    run.stream = synthetic_batches(cfg, run.per_worker, device, run.data_position)
    return run


def step_rate(cfg: Config, device: torch.device, steps: int, warmup: int) -> tuple[float, list[float]]:
    """(steady train-step clips/s of the worker's own step on `device`, the loss of every step)."""
    run = local_run(cfg, device)
    for _ in range(warmup):
        run.train_step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        run.train_step()
    _sync(device)
    return steps * run.per_worker / (time.perf_counter() - t0), [float(v) for v in run.meter.values["loss"]]


def resume_check(cfg: Config, device: torch.device, steps: int) -> dict:
    """Train `steps`, checkpointing on the device halfway; restore that checkpoint into a fresh worker on the
    device and train to the end.  The step, the losses after the checkpoint and the RNG must continue."""
    cut = max(steps // 2, 1)
    with tempfile.TemporaryDirectory() as tmp:
        first = local_run(cfg, device)
        for _ in range(cut):
            first.train_step()
        first.save(tmp, {})
        for _ in range(steps - cut):
            first.train_step()
        want = [float(v) for v in first.meter.values["loss"][cut:]]
        rng_want = torch.get_rng_state()
        second = WorkerRun(cfg, 0, 1, device)
        second._restore(tmp)
        second.stream = synthetic_batches(cfg, second.per_worker, device, second.data_position)
        restored_step = second.step
        for _ in range(steps - cut):
            second.train_step()
        got = [float(v) for v in second.meter.values["loss"]]
    diff = max(abs(a - b) for a, b in zip(want, got)) if got else float("nan")
    return {"checkpoint_step": cut, "restored_step": restored_step, "final_step": second.step,
            "losses_after_restore": got, "losses_uninterrupted": want, "loss_max_abs_diff": diff,
            "losses_equal": want == got, "rng_equal": bool(torch.equal(torch.get_rng_state(), rng_want)),
            "optimizer_steps_on_cpu": all(s["step"].device.type == "cpu" for s in second.opt.state.values())}


def _allreduce_worker(rank: int, world: int, port: int, mb: int, out) -> None:
    import torch.distributed as dist
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    x = torch.ones(mb * 2 ** 20 // 4, device="cuda")
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / reps
    if rank == 0:  # bus bandwidth, as nccl-tests defines it for all-reduce
        out.put(x.numel() * 4 * 2 * (world - 1) / world / seconds / 1e9)
    dist.destroy_process_group()


def nccl_busbw_gbps(mb: int = 256) -> float | None:
    """NCCL all-reduce bus bandwidth across this machine's GPUs (None with fewer than two)."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return None
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_allreduce_worker, args=(n, port, mb, out), nprocs=n, join=True, start_method="spawn")
    return out.get()


def bench_gpu(args, emit) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg = load_config(args.config, args.overrides + ["masking.ratio=0.5", "train.workers=1"]
                      + ([] if any(o.startswith("features.mean") for o in args.overrides)
                         else ["features.mean=-5.0", "features.std=5.0"]))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    steps, warmup = args.steps, 3
    n = cfg.features.grid[0] * cfg.features.grid[1]
    flops = model_flops_per_clip(cfg, n - round(0.5 * n), round(0.5 * n))
    res: dict = {"device": name, "config": args.config, "batch": cfg.train.batch_size, "tokens": n,
                 "model_gflop_per_clip": flops / 1e9, "torch": torch.__version__,
                 "cuda": torch.version.cuda if device.type == "cuda" else None}
    precisions = ["bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    # measured before and after the steps, the better kept (a shared machine's noise only ever slows it)
    res["matmul_tflops"] = {p: matmul_tflops(device, dtypes[p]) for p in precisions}
    res["train"] = {}
    for precision in precisions:
        eager = None
        for compiled in (False, True):
            c = cfg.with_overrides({"train.precision": precision, "train.compile": compiled})
            rate, losses = step_rate(c, device, steps, warmup)
            eager = eager or losses
            res["train"][f"{precision}{'+compile' if compiled else ''}"] = {
                "clips_per_s": rate, "losses": losses,
                "loss_max_abs_diff_vs_eager": max(abs(a - b) for a, b in zip(losses, eager))}
    for p in precisions:
        res["matmul_tflops"][p] = max(res["matmul_tflops"][p], matmul_tflops(device, dtypes[p]))
    for k, v in res["train"].items():  # model FLOP rate as a fraction of the matmul rate of its precision
        v["mfu"] = v["clips_per_s"] * flops / (res["matmul_tflops"][k.split("+")[0]] * 1e12)
    fc = cfg.with_overrides({"data.features_in": "trainer"}).features
    wav = torch.randn(cfg.train.batch_size, fc.clip_samples).mul_(0.1).to(device)
    fe = LogMel(fc).to(device)
    fe(wav)
    _sync(device)
    t0, reps = time.perf_counter(), 0
    while reps < 3 or time.perf_counter() - t0 < 2.0:
        fe(wav)
        reps += 1
    _sync(device)
    res["features_clips_per_s"] = reps * wav.shape[0] / (time.perf_counter() - t0)
    res["resume"] = resume_check(cfg.with_overrides({"train.precision": precisions[-1]}), device, max(steps, 4))
    res["nccl_busbw_gbps"] = nccl_busbw_gbps()
    rows = [("device", f"{name} (torch {res['torch']}{', CUDA ' + res['cuda'] if res['cuda'] else ''})"),
            ("config", f"{args.config}: batch {res['batch']}, {n} tokens, "
                       f"{res['model_gflop_per_clip']:.2f} GFLOP per clip per step"),
            ("matmul TFLOP/s", ", ".join(f"{k} {v:.2f}" for k, v in res["matmul_tflops"].items()))]
    rows += [(f"train step {k}: clips/s (MFU)", f"{v['clips_per_s']:.1f} ({v['mfu']:.2f})"
              + (f"; losses vs eager: max diff {v['loss_max_abs_diff_vs_eager']:.1e}" if "compile" in k else ""))
             for k, v in res["train"].items()]
    r = res["resume"]
    rows += [("log-mel on the device: clips/s", f"{res['features_clips_per_s']:.1f}"),
             ("checkpoint on the device, restored", f"step {r['checkpoint_step']} -> {r['restored_step']} -> "
                                                    f"{r['final_step']}; losses equal {r['losses_equal']} (max diff "
                                                    f"{r['loss_max_abs_diff']:.2e}); RNG equal {r['rng_equal']}"),
             ("NCCL all-reduce bus bandwidth", "n/a (one GPU or none)" if res["nccl_busbw_gbps"] is None
              else f"{res['nccl_busbw_gbps']:.1f} GB/s")]
    emit(res, rows, args.json)

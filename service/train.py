"""Ray Train (V2) DDP pretraining: the per-worker step loop and the driver that launches it.

Resuming is Ray's: the same RunConfig(name, storage_path) restores the latest checkpoint, after a
worker failure (FailureConfig) or when the same run name is submitted again.  The loop then
continues at the saved global step with the saved optimiser state; every schedule (LR, WD, tau) and
every mask draw is a function of the global step, so nothing drifts across restarts.
"""
from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time

import numpy as np
import torch

from service import checkpoint as ckpt
from service import tracking
from service.config import Config, config_from_dict
from service.features import LogMel, patchify
from service.masks import MaskGenerator
from service.model import AudioJEPA, collapse_stats
from service.optim import apply_schedules, build_optimizer, tau_at
from service.storage import is_remote, join, ray_storage, read_bytes, write_bytes


class NonFiniteLoss(RuntimeError):
    pass


def _fault_marker(cfg: Config) -> str:
    return join(cfg.checkpoint.storage_path, f"{cfg.run_name}/fault_injected_at_step_{cfg.failure.inject_kill_at_step}")


def _maybe_inject_fault(cfg: Config, step: int, rank: int) -> None:
    """Kill this worker process once at the configured step (rehearsal / tests)."""
    f = cfg.failure
    if f.inject_kill_at_step <= 0 or step != f.inject_kill_at_step or rank != f.inject_kill_rank:
        return
    marker = _fault_marker(cfg)
    try:
        read_bytes(marker, cfg.data.s3_endpoint, retries=1)
        return  # already injected once
    except (FileNotFoundError, OSError):
        pass
    write_bytes(marker, json.dumps({"step": step, "rank": rank, "time": time.time()}).encode(), cfg.data.s3_endpoint)
    import ray.train
    ray.train.get_all_reported_checkpoints()  # a rehearsal kills after the last checkpoint is registered
    print(f"[fault injection] killing worker rank {rank} at step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _write_resume_record(cfg: Config, record: dict) -> None:
    """<storage>/<run>/resumes/step_<S>_<time>.json: where a run resumed, with state checksums."""
    name = f"{cfg.run_name}/resumes/step_{record['step']:08d}_{int(time.time())}.json"
    write_bytes(join(cfg.checkpoint.storage_path, name), json.dumps(record).encode(), cfg.data.s3_endpoint)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train_loop_per_worker(loop_cfg: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = config_from_dict(loop_cfg["config"])
    run_id, uri, ledger = loop_cfg.get("mlflow_run_id"), loop_cfg.get("tracking_uri"), loop_cfg.get("ledger")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.threads_per_worker or cfg.train.cpus_per_worker)
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)  # identical init on every rank

    model = AudioJEPA(cfg).to(device)
    opt = build_optimizer(model, cfg.optim)
    step, epoch = 0, 0
    resume_record = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            step, epoch = ckpt.restore(ckpt.load_state(d, map_location=device), model, opt)
        if rank == 0:
            print(f"resumed from checkpoint at step {step}", flush=True)
            resume_record = {"step": step, "epoch": epoch, "tau": tau_at(step, cfg.train.steps, cfg.ema),
                             "restored_time": time.time(), **ckpt.fingerprint(model, opt)}
    core = model
    model = ray.train.torch.prepare_model(model) if world > 1 else model
    trainable = [p for p in core.parameters() if p.requires_grad]

    total = cfg.train.steps
    per_worker = cfg.train.batch_size // world
    frontend = LogMel(cfg.features).to(device) if cfg.data.features_in == "trainer" else None
    masks = MaskGenerator(cfg.masking, cfg.features.grid)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    shard = ray.train.get_dataset_shard("train")

    def batches():
        while True:  # more passes than planned if many files were skipped
            got = False
            for b in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, prefetch_batches=2,
                                              device=str(device)):
                got = True
                yield b
            if not got:
                raise RuntimeError("the dataset produced no full batch: every file was skipped or "
                                   f"there are fewer than {per_worker} clips")

    stream = batches()
    probe = None
    if cfg.probe.task and rank == 0:
        from service.probe import TrainingProbe
        probe = TrainingProbe(cfg.probe.task, cfg.features.sample_rate, cfg.probe.kind, cfg.probe.max_clips,
                              cfg.data.s3_endpoint, cfg.seed)
        print(f"probe: {len(probe.wavs)} clips of task {probe.name} (score: valid {cfg.probe.kind} accuracy)",
              flush=True)
    collapsed = False
    probe_last = 0.0 if cfg.probe.task else None
    window = {"t0": time.time(), "wait": 0.0, "clips": 0, "losses": [], "gnorm": [], "ratio": []}
    nonfinite = 0
    t_start, step_start = time.time(), step

    def report(metrics: dict, with_ckpt: bool) -> None:
        if with_ckpt:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    ckpt.save(tmp, cfg, core, opt, step, epoch, metrics=metrics)
                checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")
        else:
            ray.train.report(metrics)

    while step < total:
        _maybe_inject_fault(cfg, step, rank)
        t_wait = time.time()
        batch = next(stream)
        window["wait"] += time.time() - t_wait
        x = batch["x"].float()
        epoch = int(batch["epoch"][-1])
        with torch.no_grad():
            spec = frontend(x) if frontend is not None else x
            patches = patchify(spec, cfg.features.patch_freq, cfg.features.patch_time)
        m = masks(per_worker, np.random.default_rng([cfg.seed, step, rank]))
        ctx_idx, tgt_idx = m.context.to(device), m.target.to(device)
        sched = apply_schedules(opt, step, cfg)
        with autocast:
            loss, h = model(patches, ctx_idx, tgt_idx)
        finite = torch.tensor([float(torch.isfinite(loss).item())], device=device)
        if world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            nonfinite += 1
            opt.zero_grad(set_to_none=True)
            msg = f"non-finite loss at step {step} ({nonfinite} in a row)"
            if rank == 0:
                print(msg + ": step skipped", flush=True)
            if nonfinite >= cfg.train.max_nonfinite:
                raise NonFiniteLoss(msg + f"; stopping (train.max_nonfinite={cfg.train.max_nonfinite})")
            step += 1
            continue
        nonfinite = 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip if cfg.optim.grad_clip > 0
                                               else float("inf"))
        opt.step()
        step += 1
        tau = tau_at(step, total, cfg.ema)
        core.ema_update(tau)
        window["losses"].append(loss.item())
        window["gnorm"].append(float(gnorm))
        window["ratio"].append(m.ratio)
        window["clips"] += per_worker * world
        if resume_record is not None:  # written after the first step: it also times the recovery
            _write_resume_record(cfg, {**resume_record, "first_step_time": time.time()})
            resume_record = None

        last = step == total
        do_probe = cfg.probe.task and ((cfg.probe.every_steps and step % cfg.probe.every_steps == 0) or last)
        do_log = step % cfg.train.log_every == 0 or last or do_probe
        do_ckpt = step % cfg.checkpoint.every_steps == 0 or last
        if not (do_log or do_ckpt):
            continue
        lv = torch.tensor([float(np.mean(window["losses"]))], device=device)
        if world > 1:
            dist.all_reduce(lv)
            lv /= world
        elapsed = max(time.time() - window["t0"], 1e-9)
        metrics = {"loss": lv.item(), "lr": sched["lr"], "wd": sched["wd"], "tau": tau,
                   "grad_norm": float(np.mean(window["gnorm"])), "mask_ratio": float(np.mean(window["ratio"])),
                   "clips_per_s": window["clips"] / elapsed, "data_wait_fraction": window["wait"] / elapsed,
                   "epoch": epoch, "step": step, **collapse_stats(h)}
        window = {"t0": time.time(), "wait": 0.0, "clips": 0, "losses": [], "gnorm": [], "ratio": []}
        if cfg.train.min_erank > 0:  # collapse: any rank's target embeddings below the rank floor
            flag = torch.tensor([float(metrics["target_erank"] < cfg.train.min_erank)], device=device)
            if world > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            collapsed = flag.item() > 0
            metrics["collapsed"] = float(collapsed)
            do_ckpt = do_ckpt or collapsed
        if probe_last is not None:
            metrics["probe_score"] = probe_last  # every report carries a score for the early stopper
        if do_probe:
            if rank == 0:
                from service.registry import AudioEncoder
                t_probe = time.time()
                enc = AudioEncoder(cfg, core.target_encoder.state_dict(), device)
                metrics.update(probe.score(enc))
                window["t0"] += time.time() - t_probe  # probing is not training time
            scores = torch.tensor([metrics.get("probe_score", 0.0)], device=device)
            if world > 1:
                dist.broadcast(scores, src=0)
            metrics["probe_score"] = probe_last = scores.item()
        if rank == 0:
            if ledger is not None:
                import ray
                from service.data import DataSourceError, check_skips
                totals = ray.get(ledger.totals.remote())
                metrics.update({"data_files_seen": totals["files_seen"], "data_clips": totals["clips"],
                                "data_skipped": sum(totals["skipped"].values())})
                problem = check_skips(totals, cfg.data.max_skip_fraction)
                if problem:
                    raise DataSourceError(problem)
            rate = (step - step_start) / max(time.time() - t_start, 1e-9)
            print(f"step {step}/{total} ({100 * step / total:.0f}%) loss {metrics['loss']:.4f} "
                  f"lr {metrics['lr']:.2e} tau {tau:.5f} gnorm {metrics['grad_norm']:.2f} "
                  f"mask {metrics['mask_ratio']:.2f} clips/s {metrics['clips_per_s']:.1f} "
                  f"wait {100 * metrics['data_wait_fraction']:.0f}% std {metrics['target_std']:.3f} "
                  f"erank {metrics['target_erank']:.1f} ETA {_fmt_eta((total - step) / max(rate, 1e-9))}",
                  flush=True)
            if uri and run_id:
                tracking.log_metrics(uri, run_id, metrics, step)
        if collapsed and rank == 0:
            print(f"collapsed at step {step}: target effective rank {metrics['target_erank']:.2f} < "
                  f"train.min_erank={cfg.train.min_erank}; stopping", flush=True)
        report(metrics, with_ckpt=do_ckpt)
        if collapsed:
            break

    if step_start >= total:  # resubmitted after it finished: nothing to train
        if resume_record is not None:
            _write_resume_record(cfg, resume_record)
        ray.train.report({"step": step, "already_finished": 1})


def run_pretraining(cfg: Config, progress=print, parent_run_id: str | None = None, callbacks=None) -> dict:
    """Driver: list the source, build the stream, run TorchTrainer, return the summary dict.

    `parent_run_id` nests the MLflow run (sweeps); `callbacks` are Ray Train callbacks (Tune reporting).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from service.data import DataLedger, DataSourceError, build_dataset, check_skips, list_source

    if not cfg.data.source:
        raise DataSourceError("data.source is empty: pass --set data.source=s3://bucket/prefix (or a dir/manifest)")
    listing = list_source(cfg.data)
    progress(f"data: {len(listing.files)} audio files in {cfg.data.source} "
             f"({listing.ignored_by_extension} other files ignored, {len(listing.too_large)} too large)")
    ledger = DataLedger.remote(len(listing.files) + len(listing.too_large), [f.uri for f in listing.too_large])
    dataset = build_dataset(cfg, listing, ledger)
    run_id = tracking.start_or_resume(cfg, parent_run_id=parent_run_id)
    uri = tracking.tracking_uri(cfg)
    storage_path, storage_fs = ray_storage(cfg.checkpoint.storage_path, cfg.data.s3_endpoint, cfg.data.s3_region)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "mlflow_run_id": run_id, "tracking_uri": uri, "ledger": ledger},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.failure.max_failures),
            callbacks=callbacks or None),
        datasets={"train": dataset},
    )
    status, error = "succeeded", None
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except Exception as e:  # noqa: BLE001 - reported in the summary and re-raised by the job
        status, error, result = "failed", e, None
    totals = ray.get(ledger.totals.remote())
    summary = {
        "status": status, "run_name": cfg.run_name, "mlflow_run_id": run_id,
        "final_step": None, "checkpoint": None, "metrics": {},
        "data": {"files": totals["files"], "clips": totals["clips"], "skipped": totals["skipped"],
                 "skipped_examples": totals["examples"]},
        "error": None if error is None else f"{type(error).__name__}: {error}",
    }
    if result is not None and result.checkpoint is not None:
        path = result.checkpoint.path
        summary["checkpoint"] = f"s3://{path}" if is_remote(cfg.checkpoint.storage_path) else path
        marker = ckpt.read_marker(result.checkpoint)
        summary["final_step"] = marker["step"]
        summary["metrics"] = marker.get("metrics", {})
    if status == "succeeded" and summary["metrics"].get("collapsed"):
        summary.update(status="collapsed", error=f"representation collapse at step {summary['final_step']}")
    if status == "succeeded":
        problem = check_skips(totals, cfg.data.max_skip_fraction)
        if problem:
            summary.update(status="failed", error=problem)
    if uri and run_id:
        tracking.close_run(cfg, run_id, summary["status"], summary["checkpoint"], summary["data"],
                           _example_clip(cfg, listing))
    if math.isnan(summary["metrics"].get("loss", 0.0)):
        summary["status"] = "failed"
    return summary


def _example_clip(cfg: Config, listing):
    """The first decodable clip of the source, for the mask-geometry picture."""
    from service.audio import Skip, crop_rng, crops, decode
    for f in listing.files[:20]:
        try:
            wav = decode(read_bytes(f.uri, cfg.data.s3_endpoint, cfg.data.s3_region), cfg.features.sample_rate)
        except (Skip, OSError):
            continue
        return crops(wav, cfg.features.clip_samples, 1, crop_rng(cfg.seed, 0, f.key))[0]
    return None

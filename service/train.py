"""Ray Train (V2) DDP pretraining: the per-worker step loop and the driver that launches it.

Resuming is Ray's: the same RunConfig(name, storage_path) restores the latest checkpoint, after a
worker failure (FailureConfig) or when the same run name is submitted again.  The loop then
continues at the saved global step with the saved optimiser state; every schedule (LR, WD, tau) and
every mask draw is a function of the global step, so nothing drifts across restarts.  A run submitted
again after it finished returns its summary from its newest checkpoint without starting workers.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import zlib
from functools import partial

import numpy as np
import torch

from service import checkpoint as ckpt
from service import tracking
from service.config import Config, ConfigError, config_from_dict
from service.features import LogMel, patchify
from service.masks import MaskGenerator, render_masks
from service.model import AudioJEPA, collapse_stats
from service.optim import apply_schedules, build_optimizer, tau_at
from service.storage import join, ray_storage, read_bytes, uri_for, write_bytes


class NonFiniteLoss(RuntimeError):
    pass


class RunStopped(RuntimeError):
    """An error a restart cannot fix: every rank stops, the run fails at once (no `failure.max_failures` spent)."""


def _fault_marker(cfg: Config) -> str:
    return join(cfg.run_dir, f"fault_injected_at_step_{cfg.failure.inject_kill_at_step}")


def _maybe_inject_fault(cfg: Config, step: int, rank: int) -> None:
    """Kill this worker process once at the configured step (rehearsal / tests)."""
    f = cfg.failure
    if f.inject_kill_at_step <= 0 or step != f.inject_kill_at_step or rank != f.inject_kill_rank:
        return
    marker = _fault_marker(cfg)
    try:
        read_bytes(marker, cfg.storage.s3_endpoint, retries=1)
        return  # already injected once
    except (FileNotFoundError, OSError):
        pass
    write_bytes(marker, json.dumps({"step": step, "rank": rank, "time": time.time()}).encode(), cfg.storage.s3_endpoint)
    import ray.train
    ray.train.get_all_reported_checkpoints()  # a rehearsal kills after the last checkpoint is registered
    print(f"[fault injection] killing worker rank {rank} at step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _write_resume_record(cfg: Config, record: dict) -> None:
    """<storage>/<run>/resumes/step_<S>_<time>.json: where a run resumed, with state checksums."""
    name = f"resumes/step_{record['step']:08d}_{int(time.time())}.json"
    write_bytes(join(cfg.run_dir, name), json.dumps(record).encode(), cfg.storage.s3_endpoint)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def agree(value: float, op: str, device) -> float:
    """One float agreed by every rank: op is sum | mean | min | max (a no-op on a single worker)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                           "max": dist.ReduceOp.MAX}[op])
    return t.item() / (dist.get_world_size() if op == "mean" else 1)


def gather(value: int, device) -> list[int]:
    """Every rank's integer, in rank order (a one-element list on a single worker)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [int(value)]
    out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([int(value)], dtype=torch.int64, device=device))
    return [int(v.item()) for v in out]


def constant_fraction(patches: torch.Tensor, idx: torch.Tensor) -> float:
    """Fraction of the patches at `idx` that are constant (digital silence or padding): nothing to learn."""
    constant = (patches.amax(-1) - patches.amin(-1)) < 1e-6  # [B, N]
    return torch.gather(constant, 1, idx).float().mean().item()


class Window:
    """Per-step figures between two reports (averaged), clips and data-wait time."""

    def __init__(self):
        self.t0, self.wait, self.clips = time.time(), 0.0, 0
        self.values: dict[str, list[float]] = {}

    def add(self, clips: int, **values: float) -> None:
        self.clips += clips
        for k, v in values.items():
            self.values.setdefault(k, []).append(v)

    def pause(self, seconds: float) -> None:
        """Time that is not training (probing) does not count in the throughput."""
        self.t0 += seconds

    def metrics(self) -> dict[str, float]:
        elapsed = max(time.time() - self.t0, 1e-9)
        return {**{k: float(np.mean(v)) for k, v in self.values.items()}, "clips_per_s": self.clips / elapsed,
                "data_wait_fraction": self.wait / elapsed}


class WorkerRun:
    """One Ray Train worker's share of a pretraining run: set-up/restore, steps, metrics, probe, reports."""

    def __init__(self, loop_cfg: dict):
        import ray.train
        import ray.train.torch

        cfg = self.cfg = config_from_dict(loop_cfg["config"])
        self.run_id, self.uri, self.ledger = (loop_cfg.get("mlflow_run_id"), loop_cfg.get("tracking_uri"),
                                              loop_cfg.get("ledger"))
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(cfg.train.threads_per_worker or cfg.train.cpus_per_worker)
        self.device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
        torch.manual_seed(cfg.seed)  # identical init on every rank

        self.core = AudioJEPA(cfg).to(self.device)
        self.opt = build_optimizer(self.core, cfg.optim)
        self.step, self.epoch, self.resume_record, self.skipped_steps = 0, 0, None, 0
        self.data_position, self.data_digest = 0, 0  # clips this rank consumed; crc32 chain of their ids
        self._restore(ray.train.get_checkpoint())
        self.model = ray.train.torch.prepare_model(self.core) if self.world > 1 else self.core
        self.trainable = [p for p in self.core.parameters() if p.requires_grad]

        self.total = cfg.train.steps
        self.per_worker = cfg.train.batch_size // self.world
        self.frontend = LogMel(cfg.features).to(self.device) if cfg.data.features_in == "trainer" else None
        self.masks = MaskGenerator(cfg.masking, cfg.features.grid)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        self.prepared = bool(loop_cfg.get("prepared"))
        if cfg.data.calm_loop:  # this process iterates the rank's stream, so its Ray Data executor runs here
            from service.data import calm_streaming_executor
            calm_streaming_executor()
        self.stream = (self._corpus_batches(ray.train.get_dataset_shard(f"train.{self.rank}")) if self.prepared
                       else self._batches(ray.train.get_dataset_shard("train")))
        self.probe = self._probe() if cfg.probe.task and self.rank == 0 else None
        self.probe_last = 0.0 if cfg.probe.task else None
        self.window, self.nonfinite, self.collapsed, self.last_h = Window(), 0, False, None
        self.t_start, self.step_start = time.time(), self.step

    # --- set-up ------------------------------------------------------------------------------
    def _restore(self, restored) -> None:
        """Continue from Ray's latest checkpoint; if it does not verify, from the newest one that does."""
        if restored is None:
            return
        say = print if self.rank == 0 else (lambda *a, **k: None)
        try:
            with restored.as_directory() as d:
                state = ckpt.load_state(d, map_location=self.device)
        except ckpt.CheckpointError as e:
            name = os.path.basename(restored.path.rstrip("/"))
            say(f"checkpoint {name} is damaged ({e}); falling back to the previous complete one", flush=True)
            found = ckpt.load_latest(self.cfg, exclude=(name,), map_location=self.device, log=say)
            if found is None:
                raise ckpt.CheckpointError(f"run {self.cfg.run_name}: {name} is damaged and no earlier checkpoint "
                                           "verifies; use a new run_name to start afresh") from e
            state, uri = found
            say(f"falling back to {uri}", flush=True)
        self.step, self.epoch = ckpt.restore(state, self.core, self.opt)
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.data_position = int(state.get("data_position", 0))
        digests = state.get("data_digests") or []
        self.data_digest = int(digests[self.rank]) if len(digests) == self.world else 0
        if self.rank == 0:
            print(f"resumed from checkpoint at step {self.step}", flush=True)
            self.resume_record = {"step": self.step, "epoch": self.epoch,
                                  "tau": tau_at(self.step, self.cfg.train.steps, self.cfg.ema),
                                  "restored_time": time.time(), **ckpt.fingerprint(self.core, self.opt)}

    def _batches(self, shard):
        while True:  # more passes than planned if many files were skipped
            got = False
            for b in shard.iter_torch_batches(batch_size=self.per_worker, drop_last=True, prefetch_batches=2,
                                              device=str(self.device)):
                got = True
                yield b
            if not got:
                raise RuntimeError("the dataset produced no full batch: every file was skipped or "
                                   f"there are fewer than {self.per_worker} clips")

    def _corpus_batches(self, shard):
        """A prepared corpus's stream: it starts where the checkpoint Ray Train restored left it (the
        dataset factory read the same checkpoint); batches before that are dropped, a gap is an error."""
        for b in shard.iter_torch_batches(batch_size=self.per_worker, drop_last=True, prefetch_batches=2,
                                          device=str(self.device)):
            first = int(b["pos"][0])
            if first < self.data_position:
                continue
            if first > self.data_position:
                raise RunStopped(f"rank {self.rank}: the data stream starts at clip {first} but the restored "
                                 f"checkpoint consumed {self.data_position}; resubmit the run")
            yield b
        raise RunStopped(f"rank {self.rank}: the prepared corpus stream ended at clip {self.data_position} "
                         f"before step {self.total}")

    def _probe(self):
        from service.probe import TrainingProbe
        c = self.cfg
        probe = TrainingProbe(c.probe.task, c.features.sample_rate, c.probe.kind, c.probe.max_clips,
                              c.storage.s3_endpoint, c.seed)
        print(f"probe: {len(probe.wavs)} clips of task {probe.name} (score: valid {c.probe.kind} accuracy)",
              flush=True)
        return probe

    # --- one step ----------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor | None:
        """One optimiser step on the next batch; the latest good step's target tokens (None before any).

        A step whose loss or gradient norm is not finite on any rank is skipped by every rank: no
        optimiser step, no EMA update, counted in `skipped_steps`."""
        cfg = self.cfg
        _maybe_inject_fault(cfg, self.step, self.rank)
        t_wait = time.time()
        batch = next(self.stream)
        self.window.wait += time.time() - t_wait
        self.data_position += self.per_worker
        self.data_digest = zlib.crc32(batch["clip"].cpu().numpy().astype("<i8").tobytes(), self.data_digest)
        x = batch["x"]
        x = x.float() / 32767.0 if x.dtype == torch.int16 else x.float()  # prepared corpora send int16 PCM
        self.epoch = int(batch["epoch"][-1])
        with torch.no_grad():
            spec = self.frontend(x) if self.frontend is not None else x
            patches = patchify(spec, cfg.features.patch_freq, cfg.features.patch_time)
        m = self.masks(self.per_worker * cfg.masking.per_clip, np.random.default_rng([cfg.seed, self.step, self.rank]))
        ctx, tgt = m.context.to(self.device), m.target.to(self.device)
        self.sched = apply_schedules(self.opt, self.step, cfg)
        with self.autocast:
            loss, h, parts = self.model(patches, ctx, tgt)
        self.opt.zero_grad(set_to_none=True)
        if agree(float(torch.isfinite(loss).item()), "min", self.device) < 1:
            self._skip_nonfinite("loss")
            return self.last_h
        loss.backward()
        if 0 < cfg.failure.inject_nan_grad_at_step == self.step and self.rank == 0:
            print(f"[fault injection] NaN gradients on rank 0 at step {self.step}", flush=True)
            self.trainable[0].grad.fill_(float("nan"))
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        if agree(float(torch.isfinite(gnorm).item()), "min", self.device) < 1:
            self.opt.zero_grad(set_to_none=True)
            self._skip_nonfinite("gradient norm")
            return self.last_h
        self.nonfinite = 0
        self.opt.step()
        self.step += 1
        self.core.ema_update(tau_at(self.step, self.total, cfg.ema))
        self.window.add(self.per_worker * self.world, loss=loss.item(), grad_norm=float(gnorm), mask_ratio=m.ratio,
                        **{k: v.item() for k, v in parts.items()},
                        target_silence_fraction=constant_fraction(patches.repeat_interleave(cfg.masking.per_clip, 0), tgt))
        if self.resume_record is not None:  # written after the first step: it also times the recovery
            _write_resume_record(cfg, {**self.resume_record, "first_step_time": time.time()})
            self.resume_record = None
        self.last_h = h
        return h

    def _skip_nonfinite(self, what: str) -> None:
        self.nonfinite += 1
        self.skipped_steps += 1
        msg = f"non-finite {what} at step {self.step} ({self.nonfinite} in a row)"
        if self.rank == 0:
            print(msg + ": step skipped", flush=True)
        if self.nonfinite >= self.cfg.train.max_nonfinite:
            raise NonFiniteLoss(msg + f"; stopping (train.max_nonfinite={self.cfg.train.max_nonfinite})")
        self.step += 1

    # --- metrics, probe, report --------------------------------------------------------------
    def due(self) -> tuple[bool, bool, bool]:
        """(log, probe, checkpoint) due after the step just taken."""
        c, last = self.cfg, self.step == self.total
        do_probe = bool(c.probe.task) and ((c.probe.every_steps and self.step % c.probe.every_steps == 0) or last)
        do_log = self.step % c.train.log_every == 0 or last or do_probe
        return do_log, do_probe, self.step % c.checkpoint.every_steps == 0 or last

    def metrics(self, h: torch.Tensor) -> dict[str, float]:
        """The window's figures (loss averaged over ranks), schedules, collapse monitors; resets the window."""
        c = self.cfg
        metrics = {"loss": float("nan"), "grad_norm": float("nan"), "mask_ratio": float("nan"),  # window all skipped
                   **self.window.metrics(), **self.sched, "tau": tau_at(self.step, self.total, c.ema),
                   "epoch": self.epoch, "step": self.step, "skipped_steps": self.skipped_steps,
                   "data_position": self.data_position, **collapse_stats(h)}
        for k in ("loss", "jepa_loss", "vc_loss"):
            if k in metrics:
                metrics[k] = agree(metrics[k], "mean", self.device)
        # one number for "which clips, in which order, on which rank": equal runs, equal digest
        metrics["data_digest"] = agree(self.data_digest * (self.rank + 1), "sum", self.device)
        self.window = Window()
        if c.train.min_erank > 0:  # collapse: any rank's target embeddings below the rank floor
            self.collapsed = agree(float(metrics["target_erank"] < c.train.min_erank), "max", self.device) > 0
            metrics["collapsed"] = float(self.collapsed)
        if self.probe_last is not None:
            metrics["probe_score"] = self.probe_last  # every report carries a score for the early stopper
        return metrics

    def run_probe(self, metrics: dict) -> None:
        """Score the target encoder on the task's valid split (rank 0) and share the score with every rank."""
        if self.rank == 0:
            from service.encoder import AudioEncoder
            t_probe = time.time()
            exported = self.core.encoder if self.cfg.ema.export == "online" else self.core.target_encoder
            enc = AudioEncoder(self.cfg, exported.state_dict(), self.device)
            metrics.update(self.probe.score(enc))
            self.window.pause(time.time() - t_probe)
        score = metrics.get("probe_score", 0.0)
        if self.world > 1:
            import torch.distributed as dist
            t = torch.tensor([score], device=self.device)
            dist.broadcast(t, src=0)
            score = t.item()
        metrics["probe_score"] = self.probe_last = score

    def log(self, metrics: dict) -> None:
        """Rank 0: data ledger figures, the progress line, MLflow metrics.  Every rank: stop (RunStopped)
        when rank 0 finds the skip threshold exceeded."""
        problem = self._log(metrics) if self.rank == 0 else None
        if agree(float(problem is not None), "max", self.device) > 0:
            raise RunStopped(problem or "stopped by rank 0 (too many skipped files)")

    def _log(self, metrics: dict) -> str | None:
        problem = None
        if self.ledger is not None:
            import ray
            from service.data import check_skips
            totals = ray.get(self.ledger.totals.remote())
            metrics.update({"data_files_seen": totals["files_seen"], "data_clips": totals["clips"],
                            "data_skipped": sum(totals["skipped"].values())})
            problem = check_skips(totals, self.cfg.data)
        rate = (self.step - self.step_start) / max(time.time() - self.t_start, 1e-9)
        print(f"step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%) loss {metrics['loss']:.4f} "
              f"lr {metrics['lr']:.2e} tau {metrics['tau']:.5f} gnorm {metrics['grad_norm']:.2f} "
              f"mask {metrics['mask_ratio']:.2f} clips/s {metrics['clips_per_s']:.1f} "
              f"wait {100 * metrics['data_wait_fraction']:.0f}% std {metrics['target_std']:.3f} "
              f"erank {metrics['target_erank']:.1f} ETA {_fmt_eta((self.total - self.step) / max(rate, 1e-9))}"
              + (f" skipped {self.skipped_steps}" if self.skipped_steps else ""), flush=True)
        if self.uri and self.run_id:
            tracking.log_metrics(self.uri, self.run_id, metrics, self.step)
        if self.collapsed:
            print(f"collapsed at step {self.step}: target effective rank {metrics['target_erank']:.2f} < "
                  f"train.min_erank={self.cfg.train.min_erank}; stopping", flush=True)
        return problem

    def report(self, metrics: dict, with_ckpt: bool) -> None:
        """ray.train.report, with a checkpoint written by rank 0 when due."""
        import ray.train
        if not with_ckpt:
            ray.train.report(metrics)
            return
        bad = ckpt.nonfinite_tensors(self.core, self.opt)
        if agree(float(bool(bad)), "max", self.device) > 0:
            raise RunStopped(f"step {self.step}: non-finite values in {', '.join(bad[:3]) or 'another rank'}; "
                             "not checkpointed (the previous checkpoint stays the latest)")
        digests = gather(self.data_digest, self.device)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                ckpt.save(tmp, self.cfg, self.core, self.opt, self.step, self.epoch, metrics=metrics,
                          skipped_steps=self.skipped_steps, data_position=self.data_position, data_digests=digests)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{self.step:08d}")

    def finished_before(self) -> None:
        """Restored at the last step (a worker group restarted after the final checkpoint; a plain
        resubmission of a finished run never starts workers): one report so the run ends cleanly."""
        import ray.train
        if self.resume_record is not None:
            _write_resume_record(self.cfg, self.resume_record)
        ray.train.report({"step": self.step, "already_finished": 1})


def train_loop_per_worker(loop_cfg: dict) -> dict | None:
    """Runs on every Ray Train worker; returns {"fatal_error": …} when the run stopped for a reason a
    restart cannot fix (rank 0's return value reaches the driver as `Result.return_value`)."""
    import logging
    # Train logs every report ("Reporting training result … TrainingReport(…)") at INFO under a logger
    # named by its file path, which Train's own level setting misses; our progress line says it once
    logging.getLogger().setLevel(logging.WARNING)
    from service.data import DataSourceError
    try:
        run = WorkerRun(loop_cfg)
        if run.step >= run.total:
            run.finished_before()
            return
        while run.step < run.total:
            h = run.train_step()
            if h is None:
                continue
            do_log, do_probe, do_ckpt = run.due()
            if not (do_log or do_ckpt):
                continue
            metrics = run.metrics(h)
            if do_probe:
                run.run_probe(metrics)
            run.log(metrics)
            run.report(metrics, with_ckpt=do_ckpt or run.collapsed)
            if run.collapsed:
                break
    except (RunStopped, NonFiniteLoss, ckpt.CheckpointError, DataSourceError) as e:
        # every rank raises these at the same step: end the run with the reason instead of a worker failure
        # that Ray would retry `failure.max_failures` times to the same end
        print(f"stopping: {type(e).__name__}: {e}", flush=True)
        return {"fatal_error": f"{type(e).__name__}: {e}"}
    return None


def run_pretraining(cfg: Config, progress=print, parent_run_id: str | None = None, callbacks=None) -> dict:
    """Driver: list the source, build the stream, run TorchTrainer, return the summary dict.

    `parent_run_id` nests the MLflow run (sweeps); `callbacks` are Ray Train callbacks (Tune reporting).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from service import corpus as prepared_corpus
    from service.data import (DataLedger, DataSourceError, check_skips, list_source, put_listing,
                              skip_summary, write_skipped_csv)

    if not cfg.data.source:
        raise DataSourceError("data.source is empty: pass --set data.source=s3://bucket/prefix (or a dir/manifest)")
    corpus, listing = None, None
    if prepared_corpus.is_corpus(cfg.data.source, cfg.storage):
        corpus = prepared_corpus.load_corpus(cfg.data.source, cfg)
        progress(f"data: prepared corpus {cfg.data.source}: {corpus['files']} files, {corpus['segments']} segments, "
                 f"{corpus['hours']:.2f} h ({sum(corpus['skipped'].values())} files skipped when it was prepared)")
    else:
        listing = list_source(cfg)
        progress(f"data: {len(listing.files)} audio files in {cfg.data.source} "
                 f"({listing.ignored_by_extension} other files ignored, {len(listing.too_large)} too large)")
    newest = _newest_checkpoint(cfg)
    previous = newest[1] if newest else None
    if cfg.features.mean is None:
        cfg = cfg.with_overrides(_normalisation_stats(cfg, previous, listing, corpus, progress))
    changes = previous.shaping_changes(cfg) if previous is not None else {}
    if changes and not cfg.resume.allow_config_change:
        raise ConfigError(f"run '{cfg.run_name}' in {cfg.checkpoint.storage_path} has checkpoints trained with "
                          "another config; it would resume old weights under new settings: "
                          + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
                          + ". Resubmit with the run's config, use a new run_name, or set "
                          "resume.allow_config_change=true (the change is then recorded on the MLflow run).")
    run_id = tracking.start_or_resume(cfg, parent_run_id=parent_run_id)
    if changes:
        progress("resuming with a changed config (resume.allow_config_change): "
                 + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        tracking.record_config_change(cfg, run_id, changes)
    if newest and newest[2]["step"] >= cfg.train.steps:
        return _finished_before(cfg, newest[0], newest[2], run_id, corpus, listing, progress)
    # datasets are factories: Ray Train calls them at every worker-group start, so after a failure the
    # stream is rebuilt from the checkpoint being restored (a prepared corpus: exactly there; raw: its pass)
    if corpus is not None:
        ledger = DataLedger.remote(corpus["listed"], [])
        blocks = ray.put(corpus["blocks"])
        datasets = {f"train.{r}": partial(_corpus_dataset, cfg, corpus["segment_seconds"], blocks, r, ledger)
                    for r in range(cfg.train.workers)}
        ingest = ray.train.DataConfig.default_ingest_options()
        ingest.preserve_order = True  # each rank's clip sequence is a function of the seed
        data_config = ray.train.DataConfig(datasets_to_split=[], execution_options={k: ingest for k in datasets})
    else:
        ledger = DataLedger.remote(len(listing.files) + len(listing.too_large), [f.uri for f in listing.too_large])
        datasets = {"train": partial(_raw_dataset, cfg, put_listing(listing), ledger)}
        data_config = ray.train.DataConfig()
    uri = tracking.tracking_uri(cfg)
    storage_path, storage_fs = ray_storage(cfg.checkpoint.storage_path, cfg.storage.s3_endpoint, cfg.storage.s3_region)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "mlflow_run_id": run_id, "tracking_uri": uri, "ledger": ledger,
                           "prepared": corpus is not None},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.failure.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or None),
        datasets=datasets, dataset_config=data_config,
    )
    status, error = "succeeded", None
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except Exception as e:  # noqa: BLE001 - reported in the summary and re-raised by the job
        status, error, result = "failed", e, None
    fatal = (getattr(result, "return_value", None) or {}).get("fatal_error") if result is not None else None
    totals = ray.get(ledger.totals.remote())
    summary = {
        "status": status, "run_name": cfg.run_name, "mlflow_run_id": run_id,
        "final_step": None, "checkpoint": None, "metrics": {},
        "data": _data_summary(cfg, corpus, totals),
        "error": fatal or (None if error is None else f"{type(error).__name__}: {error}"),
    }
    if fatal:
        status = summary["status"] = "failed"
    if result is not None and result.checkpoint is not None:
        path = result.checkpoint.path
        summary["checkpoint"] = uri_for(path, cfg.checkpoint.storage_path)
        marker = ckpt.read_marker(result.checkpoint)
        summary["final_step"] = marker["step"]
        summary["metrics"] = marker.get("metrics", {})
    if status == "succeeded" and summary["metrics"].get("collapsed"):
        summary.update(status="collapsed", error=f"representation collapse at step {summary['final_step']}")
    if status == "succeeded":
        problem = check_skips(totals, cfg.data)
        if problem:
            summary.update(status="failed", error=problem)
    skipped = ray.get(ledger.skipped_files.remote()) if corpus is None else \
        [tuple(row) for row in corpus["skipped_files"]]
    if skipped and corpus is None:
        progress(skip_summary(totals))
    if uri and run_id:
        with tempfile.TemporaryDirectory() as tmp:
            files = [_mask_picture(cfg, listing, corpus, os.path.join(tmp, "masks.png"))]
            if skipped:
                files.append(write_skipped_csv(skipped, os.path.join(tmp, "skipped.csv")))
            tracking.close_run(cfg, run_id, summary["status"], summary["checkpoint"], summary["data"],
                               tuple(f for f in files if f))
    return summary


def _finished_before(cfg: Config, checkpoint: str, marker: dict, run_id: str | None, corpus, listing,
                     progress) -> dict:
    """A resubmitted run whose newest checkpoint is at `train.steps`: its summary, without starting any
    worker (on a cluster that would hold GPUs, or wait for them, only to find nothing to train)."""
    metrics = marker.get("metrics", {})
    status = "collapsed" if metrics.get("collapsed") else "succeeded"
    progress(f"run {cfg.run_name} finished before (step {marker['step']}, {checkpoint}): nothing to train")
    if run_id:
        tracking.close_run(cfg, run_id, status, checkpoint)
    listed = corpus["listed"] if corpus is not None else len(listing.files) + len(listing.too_large)
    data = _data_summary(cfg, corpus, {"files": listed, "clips": 0, "skipped": {}, "examples": []})
    return {"status": status, "run_name": cfg.run_name, "mlflow_run_id": run_id, "final_step": marker["step"],
            "checkpoint": checkpoint, "metrics": metrics, "data": data,
            "error": f"representation collapse at step {marker['step']}" if status == "collapsed" else None}


def _data_summary(cfg: Config, corpus: dict | None, totals: dict) -> dict:
    """The summary's `data`: raw sources from the run's ledger totals; a prepared corpus from its index
    (files and skips were counted when it was prepared) plus the clips the run consumed."""
    if corpus is None:
        return {"files": totals["files"], "clips": totals["clips"], "skipped": totals["skipped"],
                "skipped_examples": totals["examples"]}
    return {"files": corpus["listed"], "clips": totals["clips"], "skipped": corpus["skipped"],
            "skipped_examples": corpus["skipped_examples"], "prepared": cfg.data.source}


def _newest_checkpoint(cfg: Config) -> tuple[str, Config, dict] | None:
    """The run's newest verified checkpoint (a resubmission): its URI, config and marker; None when none."""
    import yaml
    found = ckpt.latest_checkpoint(cfg)
    if not found:
        return None
    read = partial(read_bytes, endpoint=cfg.storage.s3_endpoint, region=cfg.storage.s3_region)
    return (found, config_from_dict(yaml.safe_load(read(join(found, ckpt.CONFIG)))),
            json.loads(read(join(found, ckpt.MARKER))))


def _resume_point(cfg: Config) -> dict:
    """Marker of the run's newest verified checkpoint ({} when none): where a rebuilt stream starts.  The
    factories of one worker-group start share one look-up (cached while the checkpoint list is unchanged)."""
    key = (cfg.run_dir, tuple(ckpt.checkpoint_dirs(cfg)))
    if key not in _RESUME_POINTS:
        found = ckpt.latest_checkpoint(cfg)
        _RESUME_POINTS.clear()
        _RESUME_POINTS[key] = json.loads(read_bytes(join(found, ckpt.MARKER), cfg.storage.s3_endpoint,
                                                    cfg.storage.s3_region)) if found else {}
    return _RESUME_POINTS[key]


_RESUME_POINTS: dict = {}


def _corpus_dataset(cfg: Config, segment_seconds: float, blocks, rank: int, ledger):
    """Rank's stream over a prepared corpus from the restored checkpoint's data position to the end of the run."""
    import ray
    from service.corpus import rank_dataset
    from service.data import quiet_ray_data
    quiet_ray_data()
    per_worker = cfg.train.batch_size // cfg.train.workers
    start = int(_resume_point(cfg).get("data_position", 0))
    corpus = {"segment_seconds": segment_seconds, "blocks": ray.get(blocks)}
    return rank_dataset(cfg, corpus, blocks, rank, cfg.train.workers, start,
                        max(cfg.train.steps * per_worker, start + per_worker), ledger)


def _raw_dataset(cfg: Config, files, ledger):
    """The raw-source stream, starting at the pass of the checkpoint being restored."""
    from service.data import build_dataset
    return build_dataset(cfg, files, ledger, start_epoch=int(_resume_point(cfg).get("epoch", 0)))


def _normalisation_stats(cfg: Config, previous: Config | None, listing, corpus, progress) -> dict[str, float]:
    """features.mean/std: the resumed run's own (from its latest checkpoint), else the prepared corpus's,
    else measured on the data."""
    from service.data import measure_stats
    if previous is not None and previous.features.mean is not None:
        return {"features.mean": previous.features.mean, "features.std": previous.features.std}
    if corpus is not None:
        if not corpus.get("stats"):
            raise ConfigError(f"{cfg.data.source}: the corpus has no log-mel statistics; set features.mean/std")
        progress(f"features: log-mel mean {corpus['stats']['features.mean']} std {corpus['stats']['features.std']} "
                 "from the prepared corpus")
        return corpus["stats"]
    t0 = time.time()
    stats = measure_stats(cfg, listing)
    progress(f"features: log-mel mean {stats['features.mean']} std {stats['features.std']} measured on real frames "
             f"of {min(cfg.data.stats_files, len(listing.files))} files ({time.time() - t0:.1f} s)")
    return stats


def _mask_picture(cfg: Config, listing, corpus, path: str) -> str | None:
    """The run's mask geometry drawn on the first decodable clip of its source (a convenience: never fails)."""
    try:
        wav = _example_clip(cfg, listing, corpus)
        if wav is None:
            return None
        fc = cfg.features
        spec = LogMel(fc)(torch.as_tensor(wav)[None])[0]
        return render_masks(spec, fc.grid, (fc.patch_freq, fc.patch_time), cfg.masking, path, seed=cfg.seed)
    except Exception as e:  # noqa: BLE001
        print(f"could not draw masks.png: {type(e).__name__}: {e}", flush=True)
        return None


def _example_clip(cfg: Config, listing, corpus):
    """The first decodable clip of the source, for the mask-geometry picture."""
    from service.audio import Skip, crop_rng, crops, decode
    if corpus is not None:
        from service.corpus import example_segment
        wavs = [example_segment(cfg, corpus)]
    else:
        wavs = []
        for f in listing.files[:20]:
            try:
                wavs = [decode(read_bytes(f.uri, cfg.storage.s3_endpoint, cfg.storage.s3_region),
                               cfg.features.sample_rate, trim=cfg.data.trim_silence)]
            except (Skip, OSError):
                continue
            break
    return crops(wavs[0], cfg.features.clip_samples, 1, crop_rng(cfg.seed, 0, "example"), cfg.data.short_audio)[0] \
        if wavs else None

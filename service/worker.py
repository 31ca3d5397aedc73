"""The Ray Train worker: one rank's share of a pretraining run.

`WorkerRun` sets up (model, optimiser, restore from Ray's checkpoint, the rank's batches), then steps:
a step is next batch -> forward -> optimise.  Every schedule (LR, WD, tau) and every mask draw is a
function of the global step, so a restored run continues exactly.  Metrics accumulate in a
`StepMeter` between reports; rank 0 logs, probes and writes checkpoints.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
import time
import zlib
from typing import NamedTuple

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from service import checkpoint as ckpt
from service import faults, tracking
from service.config import Config, config_from_dict
from service.augment import corrupt_context, corrupts
from service.data import DataSourceError
from service.encoder import AudioEncoder
from service.features import LogMel, patchify
from service.ledger import check_skips
from service.masks import Masks, MaskGenerator
from service.model import AudioJEPA, autocast, collapse_stats, compile_blocks
from service.optim import apply_schedules, build_optimizer, tau_at
from service.probe import TrainingProbe
from service.raydata import calm_streaming_executor
from service.storage import join, write_bytes


class NonFiniteLoss(RuntimeError):
    pass


class DamagedCheckpoint(RuntimeError):
    """The resume point's bytes do not verify: a restart (Ray's, or a resubmission) resumes from the one before."""


class RunStopped(RuntimeError):
    """An error a restart cannot fix: every rank stops, the run fails at once (no `failure.max_failures` spent)."""


# errors every rank raises at the same step: the run ends with the reason instead of a worker failure that
# Ray would retry `failure.max_failures` times to the same end
FATAL = (RunStopped, NonFiniteLoss, ckpt.CheckpointError, DataSourceError)


def fatal_reason(error: BaseException) -> str | None:
    """"Type: message" of the FATAL error behind `error`, None when there is none.  An error raised in a Ray
    Data task reaches the trainer wrapped (RayTaskError / UserCodeException); Ray keeps the original in its
    cause chain or, once it crossed a process boundary, only in the traceback text."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FATAL):
            return f"{type(e).__name__}: {e}"
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    names = "|".join(t.__name__ for t in FATAL)
    found = re.findall(rf"^(?:[\w.]+\.)?({names}): (.+)$", f"{getattr(error, 'traceback_str', '')}\n{error}", re.M)
    return f"{found[-1][0]}: {found[-1][1]}" if found else None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def agree(value: float, op: str, device) -> float:
    """One float agreed by every rank: op is sum | mean | min | max (a no-op on a single worker)."""
    return agree_all(torch.tensor([float(value)], dtype=torch.float64, device=device), op)[0]


def agree_all(values: torch.Tensor, op: str) -> list[float]:
    """A vector agreed by every rank, read to the host once: the step's only wait for the device."""
    if _distributed():
        values = values.clone()
        dist.all_reduce(values, op=_OPS[op])
        if op == "mean":
            values /= dist.get_world_size()
    return values.tolist()


def gather(value: int, device) -> list[int]:
    """Every rank's integer, in rank order (a one-element list on a single worker)."""
    if not _distributed():
        return [int(value)]
    out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([int(value)], dtype=torch.int64, device=device))
    return [int(v.item()) for v in out]


def constant_fraction(patches: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Fraction of the patches at `idx` that are constant (digital silence or padding): nothing to learn."""
    constant = (patches.amax(-1) - patches.amin(-1)) < 1e-6  # [B, N]
    return torch.gather(constant, 1, idx).float().mean()


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _write_resume_record(cfg: Config, record: dict) -> None:
    """<storage>/<run>/resumes/step_<S>_<time>.json: where a run resumed, with state checksums."""
    name = f"resumes/step_{record['step']:08d}_{int(time.time())}.json"
    write_bytes(join(cfg.run_dir, name), json.dumps(record).encode(), cfg.storage.s3_endpoint)


class StepMeter:
    """Per-step figures between two reports (averaged), clips and data-wait time.  Figures may be device
    tensors: they are read to the host together, when the report is due, not at every step."""

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
        means = [torch.stack([torch.as_tensor(x).detach().double().cpu() for x in v]).mean() for v in self.values.values()]
        values = dict(zip(self.values, torch.stack(means).tolist())) if means else {}
        return {**values, "clips_per_s": self.clips / elapsed, "data_wait_fraction": self.wait / elapsed}


class Forward(NamedTuple):
    """One forward pass: the loss, the target tokens, the loss's parts, the patches and masks it used."""
    loss: torch.Tensor
    h: torch.Tensor
    parts: dict
    patches: torch.Tensor
    masks: Masks


class WorkerRun:
    """One rank's share of a pretraining run: set-up/restore, steps, metrics, probe, reports.

    The constructor builds what a step needs on `device` and nothing of Ray's, so a benchmark or a test runs
    the very same step (give it a `stream`); `from_ray` is the Ray Train worker: restore, DDP, the rank's
    batches, the probe and the configured faults."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        torch.manual_seed(cfg.seed)  # identical init on every rank
        self.core = AudioJEPA(cfg).to(device)
        if cfg.train.compile:
            compile_blocks(self.core)
        self.opt = build_optimizer(self.core, cfg.optim)
        self.model = self.core
        self.trainable = [p for p in self.core.parameters() if p.requires_grad]
        self.step, self.epoch, self.resume_record, self.skipped_steps = 0, 0, None, 0
        self.data_position, self.data_digest = 0, 0  # clips this rank consumed; crc32 chain of their ids
        self.total = cfg.train.steps
        self.per_worker = cfg.train.batch_size // world
        self.frontend = LogMel(cfg.features).to(device) if cfg.data.features_in == "trainer" else None
        self.masks = MaskGenerator(cfg.masking, cfg.features.grid)
        self.autocast = autocast(device, cfg.train.precision)
        self.stream, self.probe, self.probe_last = None, None, None
        self.run_id = self.uri = self.ledger = None
        self.meter, self.nonfinite, self.collapsed, self.last_h = StepMeter(), 0, False, None
        self.t_start, self.step_start = time.time(), 0

    @classmethod
    def from_ray(cls, loop_cfg: dict) -> "WorkerRun":
        """This Ray Train worker's run, restored from Ray's checkpoint when there is one."""
        cfg = config_from_dict(loop_cfg["config"])
        ctx = ray.train.get_context()
        torch.set_num_threads(cfg.train.threads_per_worker or cfg.train.cpus_per_worker)
        device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
        run = cls(cfg, ctx.get_world_rank(), ctx.get_world_size(), device)
        run.run_id, run.uri, run.ledger = loop_cfg.get("mlflow_run_id"), loop_cfg.get("tracking_uri"), \
            loop_cfg.get("ledger")
        run._restore()
        if run.world > 1:  # the model has no running statistics: nothing for DDP to broadcast before a forward
            run.model = ray.train.torch.prepare_model(run.core, parallel_strategy_kwargs={"broadcast_buffers": False})
        if cfg.data.calm_loop:  # this process iterates the rank's stream, so its Ray Data executor runs here
            calm_streaming_executor()
        run.stream = loop_cfg["batches"].stream(run.rank, run.per_worker, device, run.data_position)
        run.probe = run._probe() if cfg.probe.task and run.rank == 0 else None
        run.probe_last = 0.0 if cfg.probe.task else None
        run.t_start, run.step_start = time.time(), run.step
        faults.install(run)
        return run

    # --- set-up ------------------------------------------------------------------------------
    def _restore(self, uri: str | None = None) -> None:
        """Continue from the run's resume point (`checkpoint.latest`, which the dataset factories read too),
        or from `uri`.  A checkpoint whose bytes do not verify is noted DAMAGED and the worker group
        restarts: its streams are then rebuilt from the previous checkpoint, as the restore is."""
        if uri is None:
            found = ckpt.latest(self.cfg)
            if found is None:
                return
            uri = found[0]
        try:
            state = ckpt.load_uri(uri, self.cfg.storage.s3_endpoint, self.cfg.storage.s3_region)
        except ckpt.CheckpointError as e:
            ckpt.mark_damaged(self.cfg, uri, str(e))
            raise DamagedCheckpoint(f"{uri} is damaged ({e}); noted, the next attempt resumes from the previous "
                                    "checkpoint") from e
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

    def _probe(self) -> TrainingProbe:
        c = self.cfg
        probe = TrainingProbe(c.probe.task, c.features.sample_rate, c.probe.kind, c.probe.max_clips,
                              c.storage.s3_endpoint, c.seed)
        print(f"probe: {len(probe.wavs)} clips of task {probe.name} (score: valid {c.probe.kind} accuracy)",
              flush=True)
        return probe

    # --- one step: next batch -> forward -> optimise -------------------------------------------
    def train_step(self) -> torch.Tensor | None:
        """One optimiser step on the next batch; the latest good step's target tokens (None before any)."""
        fwd = self.forward(self.next_batch())
        if self.optimise(fwd):
            self.last_h = fwd.h
        return self.last_h

    def next_batch(self) -> dict:
        """The rank's next batch (waveforms or log-mel as floats), its wait counted, its clips recorded."""
        t_wait = time.time()
        batch = next(self.stream)
        self.meter.wait += time.time() - t_wait
        self.data_position += self.per_worker
        # host columns (never on the device): reading them costs no wait
        self.data_digest = zlib.crc32(batch["clip"].numpy().astype("<i8").tobytes(), self.data_digest)
        self.epoch = int(batch["epoch"].numpy()[-1])
        return batch

    def forward(self, batch: dict) -> Forward:
        """Features, patches and this step's masks (drawn from seed, step, rank), then the JEPA loss."""
        cfg = self.cfg
        fc = cfg.features
        with torch.no_grad():
            spec = self.frontend(batch["x"]) if self.frontend is not None else batch["x"]
            patches = patchify(spec, fc.patch_freq, fc.patch_time)
            seen = None  # the context view: the clean patches unless masking.context_mix / context_warp
            if corrupts(cfg.masking):
                view = corrupt_context(spec, cfg.masking, fc, np.random.default_rng([cfg.seed, self.step, self.rank, 0xC0]))
                seen = patchify(view, fc.patch_freq, fc.patch_time)
        m = self.masks(self.per_worker * cfg.masking.per_clip, np.random.default_rng([cfg.seed, self.step, self.rank]))
        self.sched = apply_schedules(self.opt, self.step, cfg)
        with self.autocast:
            loss, h, parts = self.model(patches, m.context.to(self.device), m.target.to(self.device), seen)
        return Forward(loss, h, parts, patches, m)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimise(self, fwd: Forward) -> bool:
        """Backward, clip, AdamW and EMA; False when the step was skipped.

        A step whose loss or gradient norm is not finite on any rank is skipped by every rank: no
        optimiser step, no EMA update, counted in `skipped_steps`.  The ranks' agreement on that is the
        step's one read from the device; every other figure stays there until a report."""
        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        self.backward(fwd.loss)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        loss_ok, grad_ok = agree_all(torch.stack([torch.isfinite(fwd.loss.detach()), torch.isfinite(gnorm)]).double(),
                                     "min")
        if loss_ok < 1 or grad_ok < 1:
            self.opt.zero_grad(set_to_none=True)
            self._skip_nonfinite("loss" if loss_ok < 1 else "gradient norm")
            return False
        self.nonfinite = 0
        self.opt.step()
        self.step += 1
        self.core.ema_update(tau_at(self.step, self.total, cfg.ema))
        tgt = fwd.masks.target.to(self.device)
        self.meter.add(self.per_worker * self.world, loss=fwd.loss.detach(), grad_norm=gnorm.detach(),
                       mask_ratio=fwd.masks.ratio, **fwd.parts,
                       target_silence_fraction=constant_fraction(
                           fwd.patches.repeat_interleave(cfg.masking.per_clip, 0), tgt))
        if self.resume_record is not None:  # written after the first step: it also times the recovery
            _write_resume_record(cfg, {**self.resume_record, "first_step_time": time.time()})
            self.resume_record = None
        return True

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
        """The meter's figures (loss averaged over ranks), schedules, collapse monitors; resets the meter."""
        c = self.cfg
        # NaN defaults: every step since the last report was skipped
        metrics = {"loss": float("nan"), "grad_norm": float("nan"), "mask_ratio": float("nan"),
                   **self.meter.metrics(), **self.sched, "tau": tau_at(self.step, self.total, c.ema),
                   "epoch": self.epoch, "step": self.step, "skipped_steps": self.skipped_steps,
                   "data_position": self.data_position, **collapse_stats(h)}
        for k in [k for k in metrics if k == "loss" or k.endswith("_loss")]:  # the loss and its parts
            metrics[k] = agree(metrics[k], "mean", self.device)
        # one number for "which clips, in which order, on which rank": equal runs, equal digest
        metrics["data_digest"] = agree(self.data_digest * (self.rank + 1), "sum", self.device)
        self.meter = StepMeter()
        if c.train.min_erank > 0:  # collapse: any rank's target embeddings below the rank floor
            self.collapsed = agree(float(metrics["target_erank"] < c.train.min_erank), "max", self.device) > 0
            metrics["collapsed"] = float(self.collapsed)
        if self.probe_last is not None:
            metrics["probe_score"] = self.probe_last  # every report carries a score for the early stopper
        return metrics

    def run_probe(self, metrics: dict) -> None:
        """Score the target encoder on the task's valid split (rank 0) and share the score with every rank."""
        if self.rank == 0:
            t_probe = time.time()
            exported = self.core.encoder if self.cfg.ema.export == "online" else self.core.target_encoder
            enc = AudioEncoder(self.cfg, exported.state_dict(), self.device)
            metrics.update(self.probe.score(enc))
            self.meter.pause(time.time() - t_probe)
        score = metrics.get("probe_score", 0.0)
        if self.world > 1:
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
                self.save(tmp, metrics, digests)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{self.step:08d}")

    def save(self, directory: str, metrics: dict, digests: list[int] | None = None) -> None:
        """This rank's state as a checkpoint directory (`digests`: every rank's data digest, in rank order)."""
        ckpt.save(directory, self.cfg, self.core, self.opt, self.step, self.epoch, metrics=metrics,
                  skipped_steps=self.skipped_steps, data_position=self.data_position,
                  data_digests=digests if digests is not None else [self.data_digest])

    def finished_before(self) -> None:
        """Restored at the last step (a worker group restarted after the final checkpoint; a plain
        resubmission of a finished run never starts workers): one report so the run ends cleanly."""
        if self.resume_record is not None:
            _write_resume_record(self.cfg, self.resume_record)
        ray.train.report({"step": self.step, "already_finished": 1})


def train_loop_per_worker(loop_cfg: dict) -> dict | None:
    """Runs on every Ray Train worker; returns {"fatal_error": …} when the run stopped for a reason a
    restart cannot fix (rank 0's return value reaches the driver as `Result.return_value`)."""
    # Train logs every report ("Reporting training result … TrainingReport(…)") at INFO under a logger
    # named by its file path, which Train's own level setting misses; our progress line says it once
    logging.getLogger().setLevel(logging.WARNING)
    try:
        run = WorkerRun.from_ray(loop_cfg)
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
    except Exception as e:  # noqa: BLE001 - one a restart cannot fix ends the run; any other goes to Ray
        reason = fatal_reason(e)
        if reason is None:
            raise
        print(f"stopping: {reason}", flush=True)
        return {"fatal_error": reason}
    return None

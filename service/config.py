"""Typed run configuration: one YAML file, validated at start-up.

Every section is a dataclass; unknown keys, wrong types and out-of-range values are
errors that name the dotted key.  `--set a.b=value` overrides are parsed as YAML scalars.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class FeaturesConfig:
    """Waveform -> log-mel -> patches."""
    sample_rate: int = 16000
    n_mels: int = 128
    n_frames: int = 208             # frames per clip; clip length follows from win/hop
    win_ms: float = 25.0
    hop_ms: float = 10.0
    frontend: str = "mel"           # mel (batched torchaudio MelSpectrogram) | kaldi (Kaldi fbank)
    mean: float | None = None       # normalisation (logmel - mean) / std; null = measured on the run's data
    std: float | None = None        # at start (real frames only) and then stored in config/checkpoint/model
    patch_freq: int = 16
    patch_time: int = 16

    @property
    def win_length(self) -> int:
        return int(round(self.sample_rate * self.win_ms / 1000))

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def n_fft(self) -> int:
        """FFT size: the window zero-padded to twice the next power of two (no empty low mel filters)."""
        return 2 << (self.win_length - 1).bit_length()

    @property
    def clip_samples(self) -> int:
        """Samples that give exactly n_frames frames (no centre padding)."""
        return (self.n_frames - 1) * self.hop_length + self.win_length

    def frames_for(self, n_samples: int) -> int:
        """Whole analysis frames in `n_samples` of audio (at least 1: a shorter input is padded to one)."""
        return 1 + (n_samples - self.win_length) // self.hop_length if n_samples >= self.win_length else 1

    def columns_for(self, n_samples: int) -> int:
        """Patch columns (time steps of the token grid) that start inside `n_samples` of real audio."""
        return -(-self.frames_for(n_samples) // self.patch_time)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (freq rows, time columns)."""
        return self.n_mels // self.patch_freq, self.n_frames // self.patch_time

    def validate(self) -> None:
        _check(self.frontend in ("mel", "kaldi"), "features.frontend", self.frontend, "mel or kaldi")
        _check(self.sample_rate >= 4000, "features.sample_rate", self.sample_rate, ">= 4000")
        _check(self.std is None or self.std > 0, "features.std", self.std, "> 0 or null (measured)")
        _check((self.mean is None) == (self.std is None), "features.mean", self.mean,
               "set together with features.std (or both null: measured from the data)")
        _check(self.n_mels % self.patch_freq == 0, "features.n_mels", self.n_mels,
               f"a multiple of features.patch_freq={self.patch_freq}")
        _check(self.n_frames % self.patch_time == 0, "features.n_frames", self.n_frames,
               f"a multiple of features.patch_time={self.patch_time}")
        _check(0 < self.hop_ms <= self.win_ms, "features.hop_ms", self.hop_ms, "in (0, win_ms]")


@dataclass
class DataConfig:
    """Where the audio comes from and how bad input is handled."""
    source: str = ""                # s3://bucket/prefix | local dir | manifest .csv/.parquet (required to train)
    extensions: list[str] = field(default_factory=lambda: ["wav", "flac", "ogg", "mp3"])
    crops_per_file: int = 4         # at most this many random crops from one long file
    min_seconds: float = 0.25       # shorter decoded audio is skipped (too_short); shorter than a clip is looped
    max_file_mb: float = 256.0      # larger objects are skipped (too_large)
    max_channels: int = 16
    max_skip_fraction: float = 0.5  # fail the run when more files than this are bad
    features_in: str = "pipeline"   # pipeline (CPU, Ray Data) | trainer (in the train step, e.g. on GPU)
    read_retries: int = 5           # transient S3 errors
    concurrency: int = 0            # decode tasks at once; 0 = as many as free CPUs (sweeps: 1 per trial)
    short_audio: str = "loop"       # audio shorter than a clip: loop (repeat it) | pad (zeros: learnable "silence")
    trim_silence: bool = True       # drop leading/trailing digital silence before cropping
    stats_files: int = 256          # files sampled to measure features.mean/std when they are null
    max_decoded_mb: float = 1024.0  # decoded size (frames x channels x 4 bytes) above which a file is skipped
    #                                 (too_long) from its header, before decoding: a tiny FLAC can hold hours
    max_read_error_fraction: float = 0.01  # fail when more files than this cannot be read after retries
    allow_outside_paths: bool = False  # manifests: paths outside the manifest's bucket/directory are refused
    seek_above_mb: float = 64.0     # raw sources: larger objects are read around their crop windows only (seek)
    shuffle_blocks: int = 4         # prepared corpora: row groups shuffled together (the shuffle buffer)
    calm_loop: bool = True          # pause Ray Data's scheduling loop while the trainer has a batch waiting

    def validate(self) -> None:
        _check(self.features_in in ("pipeline", "trainer"), "data.features_in", self.features_in,
               "pipeline or trainer")
        _check(self.crops_per_file >= 1, "data.crops_per_file", self.crops_per_file, ">= 1")
        _check(0 <= self.max_skip_fraction <= 1, "data.max_skip_fraction", self.max_skip_fraction, "in [0, 1]")
        _check(self.concurrency >= 0, "data.concurrency", self.concurrency, ">= 0")
        _check(self.short_audio in ("loop", "pad"), "data.short_audio", self.short_audio, "loop or pad")
        _check(self.seek_above_mb > 0, "data.seek_above_mb", self.seek_above_mb, "> 0")
        _check(self.shuffle_blocks >= 1, "data.shuffle_blocks", self.shuffle_blocks, ">= 1")
        _check(self.max_decoded_mb > 0, "data.max_decoded_mb", self.max_decoded_mb, "> 0")
        _check(0 <= self.max_read_error_fraction <= 1, "data.max_read_error_fraction", self.max_read_error_fraction,
               "in [0, 1]")


@dataclass
class StorageConfig:
    """Object storage every s3:// URI of a run goes through: data, checkpoints, probe tasks, markers."""
    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:9000 for S3-compatible stores (else AWS_ENDPOINT_URL)
    s3_region: str = "us-east-1"


@dataclass
class ModelConfig:
    """ViT encoder and narrow predictor widths/depths."""
    width: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    pred_width: int = 96
    pred_depth: int = 3
    pred_heads: int = 3

    def validate(self) -> None:
        _check(self.width % self.heads == 0, "model.width", self.width, f"divisible by model.heads={self.heads}")
        _check(self.pred_width % self.pred_heads == 0, "model.pred_width", self.pred_width,
               f"divisible by model.pred_heads={self.pred_heads}")


@dataclass
class MaskingConfig:
    """Which patches the context encoder sees and which the predictor must predict."""
    geometry: str = "unstructured"          # unstructured | multiblock | time | freq
    ratio: float | list[float] = field(default_factory=lambda: [0.4, 0.6])  # target fraction: number or [low, high] per batch
    block_scale: list[float] = field(default_factory=lambda: [0.15, 0.2])   # multiblock: block area / grid
    block_aspect: list[float] = field(default_factory=lambda: [0.75, 1.5])  # multiblock: height/width
    context_scale: list[float] = field(default_factory=lambda: [0.85, 1.0]) # multiblock: context kept
    stripe_width: list[int] = field(default_factory=lambda: [1, 3])          # time/freq: patches per stripe
    min_keep: int = 4                        # never fewer context patches than this
    per_clip: int = 1                        # masks drawn per clip, sharing one target-encoder pass (EAT)
    context_mix: float = 0.0                 # context-only corruption (M2D-X): a batch-mate's power spectrum mixed
    #                                          into the context view at a weight drawn from U[0, context_mix]
    context_warp: float = 0.0                # ... and its mel axis stretched by a factor in [1 - w, 1 + w];
    #                                          the targets stay clean; 0 = off

    def ratio_range(self) -> tuple[float, float]:
        r = self.ratio
        lo, hi = (r, r) if isinstance(r, (int, float)) else tuple(r)
        return float(lo), float(hi)

    def validate(self) -> None:
        _check(self.geometry in ("unstructured", "multiblock", "time", "freq"), "masking.geometry",
               self.geometry, "unstructured, multiblock, time or freq")
        r = self.ratio
        _check(isinstance(r, float) or len(r) == 2, "masking.ratio", r, "a number or [low, high]")
        lo, hi = self.ratio_range()
        _check(0 < lo <= hi < 1, "masking.ratio", r, "0 < low <= high < 1")
        _check(0 <= self.context_mix < 1, "masking.context_mix", self.context_mix, "in [0, 1)")
        _check(0 <= self.context_warp < 0.5, "masking.context_warp", self.context_warp, "in [0, 0.5)")
        for key in ("block_scale", "block_aspect", "context_scale", "stripe_width"):
            v = getattr(self, key)
            _check(len(v) == 2 and 0 < v[0] <= v[1], f"masking.{key}", v, "[low, high] with 0 < low <= high")
        _check(self.context_scale[1] <= 1, "masking.context_scale", self.context_scale, "<= 1")
        _check(self.per_clip >= 1, "masking.per_clip", self.per_clip, ">= 1")


@dataclass
class ReadoutConfig:
    """How patch tokens become frame and clip vectors (embed, probes, adapters, evaluation alike)."""
    frames: str = "concat"          # concat: frequency rows side by side per time step (M2D) | mean over rows
    pooling: str = "meanstd"        # clip vector over time: mean | meanstd (mean and std) | meanmax
    layers: int = 1                 # average of the last N blocks' (normed) outputs; 1 = the last block

    def validate(self) -> None:
        _check(self.frames in ("concat", "mean"), "readout.frames", self.frames, "concat or mean")
        _check(self.pooling in ("mean", "meanstd", "meanmax"), "readout.pooling", self.pooling,
               "mean, meanstd or meanmax")
        _check(self.layers >= 1, "readout.layers", self.layers, ">= 1 (and at most model.depth)")


@dataclass
class EmaConfig:
    """Target encoder EMA: tau goes tau_start -> tau_end over train.steps (by step, not epoch)."""
    tau_start: float = 0.996
    tau_end: float = 1.0
    schedule: str = "cosine"        # cosine | linear
    export: str = "target"          # which encoder is probed, registered and embedded: target (EMA) | online

    def validate(self) -> None:
        _check(0 <= self.tau_start <= 1, "ema.tau_start", self.tau_start, "in [0, 1]")
        _check(0 <= self.tau_end <= 1, "ema.tau_end", self.tau_end, "in [0, 1]")
        _check(self.schedule in ("cosine", "linear"), "ema.schedule", self.schedule, "cosine or linear")
        _check(self.export in ("target", "online"), "ema.export", self.export, "target or online")


@dataclass
class LossConfig:
    kind: str = "l2"                # l2 (the seed) | smooth_l1 (I-JEPA) | cosine (Audio-JEPA: 2 - 2 cos)
    target_norm: str = "layernorm"  # none | layernorm (per-token standardised, no affine: I-JEPA, Audio-JEPA)
    #                                 | instancenorm (each block's output standardised over the clip's tokens, data2vec)
    target_layers: int = 1          # targets average the last N target-encoder blocks (data2vec: 8 of 12)
    target_view: str = "full"       # full (I-JEPA: the target encoder sees the whole clip) | masked (M2D: it sees
    #                                 only the target patches, so targets carry nothing the context already shows)
    var_weight: float = 0.0         # VICReg variance term on the context encoder's tokens (C-JEPA): hinge on
    cov_weight: float = 0.0         # each channel's std at 1; covariance term: squared off-diagonal covariance / D
    vc_over: str = "tokens"         # the samples of those statistics: tokens (every context token of the batch)
    #                                 | clips (each clip's mean context token)
    sigreg_weight: float = 0.0      # SIGReg (LeJEPA): Epps-Pulley test that random 1-D projections of the context
    sigreg_over: str = "tokens"     # encoder's tokens (or each clip's mean token: clips) are N(0, 1); 0 = off
    sigreg_slices: int = 256        # random directions per step (drawn from torch's RNG: checkpointed)
    clip_weight: float = 0.0        # clip-level term (EAT): a linear head on the context's mean token predicts
    #                                 the mean of the clip's targets; 0 = off

    def validate(self) -> None:
        _check(self.kind in ("l2", "smooth_l1", "cosine"), "loss.kind", self.kind, "l2, smooth_l1 or cosine")
        _check(self.target_norm in ("none", "layernorm", "instancenorm"), "loss.target_norm",
               self.target_norm, "none, layernorm or instancenorm")
        _check(self.target_layers >= 1, "loss.target_layers", self.target_layers, ">= 1 (and at most model.depth)")
        _check(self.vc_over in ("tokens", "clips"), "loss.vc_over", self.vc_over, "tokens or clips")
        _check(self.sigreg_over in ("tokens", "clips"), "loss.sigreg_over", self.sigreg_over, "tokens or clips")
        _check(self.sigreg_slices >= 1, "loss.sigreg_slices", self.sigreg_slices, ">= 1")
        _check(self.target_view in ("full", "masked"), "loss.target_view", self.target_view, "full or masked")
        for key in ("var_weight", "cov_weight", "sigreg_weight", "clip_weight"):
            _check(getattr(self, key) >= 0, f"loss.{key}", getattr(self, key), ">= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.04      # rises to weight_decay_end by cosine
    weight_decay_end: float = 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0          # 0 disables

    def validate(self) -> None:
        _check(self.lr > 0, "optim.lr", self.lr, "> 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        _check(len(self.betas) == 2, "optim.betas", self.betas, "[beta1, beta2]")


@dataclass
class TrainConfig:
    steps: int = 1000               # total optimiser steps (the schedules are sized from this)
    batch_size: int = 32            # global batch, split evenly across workers
    workers: int = 1
    cpus_per_worker: int = 1
    use_gpu: bool = False
    log_every: int = 10
    threads_per_worker: int = 0     # torch intra-op threads; 0 = cpus_per_worker
    max_nonfinite: int = 3          # consecutive non-finite losses before the run stops
    min_erank: float = 0.0          # stop as "collapsed" when the target effective rank falls below (0 = never)
    precision: str = "auto"         # auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32
    compile: bool = False           # torch.compile the transformer blocks (same checkpoint keys)

    def validate(self) -> None:
        _check(self.steps >= 1, "train.steps", self.steps, ">= 1")
        _check(self.precision in ("auto", "bf16", "fp32"), "train.precision", self.precision, "auto, bf16 or fp32")
        _check(self.workers >= 1, "train.workers", self.workers, ">= 1")
        _check(self.batch_size % self.workers == 0, "train.batch_size", self.batch_size,
               f"divisible by train.workers={self.workers}")


@dataclass
class CheckpointConfig:
    every_steps: int = 200
    storage_path: str = "runs"      # local dir or s3://bucket/prefix (storage.s3_endpoint applies)
    keep: int = 2

    def validate(self) -> None:
        _check(self.every_steps >= 1, "checkpoint.every_steps", self.every_steps, ">= 1")
        _check(self.keep >= 1, "checkpoint.keep", self.keep, ">= 1")


@dataclass
class FailureConfig:
    max_failures: int = 3
    inject_kill_at_step: int = 0    # > 0: kill worker inject_kill_rank once at this step (rehearsals/tests)
    inject_kill_rank: int = 0
    inject_nan_grad_at_step: int = 0  # > 0: rank 0's gradients become NaN once at this step (rehearsals/tests)


@dataclass
class ResumeConfig:
    """Resubmitting a run name continues its checkpoint, but only with the config it was trained with."""
    allow_config_change: bool = False  # true: continue with changed settings; the change is recorded on the run


@dataclass
class ProbeConfig:
    """Downstream probe run during pretraining on a labeled task's train/valid splits (never test).

    Its `probe_score` (valid accuracy) is logged like any metric and is what sweeps optimise.
    """
    task: str = ""                  # task dir or s3:// prefix with manifest.csv; "" = no probe
    every_steps: int = 0            # 0 = only at the end of the run
    kind: str = "knn"               # knn | linear: which valid accuracy is `probe_score`
    max_clips: int = 800            # cap on train+valid clips held in memory

    def validate(self) -> None:
        _check(self.kind in ("knn", "linear"), "probe.kind", self.kind, "knn or linear")
        _check(self.every_steps >= 0, "probe.every_steps", self.every_steps, ">= 0")


@dataclass
class MlflowConfig:
    tracking_uri: str = ""          # "" = $MLFLOW_TRACKING_URI, else tracking is off
    experiment: str = "audio-jepa"
    registered_model: str = ""      # "" = do not register
    alias: str = "current"          # MLflow reserves "latest" (models:/NAME/latest is already the newest)

    def validate(self) -> None:
        _check(self.alias.lower() != "latest" and bool(self.alias), "mlflow.alias", self.alias,
               "a non-empty alias other than 'latest' (reserved by MLflow)")


@dataclass
class Config:
    run_name: str = "audio-jepa"
    seed: int = 0
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: dict[str, Any]) -> "Config":
        """A new validated config with dotted keys replaced: `cfg.with_overrides({"masking.ratio": 0.7})`."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return _with_absolute_paths(config_from_dict(raw))

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params."""
        return _flatten(self.to_dict())

    def shaping(self) -> dict[str, Any]:
        """The settings that decide what a run learns: not names, paths, endpoints, tracking or parallelism."""
        d = self.to_dict()
        out = {k: d[k] for k in SHAPING_SECTIONS}
        out["train"] = {k: d["train"][k] for k in SHAPING_TRAIN_KEYS}
        out["data"] = {k: d["data"][k] for k in SHAPING_DATA_KEYS}
        out["seed"] = self.seed
        return out

    def shaping_changes(self, other: "Config") -> dict[str, tuple[Any, Any]]:
        """Dotted shaping key -> (ours, other's) for every setting that differs: what a resume must not drift."""
        a, b = _flatten(self.shaping()), _flatten(other.shaping())
        return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}

    def hash(self) -> str:
        """Stable hash of the model-defining settings (`shaping`), for registry tags and caches."""
        blob = json.dumps(self.shaping(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def worker_paths(self) -> dict[str, str]:
        """Dotted key -> path or URI, for every location Ray workers read or write."""
        return {key: getattr(getattr(self, key.split(".")[0]), key.split(".")[1]) for key in PATH_KEYS}

    @property
    def run_dir(self) -> str:
        """`<checkpoint.storage_path>/<run_name>`: where Ray Train keeps this run's checkpoints and markers."""
        return f"{self.checkpoint.storage_path.rstrip('/')}/{self.run_name}"


PATH_KEYS = ("data.source", "probe.task", "checkpoint.storage_path")  # read or written by the workers, by path
SHAPING_SECTIONS = ("features", "model", "masking", "ema", "loss", "optim")
SHAPING_TRAIN_KEYS = ("steps", "batch_size")
SHAPING_DATA_KEYS = ("short_audio", "trim_silence", "crops_per_file", "min_seconds", "shuffle_blocks")
# keys that moved: old dotted key -> new one (refused with a message naming the new key)
MOVED_KEYS = {"data.s3_endpoint": "storage.s3_endpoint", "data.s3_region": "storage.s3_region"}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' = {value!r}: expected {tp}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a list")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' = {value!r}: expected true/false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' = {value!r}: expected a string")
    return value


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """A (nested) config dataclass from a plain dict: types coerced, unknown keys refused by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    for k in unknown:
        if f"{prefix}{k}" in MOVED_KEYS:
            raise ConfigError(f"config key '{prefix}{k}' has moved: use '{MOVED_KEYS[prefix + k]}'")
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known in this section: "
                          f"{', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    cur[parts[-1]] = value


def resolve_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped config (tiny, base)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file '{name_or_path}' and no shipped config of that name ({', '.join(names)})")


def load_config(name_or_path: str | dict | None = None, overrides: list[str] | None = None) -> Config:
    """Load, override (`key.sub=value`), type-check and validate a config."""
    if isinstance(name_or_path, dict):
        raw = json.loads(json.dumps(name_or_path))
    elif name_or_path is None:
        raw = {}
    else:
        path = resolve_path(name_or_path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, val = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(val) if val.strip() else "")
    return _with_absolute_paths(build(Config, raw).validate())


def _with_absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute in the process that was given them: trials and Ray workers run elsewhere."""
    for key, path in cfg.worker_paths().items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, _absolute(path))
    return cfg


def _absolute(uri: str) -> str:
    """A local path made absolute; URIs (s3://…) and "" unchanged."""
    return uri if not uri or "://" in uri else os.path.abspath(os.path.expanduser(uri))


def config_from_dict(d: dict) -> Config:
    """A stored config (checkpoint, registered model), migrated from older layouts, validated."""
    d = json.loads(json.dumps(d))
    data = d.get("data", {})
    for old, new in MOVED_KEYS.items():  # configs stored before the storage: section
        key = old.split(".")[1]
        if key in data:
            d.setdefault("storage", {})[new.split(".")[1]] = data.pop(key)
    d.setdefault("readout", {"frames": "mean", "pooling": "mean"})  # models stored before readout: existed
    return build(Config, d).validate()


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

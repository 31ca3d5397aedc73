"""Streaming input pipeline (Ray Data): list -> read bytes -> decode/mono/resample -> crops -> log-mel.

One row per clip: `x` is the normalised log-mel [n_mels, n_frames] (features_in: pipeline) or the
waveform [clip_samples] (features_in: trainer, so a GPU computes features), `epoch` the pass it
belongs to.  Each pass visits the files in a new order drawn from (seed, epoch).  Bad files are
skipped, counted by reason in a `DataLedger` actor and logged with their key; the run fails only
when the source is empty/unreachable or the skipped fraction passes `data.max_skip_fraction`.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import ray
import torch

from service.audio import Skip, crop_rng, crops, decode
from service.config import Config, DataConfig, FeaturesConfig, StorageConfig
from service.features import LogMel, logmel_stats
from service.storage import FileEntry, join, list_files, read_bytes, resolve

log = logging.getLogger("audio_jepa.data")


class DataSourceError(RuntimeError):
    """The source is empty, unreachable, or too much of it is bad."""


@dataclass
class Listing:
    source: str
    files: list[FileEntry]
    ignored_by_extension: int = 0
    too_large: list[FileEntry] = field(default_factory=list)


def list_source(run: Config) -> Listing:
    """List a local dir, an s3:// prefix or a manifest (.csv/.parquet with a `path` column)."""
    cfg, st = run.data, run.storage
    src = cfg.source
    try:
        if src.lower().endswith((".csv", ".parquet")):
            files, ignored = _list_manifest(cfg, st), 0
        else:
            files, ignored = list_files(src, cfg.extensions, st.s3_endpoint, st.s3_region)
    except (FileNotFoundError, OSError) as e:
        raise DataSourceError(f"data.source '{src}' is unreachable: {e}") from e
    limit = cfg.max_file_mb * 1024 * 1024
    too_large = [f for f in files if f.size > limit]
    files = [f for f in files if f.size <= limit]
    for f in too_large:
        log.warning("skipped %s: too_large (%d bytes > data.max_file_mb=%s)", f.uri, f.size, cfg.max_file_mb)
    if not files:
        raise DataSourceError(f"data.source '{src}' has no audio files (extensions {cfg.extensions}; "
                              f"{ignored} other files, {len(too_large)} too large)")
    return Listing(src, files, ignored, too_large)


def _list_manifest(cfg: DataConfig, st: StorageConfig) -> list[FileEntry]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = resolve(cfg.source, st.s3_endpoint, st.s3_region)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f) if path.endswith(".parquet") else pacsv.read_csv(f)
    col = next((c for c in ("path", "uri") if c in table.column_names), None)
    if col is None:
        raise DataSourceError(f"manifest {cfg.source}: needs a 'path' or 'uri' column, has {table.column_names}")
    base = cfg.source.rsplit("/", 1)[0] if "/" in cfg.source else "."
    out = []
    for p in table.column(col).to_pylist():
        uri = p if (p.startswith("s3://") or os.path.isabs(p)) else join(base, p)
        fs_i, path_i = resolve(uri, st.s3_endpoint, st.s3_region)
        info = fs_i.get_file_info(path_i)
        size = info.size if info.size is not None else 0
        out.append(FileEntry(uri, p, size))
    return sorted(out, key=lambda e: e.key)


def epoch_order(n_files: int, seed: int, epoch: int) -> np.ndarray:
    """The file visiting order of one pass: a permutation drawn from (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0xA0D10]).permutation(n_files)


def passes_needed(cfg: Config, n_files: int) -> int:
    """Passes over the files that surely cover train.steps global batches (>= 1 clip per good file)."""
    need = cfg.train.steps * cfg.train.batch_size
    return max(1, math.ceil(need / n_files)) + 1


@ray.remote(num_cpus=0)
class DataLedger:
    """Counts files, clips and skips (by reason, with example keys) across all pipeline tasks."""

    def __init__(self, listed: int, too_large: list[str]):
        self.listed = listed
        self.seen = len(too_large)
        self.clips = 0
        self.skipped: dict[str, int] = {"too_large": len(too_large)} if too_large else {}
        self.bad: dict[str, tuple[str, str]] = {k: ("too_large", "") for k in too_large}  # key -> (reason, detail)

    def record(self, seen: int, clips: int, skipped: list[tuple[str, str, str]]) -> None:
        self.seen += seen
        self.clips += clips
        for reason, key, detail in skipped:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
            self.bad[key] = (reason, detail)

    def skipped_files(self) -> list[tuple[str, str, str]]:
        """Every distinct skipped file once: (key, reason, detail), sorted by key."""
        return sorted((k, r, d) for k, (r, d) in self.bad.items())

    def totals(self) -> dict:
        examples: dict[str, list[str]] = {}  # the first 5 distinct files skipped for each reason
        for key, (reason, _) in self.bad.items():
            if len(examples.setdefault(reason, [])) < 5:
                examples[reason].append(key)
        return {"files": self.listed, "files_seen": self.seen, "clips": self.clips,
                "skipped": dict(self.skipped), "examples": examples}


def check_skips(totals: dict, max_fraction: float, min_seen: int = 20) -> str | None:
    """A message when too much of the source is bad, else None."""
    seen = totals["files_seen"]
    bad = sum(totals["skipped"].values())
    if seen >= min_seen and bad / seen > max_fraction:
        reasons = ", ".join(f"{r}={n} (e.g. {totals['examples'].get(r, ['?'])[0]})"
                            for r, n in sorted(totals["skipped"].items(), key=lambda kv: -kv[1]))
        return (f"{bad} of {seen} files were skipped ({bad / seen:.0%} > data.max_skip_fraction="
                f"{max_fraction}): {reasons}")
    return None


def skip_summary(totals: dict) -> str:
    """One line for the user: skips by reason with a few example keys (the full list is an artifact)."""
    parts = [f"{r}={n} (e.g. {', '.join(totals['examples'].get(r, [])[:3])})"
             for r, n in sorted(totals["skipped"].items(), key=lambda kv: -kv[1])]
    return f"data: skipped {sum(totals['skipped'].values())} file visits: {'; '.join(parts)} (list: skipped.csv)"


def write_skipped_csv(skipped: list[tuple[str, str, str]], path: str) -> str:
    import csv
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "reason", "detail"])
        w.writerows(skipped)
    return path


_FRONTENDS: dict[str, LogMel] = {}


def _frontend(cfg: FeaturesConfig) -> LogMel:
    """One LogMel per process and feature config (building it costs more than a batch)."""
    key = repr(cfg)
    if key not in _FRONTENDS:
        _FRONTENDS[key] = LogMel(cfg)
    return _FRONTENDS[key]


@lru_cache(maxsize=4)
def _fs(uri_root: str, endpoint: str | None, region: str):
    return resolve(uri_root, endpoint, region)[0]


def clips_from_files(batch: dict[str, np.ndarray], features: FeaturesConfig, data: DataConfig,
                     storage: StorageConfig, seed: int, ledger=None) -> dict[str, np.ndarray]:
    """Ray Data map_batches UDF: a batch of (uri, key, epoch) rows -> a batch of clip rows."""
    torch.set_num_threads(1)
    clip_len = features.clip_samples
    waves, epochs, skipped = [], [], []
    uris, keys, eps = batch["uri"], batch["key"], batch["epoch"]
    for uri, key, epoch in zip(uris, keys, eps):
        uri, key, epoch = str(uri), str(key), int(epoch)
        try:
            try:
                data_bytes = read_bytes(uri, retries=data.read_retries,
                                        fs=_fs("s3://" if uri.startswith("s3://") else "/", storage.s3_endpoint,
                                               storage.s3_region))
            except Exception as e:  # after retries
                raise Skip("read_error", f"{type(e).__name__}: {str(e)[:120]}") from None
            wav = decode(data_bytes, features.sample_rate, data.max_channels, data.min_seconds, data.trim_silence)
        except Skip as s:  # counted by the ledger; the driver prints one summary line
            log.debug("skipped %s: %s", uri, s)
            skipped.append((s.reason, uri, s.detail))
            continue
        for c in crops(wav, clip_len, data.crops_per_file, crop_rng(seed, epoch, key), data.short_audio):
            waves.append(c)
            epochs.append(epoch)
    if ledger is not None:
        ledger.record.remote(len(uris), len(waves), skipped)
    if data.features_in == "trainer":
        x = np.stack(waves) if waves else np.zeros((0, clip_len), np.float32)
    elif waves:
        fe = _frontend(features)
        x = fe(torch.from_numpy(np.stack(waves))).numpy()
    else:
        x = np.zeros((0, features.n_mels, features.n_frames), np.float32)
    return {"x": x, "epoch": np.asarray(epochs, dtype=np.int64)}


def measure_stats(cfg: Config, listing: Listing) -> dict[str, float]:
    """`features.mean`/`std` over real frames of one crop from each of a seeded sample of files."""
    from concurrent.futures import ThreadPoolExecutor

    fc, n = cfg.features, min(cfg.data.stats_files, len(listing.files))
    picked = [listing.files[i] for i in np.random.default_rng([cfg.seed, 0x57A7]).choice(len(listing.files), n,
                                                                                        replace=False)]

    def one_crop(f: FileEntry):
        try:
            wav = decode(read_bytes(f.uri, cfg.storage.s3_endpoint, cfg.storage.s3_region), fc.sample_rate,
                         cfg.data.max_channels, cfg.data.min_seconds, cfg.data.trim_silence)
        except Exception:  # noqa: BLE001 - a bad or unreadable file is left out of the sample, as in training
            return None
        return crops(wav, fc.clip_samples, 1, crop_rng(cfg.seed, 0, f.key))[0] if len(wav) > fc.clip_samples else wav

    with ThreadPoolExecutor(8) as pool:
        stats = logmel_stats((w for w in pool.map(one_crop, picked) if w is not None), fc)
    if stats is None:
        raise DataSourceError(f"data.source '{cfg.data.source}': none of {n} sampled files decoded, "
                              "so features.mean/std cannot be measured")
    return stats


def quiet_ray_data() -> None:
    """Our own training log line replaces Ray Data's per-operator progress bars (a line per update in logs)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def build_dataset(cfg: Config, listing: Listing, ledger=None, passes: int | None = None,
                  start_epoch: int = 0) -> "ray.data.Dataset":
    """The streaming clip dataset for `passes` passes over the listing, each in its own order."""
    quiet_ray_data()  # here, so that datasets built in a sweep's trial process are quiet too
    passes = passes or passes_needed(cfg, len(listing.files))
    rows = []
    for e in range(start_epoch, start_epoch + passes):
        for i in epoch_order(len(listing.files), cfg.seed, e):
            f = listing.files[i]
            rows.append({"uri": f.uri, "key": f.key, "epoch": e})
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 8, 4096)))
    return ds.map_batches(clips_from_files, batch_size=4, batch_format="numpy",
                          fn_kwargs=dict(features=cfg.features, data=cfg.data, storage=cfg.storage, seed=cfg.seed,
                                         ledger=ledger),
                          num_cpus=1, concurrency=cfg.data.concurrency or None)


__all__ = ["Listing", "DataLedger", "DataSourceError", "list_source", "build_dataset", "clips_from_files",
           "epoch_order", "check_skips", "passes_needed", "quiet_ray_data", "measure_stats"]

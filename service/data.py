"""The raw-files pipeline (Ray Data): list -> read bytes -> decode/mono/resample -> crops -> log-mel.

One row per clip: `x` is the normalised log-mel [n_mels, n_frames] (features_in: pipeline) or the
waveform [clip_samples] (features_in: trainer, so a GPU computes features), `epoch` the pass it
belongs to.  Each pass visits the files in a new order drawn from (seed, epoch).  Bad files are
skipped, counted by reason in the run's skip ledger (`service.ledger`) and logged with their key;
the run fails only when the source is empty/unreachable or the skipped fraction passes
`data.max_skip_fraction`.
"""
from __future__ import annotations

import logging
import math
import os
import posixpath
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from service.audio import ReadAhead, Skip, crop_rng, crops, decode, read_crops
from service.config import Config, DataConfig, FeaturesConfig, StorageConfig
from service.features import frontend, logmel_stats
from service.raydata import fetch_once, quiet_ray_data
from service.storage import FileEntry, join, list_files, read_bytes, resolve, with_retries

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


def _manifest_uri(p, row: int, base: str, cfg: DataConfig) -> str:
    """One manifest row's path as a URI, refused (naming the row) when it is not a string, leaves the
    manifest's bucket/directory (unless data.allow_outside_paths) or points into /dev, /proc, /sys."""
    where = f"manifest {cfg.source} row {row}"
    if not isinstance(p, str) or not p.strip():
        raise DataSourceError(f"{where}: path {p!r} is not a non-empty string")
    if p.startswith("s3://"):
        uri = "s3://" + posixpath.normpath(p[len("s3://"):])
    elif "://" in p:
        raise DataSourceError(f"{where}: path {p!r} has an unsupported scheme (s3:// or a file path)")
    else:
        if base.startswith("s3://") and not p.startswith("/"):
            uri = "s3://" + posixpath.normpath(join(base, p)[len("s3://"):])
        else:  # symlinks resolved: a link cannot lead out of the root or to a device
            uri = os.path.realpath(p if p.startswith("/") else join(base, p))
    if not uri.startswith("s3://") and uri.split("/")[1:2] in (["dev"], ["proc"], ["sys"]):
        raise DataSourceError(f"{where}: path {p!r} is a device or kernel file ({uri})")
    if not cfg.allow_outside_paths:
        root = base.rstrip("/") + "/"
        if base.startswith("s3://"):  # the manifest's bucket
            root = "s3://" + base[len("s3://"):].split("/", 1)[0] + "/"
        if not uri.startswith(root):
            raise DataSourceError(f"{where}: path {p!r} resolves to {uri}, outside {root} "
                                  "(set data.allow_outside_paths=true to allow it)")
    return uri


def _list_manifest(cfg: DataConfig, st: StorageConfig) -> list[FileEntry]:
    """Rows of a .csv/.parquet manifest (any case), validated, duplicates dropped, sizes looked up in parallel;
    only regular files are kept (a row naming a directory or a missing object is an error naming it)."""
    fs, path = resolve(cfg.source, st.s3_endpoint, st.s3_region)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f) if path.lower().endswith(".parquet") else pacsv.read_csv(f)
    col = next((c for c in ("path", "uri") if c in table.column_names), None)
    if col is None:
        raise DataSourceError(f"manifest {cfg.source}: needs a 'path' or 'uri' column, has {table.column_names}")
    base = cfg.source.rsplit("/", 1)[0] if "/" in cfg.source else os.getcwd()
    base = base if base.startswith("s3://") else os.path.realpath(base)
    rows: dict[str, tuple[int, str]] = {}  # uri -> (row, as written); the first of duplicates wins
    for row, p in enumerate(table.column(col).to_pylist(), start=2 if not path.lower().endswith(".parquet") else 0):
        rows.setdefault(_manifest_uri(p, row, base, cfg), (row, p))

    def info(uri: str):
        fs_i, path_i = resolve(uri, st.s3_endpoint, st.s3_region)
        return fs_i.get_file_info(path_i)

    uris = list(rows)
    with ThreadPoolExecutor(32) as pool:  # HEAD requests: one per object, many at once
        infos = list(pool.map(info, uris))
    out = []
    for uri, i in zip(uris, infos):
        row, p = rows[uri]
        if i.type not in (pafs.FileType.File, pafs.FileType.NotFound):  # missing: skipped (and counted) on read
            raise DataSourceError(f"manifest {cfg.source} row {row}: {p!r} is not a regular file ({uri})")
        out.append(FileEntry(uri, p, i.size or 0))
    return sorted(out, key=lambda e: e.key)


def epoch_order(n_files: int, seed: int, epoch: int) -> np.ndarray:
    """The file visiting order of one pass: a permutation drawn from (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0xA0D10]).permutation(n_files)


def passes_needed(cfg: Config, n_files: int) -> int:
    """Passes over the files that surely cover train.steps global batches (>= 1 clip per good file)."""
    need = cfg.train.steps * cfg.train.batch_size
    return max(1, math.ceil(need / n_files)) + 1


@lru_cache(maxsize=4)
def _fs(uri_root: str, endpoint: str | None, region: str):
    return resolve(uri_root, endpoint, region)[0]


def clips_from_files(batch: dict[str, np.ndarray], features: FeaturesConfig, data: DataConfig,
                     storage: StorageConfig, seed: int, ledger=None) -> dict[str, np.ndarray]:
    """Ray Data map_batches UDF: a batch of (uri, key, epoch) rows -> a batch of clip rows."""
    torch.set_num_threads(1)
    clip_len = features.clip_samples
    waves, epochs, ids, skipped = [], [], [], []
    uris, keys, eps = batch["uri"], batch["key"], batch["epoch"]
    sizes = batch.get("size", np.zeros(len(uris), np.int64))
    for uri, key, epoch, size in zip(uris, keys, eps, sizes):
        uri, key, epoch = str(uri), str(key), int(epoch)
        fs = _fs("s3://" if uri.startswith("s3://") else "/", storage.s3_endpoint, storage.s3_region)
        try:
            if size > data.seek_above_mb * 2 ** 20:  # long: read around the crop windows only
                file_crops = _seek_crops(uri, int(size), fs, features, data, crop_rng(seed, epoch, key))
            else:
                wav = decode(read_object(uri, fs, data.read_retries), features.sample_rate, data.max_channels,
                             data.min_seconds, data.trim_silence, data.max_decoded_mb)
                file_crops = crops(wav, clip_len, data.crops_per_file, crop_rng(seed, epoch, key), data.short_audio)
        except Skip as s:  # counted by the ledger; the driver prints one summary line
            log.debug("skipped %s: %s", uri, s)
            skipped.append((s.reason, uri, s.detail))
            continue
        for c in file_crops:
            waves.append(c)
            epochs.append(epoch)
            ids.append(zlib.crc32(key.encode()))
    if ledger is not None:
        ray.get(ledger.record.remote([str(u) for u in uris], len(waves), skipped))  # counted before the rows go on
    if data.features_in == "trainer":
        x = np.stack(waves) if waves else np.zeros((0, clip_len), np.float32)
    elif waves:
        fe = frontend(features)
        x = fe(torch.from_numpy(np.stack(waves))).numpy()
    else:
        x = np.zeros((0, features.n_mels, features.n_frames), np.float32)
    return {"x": x, "epoch": np.asarray(epochs, dtype=np.int64), "clip": np.asarray(ids, dtype=np.int64)}


def read_object(uri: str, fs, retries: int) -> bytes:
    """A whole object, retried; a missing one is Skip("missing"), one still unreadable Skip("read_error")
    (storage, not audio: it has its own limit)."""
    try:
        return read_bytes(uri, retries=retries, fs=fs)
    except FileNotFoundError:
        raise Skip("missing", "no such object") from None
    except Exception as e:  # after retries
        raise Skip("read_error", f"{type(e).__name__}: {str(e)[:120]}") from None


def _seek_crops(uri: str, size: int, fs, features: FeaturesConfig, data: DataConfig, rng) -> list[np.ndarray]:
    """A long object's crops, read around their windows (opening retried like whole reads)."""
    def read(f):
        return read_crops(ReadAhead(f, size), features.sample_rate, features.clip_samples, data.crops_per_file,
                          rng, data.max_channels, data.short_audio)
    try:
        return with_retries(lambda: _open_and(fs, uri, read), data.read_retries)
    except FileNotFoundError:
        raise Skip("missing", "no such object") from None
    except OSError as e:
        raise Skip("read_error", f"{type(e).__name__}: {str(e)[:120]}") from None


def _open_and(fs, uri: str, fn):
    with fs.open_input_file(uri[len("s3://"):] if uri.startswith("s3://") else uri) as f:
        return fn(f)


def measure_stats(cfg: Config, listing: Listing) -> dict[str, float]:
    """`features.mean`/`std` over real frames of one crop from each of a seeded sample of files."""
    fc, n = cfg.features, min(cfg.data.stats_files, len(listing.files))
    picked = [listing.files[i] for i in np.random.default_rng([cfg.seed, 0x57A7]).choice(len(listing.files), n,
                                                                                        replace=False)]

    def one_crop(f: FileEntry):
        try:
            wav = decode(read_bytes(f.uri, cfg.storage.s3_endpoint, cfg.storage.s3_region), fc.sample_rate,
                         cfg.data.max_channels, cfg.data.min_seconds, cfg.data.trim_silence, cfg.data.max_decoded_mb)
        except Exception:  # noqa: BLE001 - a bad or unreadable file is left out of the sample, as in training
            return None
        return crops(wav, fc.clip_samples, 1, crop_rng(cfg.seed, 0, f.key))[0] if len(wav) > fc.clip_samples else wav

    with ThreadPoolExecutor(8) as pool:
        stats = logmel_stats((w for w in pool.map(one_crop, picked) if w is not None), fc)
    if stats is None:
        raise DataSourceError(f"data.source '{cfg.data.source}': none of {n} sampled files decoded, "
                              "so features.mean/std cannot be measured")
    return stats


@lru_cache(maxsize=4)
def _order(n_files: int, seed: int, epoch: int) -> np.ndarray:
    return epoch_order(n_files, seed, epoch)


def plan_rows(batch: dict[str, np.ndarray], files, seed: int, start_epoch: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: plan positions (pass * n_files + i) -> the (uri, key, epoch) row they visit.

    Passes are computed where they are read, never materialised: the driver holds one list of the
    files, whatever train.steps is."""
    uris, keys, sizes = fetch_once(files)
    n = len(uris)
    ids = batch["id"].astype(np.int64)
    epochs = start_epoch + ids // n
    idx = np.array([_order(n, seed, int(e))[i] for e, i in zip(epochs, ids % n)], dtype=np.int64)
    return {"uri": uris[idx], "key": keys[idx], "size": sizes[idx], "epoch": epochs}


def put_listing(listing: Listing) -> tuple["ray.ObjectRef", int]:
    """The listing's URIs, keys and sizes in the object store, once: (ref, number of files)."""
    return ray.put((np.array([f.uri for f in listing.files], dtype=object),
                    np.array([f.key for f in listing.files], dtype=object),
                    np.array([f.size for f in listing.files], dtype=np.int64))), len(listing.files)


def decode_memory(data: DataConfig) -> int:
    """Bytes one decode task may hold: the object, the decoded file, its resampled copy.  Declared to Ray
    so that a node never runs more of them than its memory holds (no OOM-kill and retry loop)."""
    return int((data.max_file_mb + 2 * data.max_decoded_mb) * 2 ** 20)


def build_dataset(cfg: Config, listing: "Listing | tuple", ledger=None, passes: int | None = None,
                  start_epoch: int = 0) -> "ray.data.Dataset":
    """The streaming clip dataset for `passes` passes over the listing (or `put_listing`'s result), each in
    its own order, from pass `start_epoch` on."""
    quiet_ray_data()  # here, so that datasets built in a sweep's trial process are quiet too
    files, n = listing if isinstance(listing, tuple) else put_listing(listing)
    passes = passes or max(1, passes_needed(cfg, n) - start_epoch)
    total = passes * n
    ds = ray.data.range(total, override_num_blocks=max(1, min(total // 8, 4096)))
    ds = ds.map_batches(plan_rows, batch_size=4, batch_format="numpy",
                        fn_kwargs=dict(files=files, seed=cfg.seed, start_epoch=start_epoch), num_cpus=1,
                        memory=decode_memory(cfg.data), concurrency=cfg.data.concurrency or None)  # fuses with:
    return ds.map_batches(clips_from_files, batch_size=4, batch_format="numpy", memory=decode_memory(cfg.data),
                          fn_kwargs=dict(features=cfg.features, data=cfg.data, storage=cfg.storage, seed=cfg.seed,
                                         ledger=ledger),
                          num_cpus=1, concurrency=cfg.data.concurrency or None)


__all__ = ["Listing", "DataSourceError", "list_source", "build_dataset", "clips_from_files", "epoch_order",
           "passes_needed", "measure_stats", "put_listing", "read_object"]

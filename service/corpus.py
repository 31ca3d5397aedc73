"""Prepared corpora: audio decoded once into Parquet shards, then streamed in a seeded, resumable order.

A corpus is a directory or s3:// prefix:
  plan.json                 what is being prepared (listing digest, tasks, segmenting): written first
  shards/part-T-K.parquet   mono int16 PCM at the model rate, one row per segment (key, segment, samples,
                            pcm, crc32), in row groups of `row_group` segments
  done/part-T.json          task T's record (its shards' row groups, index rows, skips, log-mel sums):
                            written after its shards, so a killed run's half-written task is simply redone
  index.parquet             one row per segment: id, key, segment, seconds, shard, row_group, crc32
  corpus.json               the summary, written last: a source is a prepared corpus once it exists

Training reads one random crop of every segment per pass.  Each pass permutes the row groups from
(seed, pass) and cuts the permutation into windows of `data.shuffle_blocks` row groups (the shuffle
buffer); windows are dealt to ranks in turn across passes, and a window's segments are shuffled from
(seed, pass, window).  Every rank's clip sequence is thus a pure function of the seed, and a position in
it (clips consumed) is all a checkpoint needs to resume exactly.
"""
from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from service.audio import Skip, crops, decode
from service.config import Config, DataConfig, FeaturesConfig, StorageConfig
from service.data import (DataSourceError, Listing, check_skips, fetch_once, list_source, put_listing,
                          quiet_ray_data, read_object)
from service.features import frontend, logmel_sums, stats_from_sums
from service.storage import join, read_bytes, resolve, write_bytes


CORPUS, PLAN, INDEX, VERSION = "corpus.json", "plan.json", "index.parquet", 1
SCHEMA = pa.schema([("key", pa.string()), ("segment", pa.int32()), ("samples", pa.int32()),
                    ("pcm", pa.binary()), ("crc32", pa.int64())])


@dataclass(frozen=True)
class PrepareOptions:
    """How a corpus is cut: ~segment_seconds per segment, row groups of row_group segments, shards of
    about shard_mb, tasks of at most task_mb of source bytes or task_files files."""
    segment_seconds: float = 10.0
    row_group: int = 64
    shard_mb: float = 128.0
    task_mb: float = 256.0
    task_files: int = 1000

    def validate(self) -> None:
        for k in ("segment_seconds", "row_group", "shard_mb", "task_mb", "task_files"):
            if not getattr(self, k) > 0:
                raise ValueError(f"prepare option {k}={getattr(self, k)!r} must be > 0")


def _exists(uri: str, st: StorageConfig) -> bool:
    fs, path = resolve(uri, st.s3_endpoint, st.s3_region)
    return fs.get_file_info(path).type == pafs.FileType.File


def _read_json(uri: str, st: StorageConfig) -> dict:
    return json.loads(read_bytes(uri, st.s3_endpoint, st.s3_region))


def _write_json(uri: str, obj: dict, st: StorageConfig) -> None:
    write_bytes(uri, json.dumps(obj, indent=1).encode(), st.s3_endpoint, st.s3_region)


def is_corpus(source: str, st: StorageConfig) -> bool:
    """True when `source` is a finished prepared corpus (its corpus.json exists)."""
    if not source or source.lower().endswith((".csv", ".parquet")):
        return False
    try:
        return _exists(join(source, CORPUS), st)
    except OSError:
        return False


def load_corpus(source: str, cfg: Config) -> dict:
    """The corpus summary, checked against the run (version, sample rate)."""
    c = _read_json(join(source, CORPUS), cfg.storage)
    if c.get("version") != VERSION:
        raise DataSourceError(f"{source}: corpus version {c.get('version')!r}, this service reads {VERSION}; "
                              "prepare it again with jobs.prepare")
    if c["sample_rate"] != cfg.features.sample_rate:
        raise DataSourceError(f"{source} was prepared at {c['sample_rate']} Hz but features.sample_rate is "
                              f"{cfg.features.sample_rate}; prepare it again with this config")
    if not c["blocks"]:
        raise DataSourceError(f"{source}: the prepared corpus has no segments (every file was skipped)")
    return c


# --- prepare ------------------------------------------------------------------------------------------
def plan_tasks(sizes: list[int], task_mb: float, task_files: int) -> list[list[int]]:
    """Contiguous [start, end) ranges of the sorted listing: at most task_files files or task_mb bytes each."""
    tasks, start, acc = [], 0, 0
    for i, s in enumerate(sizes):
        if i > start and (i - start >= task_files or acc + s > task_mb * 2 ** 20):
            tasks.append([start, i])
            start, acc = i, 0
        acc += s
    if start < len(sizes):
        tasks.append([start, len(sizes)])
    return tasks


def segment(wav: np.ndarray, sample_rate: int, seconds: float) -> list[np.ndarray]:
    """A waveform cut into k near-equal segments of about `seconds` (k >= 1)."""
    k = max(1, int(round(len(wav) / (sample_rate * seconds))))
    return np.array_split(wav, k)


def to_pcm(wav: np.ndarray) -> bytes:
    return (np.clip(wav, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def from_pcm(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767.0


class _ShardWriter:
    """Buffers one shard in memory (row groups of `row_group`), uploads it whole when it passes shard_mb:
    a shard object is either complete or absent."""

    def __init__(self, out: str, task: int, opts: PrepareOptions, st: StorageConfig):
        self.out, self.task, self.opts, self.st = out, task, opts, st
        self.shards: list[dict] = []
        self.rows: list[dict] = []
        self._open()

    def _open(self):
        self.name = f"part-{self.task:05d}-{len(self.shards):02d}.parquet"
        self.sink = pa.BufferOutputStream()
        self.writer = pq.ParquetWriter(self.sink, SCHEMA, compression="zstd")
        self.groups: list[int] = []

    def add(self, key: str, seg: int, pcm: bytes) -> tuple[str, int, int]:
        """Queue a segment; returns the (shard, row group) it will land in and its crc32."""
        crc = zlib.crc32(pcm)
        self.rows.append({"key": key, "segment": seg, "samples": len(pcm) // 2, "pcm": pcm, "crc32": crc})
        where = (self.name, len(self.groups), crc)
        if len(self.rows) == self.opts.row_group:
            self._flush_group()
        return where

    def _flush_group(self):
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=SCHEMA), row_group_size=len(self.rows))
            self.groups.append(len(self.rows))
            self.rows = []
            if self.sink.tell() > self.opts.shard_mb * 2 ** 20:
                self._commit()
                self._open()

    def _commit(self):
        self.writer.close()
        if self.groups:
            data = self.sink.getvalue().to_pybytes()
            write_bytes(join(self.out, f"shards/{self.name}"), data, self.st.s3_endpoint, self.st.s3_region)
            self.shards.append({"name": self.name, "row_groups": self.groups, "bytes": len(data)})

    def close(self) -> list[dict]:
        self._flush_group()
        self._commit()
        return self.shards


def prepare_task(task: int, uris, keys, start: int, end: int, out: str, opts: PrepareOptions,
                 fc: FeaturesConfig, dc: DataConfig, st: StorageConfig) -> dict:
    """Decode files [start, end) of the listing into shards; the task's done record (not yet written)."""
    torch.set_num_threads(1)
    writer = _ShardWriter(out, task, opts, st)
    rows, skipped, sums, files, seconds = [], [], [0.0, 0.0, 0], 0, 0.0
    fs_cache: dict[str, pafs.FileSystem] = {}
    for uri, key in zip(uris[start:end], keys[start:end]):
        uri, key = str(uri), str(key)
        root = "s3://" if uri.startswith("s3://") else "/"
        fs = fs_cache.setdefault(root, resolve(root, st.s3_endpoint, st.s3_region)[0])
        try:
            wav = decode(read_object(uri, fs, dc.read_retries), fc.sample_rate, dc.max_channels, dc.min_seconds,
                         dc.trim_silence, dc.max_decoded_mb)
        except Skip as s:
            skipped.append([uri, s.reason, s.detail])
            continue
        files += 1
        seconds += len(wav) / fc.sample_rate
        for i, seg in enumerate(segment(wav, fc.sample_rate, opts.segment_seconds)):
            pcm = to_pcm(seg)
            shard, group, crc = writer.add(key, i, pcm)
            rows.append([key, i, round(len(seg) / fc.sample_rate, 3), shard, group, crc])
            t, q, n = logmel_sums(seg[:fc.clip_samples], fc)
            sums = [sums[0] + t, sums[1] + q, sums[2] + n]
    return {"task": task, "files": files, "seconds": seconds, "shards": writer.close(), "rows": rows,
            "skipped": skipped, "sums": sums}


def _prepare_batch(batch: dict[str, np.ndarray], listing, plan: dict, out: str, opts: PrepareOptions,
                   fc: FeaturesConfig, dc: DataConfig, st: StorageConfig) -> dict[str, np.ndarray]:
    """Ray Data UDF: task ids -> their done records (written here, after the shards)."""
    uris, keys, _ = fetch_once(listing)
    done = []
    for t in batch["task"]:
        start, end = plan["tasks"][int(t)]
        rec = prepare_task(int(t), uris, keys, start, end, out, opts, fc, dc, st)
        _write_json(join(out, f"done/part-{int(t):05d}.json"), rec, st)
        done.append(json.dumps({k: rec[k] for k in ("task", "files", "seconds")} |
                               {"segments": len(rec["rows"]), "skipped": len(rec["skipped"])}))
    return {"done": np.array(done, dtype=object)}


def _listing_digest(listing: Listing) -> str:
    h = hashlib.sha256()
    for f in listing.files:
        h.update(f"{f.key}\t{f.size}\n".encode())
    return h.hexdigest()


def _done_tasks(out: str, st: StorageConfig) -> set[int]:
    fs, path = resolve(join(out, "done"), st.s3_endpoint, st.s3_region)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return set()
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File]
    return {int(n[len("part-"):-len(".json")]) for n in names if n.startswith("part-") and n.endswith(".json")}


def prepare(cfg: Config, out: str, opts: PrepareOptions = PrepareOptions(), progress=print) -> dict:
    """Driver of jobs.prepare: list `cfg.data.source`, decode every file once into shards under `out`,
    then write the index and corpus.json.  Re-running with the same source resumes: finished tasks are kept."""
    opts.validate()
    st, fc = cfg.storage, cfg.features
    out = out.rstrip("/")
    listing = list_source(cfg)
    digest = _listing_digest(listing)
    if is_corpus(out, st):
        c = _read_json(join(out, CORPUS), st)
        if c.get("listing_sha256") != digest:
            raise DataSourceError(f"{out} is a finished corpus of another listing of {c.get('source')} (files were "
                                  "added, removed or changed since): prepare into another --out")
        progress(f"prepare: {out} is already a finished corpus of this source ({c['files']} files, "
                 f"{c['segments']} segments); nothing to do")
        return c
    settings = {"source": cfg.data.source, "listing_sha256": digest, "sample_rate": fc.sample_rate,
                "options": opts.__dict__, "data": {k: getattr(cfg.data, k) for k in
                                                   ("min_seconds", "max_channels", "trim_silence", "max_decoded_mb")}}
    plan_uri = join(out, PLAN)
    if _exists(plan_uri, st):
        plan = _read_json(plan_uri, st)
        differs = [k for k in settings if plan.get(k) != settings[k]]
        if differs:
            raise DataSourceError(f"{out} holds a preparation of another source or settings ({', '.join(differs)} "
                                  "differ): use another --out, or delete it to start over")
    else:
        plan = {**settings, "version": VERSION, "tasks": plan_tasks([f.size for f in listing.files], opts.task_mb,
                                                                     opts.task_files)}
        _write_json(plan_uri, plan, st)
    done = _done_tasks(out, st) & set(range(len(plan["tasks"])))
    todo = [t for t in range(len(plan["tasks"])) if t not in done]
    progress(f"prepare: {len(listing.files)} files in {cfg.data.source} -> {out}: {len(plan['tasks'])} tasks, "
             f"{len(done)} already done, {len(todo)} to do")
    if todo:
        quiet_ray_data()
        files, _ = put_listing(listing)
        ds = ray.data.from_items([{"task": t} for t in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(_prepare_batch, batch_size=1, batch_format="numpy", num_cpus=1,
                            memory=_task_memory(opts, cfg.data), concurrency=cfg.data.concurrency or None,
                            fn_kwargs=dict(listing=files, plan=plan, out=out, opts=opts, fc=fc, dc=cfg.data, st=st))
        t0, last, n, segs = time.time(), 0.0, 0, 0
        for row in ds.iter_rows():
            rec = json.loads(row["done"])
            n, segs = n + 1, segs + rec["segments"]
            if time.time() - last > 10 or n == len(todo):
                last = time.time()
                progress(f"prepare: {len(done) + n}/{len(plan['tasks'])} tasks, {segs} segments this run, "
                         f"{(time.time() - t0):.0f} s")
    return _commit(cfg, out, plan, listing, progress)


def _task_memory(opts: PrepareOptions, dc: DataConfig) -> int:
    """Bytes a prepare task may hold: the shard buffer plus one decoded file (and its resampled copy)."""
    return int((opts.shard_mb * 2 + dc.max_decoded_mb * 3) * 2 ** 20)


def _commit(cfg: Config, out: str, plan: dict, listing: Listing, progress) -> dict:
    """Index and corpus.json from every task's done record; fails (committing nothing) on too many skips."""
    st = cfg.storage
    blocks, skipped, sums, files, seconds = [], [], [0.0, 0.0, 0], 0, 0.0
    writer, sink, next_id = None, pa.BufferOutputStream(), 0
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(16) as pool:  # in order; many small GETs at once
        records = pool.map(lambda t: _read_json(join(out, f"done/part-{t:05d}.json"), st), range(len(plan["tasks"])))
    for rec in records:
        files, seconds = files + rec["files"], seconds + rec["seconds"]
        skipped += rec["skipped"]
        sums = [a + b for a, b in zip(sums, rec["sums"])]
        first = next_id
        for sh in rec["shards"]:
            for g, n in enumerate(sh["row_groups"]):
                blocks.append([sh["name"], g, n, next_id])
                next_id += n
        if rec["rows"]:
            cols = list(zip(*rec["rows"]))
            table = pa.table({"id": pa.array(range(first, first + len(rec["rows"])), pa.int64()),
                              "key": pa.array(cols[0], pa.string()), "segment": pa.array(cols[1], pa.int32()),
                              "seconds": pa.array(cols[2], pa.float32()), "shard": pa.array(cols[3], pa.string()),
                              "row_group": pa.array(cols[4], pa.int32()), "crc32": pa.array(cols[5], pa.int64())})
            writer = writer or pq.ParquetWriter(sink, table.schema, compression="zstd")
            writer.write_table(table)
    skipped += [[f.uri, "too_large", f"{f.size} bytes"] for f in listing.too_large]
    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for uri, reason, _ in sorted(skipped):
        counts[reason] = counts.get(reason, 0) + 1
        if len(examples.setdefault(reason, [])) < 5:
            examples[reason].append(uri)
    listed = len(listing.files) + len(listing.too_large)
    problem = check_skips({"files_seen": listed, "skipped": counts, "examples": examples}, cfg.data)
    if problem:
        raise DataSourceError(f"prepare {out}: {problem}. The shards are kept: re-run with a higher threshold to "
                              "commit the corpus anyway")
    if writer is not None:
        writer.close()
        write_bytes(join(out, INDEX), sink.getvalue().to_pybytes(), st.s3_endpoint, st.s3_region)
    stats = stats_from_sums(*sums)
    summary = {"version": VERSION, "source": plan["source"], "listing_sha256": plan["listing_sha256"],
               "sample_rate": plan["sample_rate"],
               "segment_seconds": plan["options"]["segment_seconds"], "files": files, "listed": listed,
               "segments": next_id, "hours": round(seconds / 3600, 4), "skipped": counts,
               "skipped_examples": examples, "skipped_files": sorted(skipped),
               "stats": stats, "blocks": blocks, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_json(join(out, CORPUS), summary, st)
    progress(f"prepare: committed {out}: {files} files, {next_id} segments, {seconds / 3600:.2f} h, "
             f"{len(blocks)} row groups; skipped " + (", ".join(f"{r}={n}" for r, n in counts.items()) or "none")
             + (f"; log-mel mean {stats['features.mean']} std {stats['features.std']}" if stats else ""))
    return summary


# --- read ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _pass_order(n_blocks: int, seed: int, p: int) -> np.ndarray:
    """Row-group order of pass p; windows are its consecutive runs of data.shuffle_blocks."""
    return np.random.default_rng([seed, p, 0xB10C]).permutation(n_blocks)


def _window_sizes(rows: np.ndarray, k: int, seed: int, p: int) -> np.ndarray:
    order = _pass_order(len(rows), seed, p)
    return np.add.reduceat(rows[order], np.arange(0, len(rows), k))


class RankStream:
    """Rank `rank`'s clip sequence over a corpus: the windows g = rank, rank + world, ... of the global
    sequence of windows (pass p holds windows p*n_w ... p*n_w + n_w - 1).  Positions count clips."""

    def __init__(self, rows: np.ndarray, k: int, seed: int, rank: int, world: int):
        self.rows, self.k, self.seed, self.rank, self.world = rows, k, seed, rank, world
        self.n_w = -(-len(rows) // k)
        self._pass_start = [0]  # position of the rank's first clip in pass p, for the passes computed so far

    @classmethod
    def of(cls, blocks: list, shuffle_blocks: int, seed: int, rank: int, world: int) -> "RankStream":
        """The stream over a corpus's row groups (`blocks`), windows of at most `shuffle_blocks` of them."""
        rows = np.array([b[2] for b in blocks], dtype=np.int64)
        return cls(rows, min(shuffle_blocks, len(rows)), seed, rank, world)

    def _mine(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """(window indices in pass p dealt to this rank, their sizes)."""
        first = (self.rank - p * self.n_w) % self.world
        w = np.arange(first, self.n_w, self.world)
        return w, _window_sizes(self.rows, self.k, self.seed, p)[w]

    def pass_start(self, p: int) -> int:
        while len(self._pass_start) <= p:
            q = len(self._pass_start) - 1
            self._pass_start.append(self._pass_start[q] + int(self._mine(q)[1].sum()))
        return self._pass_start[p]

    def locate(self, pos: int) -> tuple[int, int, int]:
        """(j, p, offset): the rank's j-th window (in pass p) holds clip `pos` at `offset`."""
        p = 0
        while self.pass_start(p + 1) <= pos:
            p += 1
        w, sizes = self._mine(p)
        ends = self.pass_start(p) + np.cumsum(sizes)
        i = int(np.searchsorted(ends, pos, side="right"))
        j = (p * self.n_w + int(w[i]) - self.rank) // self.world
        return j, p, int(pos - (ends[i] - sizes[i]))

    def window(self, j: int) -> tuple[int, int, int]:
        """(pass, window in pass, position of its first clip) of the rank's j-th window."""
        g = self.rank + self.world * j
        p, w = divmod(g, self.n_w)
        mine, sizes = self._mine(p)
        i = int(np.searchsorted(mine, w))
        return p, w, self.pass_start(p) + int(sizes[:i].sum())

    def blocks(self, p: int, w: int) -> np.ndarray:
        return _pass_order(len(self.rows), self.seed, p)[w * self.k:(w + 1) * self.k]


@lru_cache(maxsize=16)
def _shard_file(uri: str, endpoint: str | None, region: str) -> pq.ParquetFile:
    fs, path = resolve(uri, endpoint, region)
    return pq.ParquetFile(fs.open_input_file(path))


def read_block(root: str, block: list, st: StorageConfig) -> pa.Table:
    """One row group, every segment's checksum verified (a mismatch names the shard and the segment)."""
    shard, group, n, _ = block
    uri = join(root, f"shards/{shard}")
    for attempt in range(3):
        try:
            table = _shard_file(uri, st.s3_endpoint, st.s3_region).read_row_group(group)
            break
        except OSError:
            _shard_file.cache_clear()
            if attempt == 2:
                raise
            time.sleep(0.5 * 2 ** attempt)
    if table.num_rows != n:
        raise DataSourceError(f"{uri} row group {group}: {table.num_rows} segments, the corpus index says {n}")
    for key, seg, pcm, crc in zip(table["key"].to_pylist(), table["segment"].to_pylist(), table["pcm"].to_pylist(),
                                  table["crc32"].to_pylist()):
        if zlib.crc32(pcm) != crc:
            raise DataSourceError(f"{uri} row group {group}: segment {seg} of {key} fails its checksum "
                                  "(the shard is damaged; prepare the corpus again)")
    return table


def segment_crop_rng(seed: int, p: int, key: str, seg: int) -> np.random.Generator:
    return np.random.default_rng([seed, p, zlib.crc32(f"{key}#{seg}".encode())])


def window_segments(stream: RankStream, blocks: list, p: int, w: int, root: str, st: StorageConfig):
    """Window w of pass p in stream order: (key, segment, pcm bytes, segment id) per segment.  The one
    definition of the order that training, resume and audits share."""
    keys, segs, pcms, sids = [], [], [], []
    for b in stream.blocks(p, w):
        t = read_block(root, blocks[b], st)
        keys += t["key"].to_pylist()
        segs += t["segment"].to_pylist()
        pcms += t["pcm"].to_pylist()
        sids += range(blocks[b][3], blocks[b][3] + t.num_rows)
    order = np.random.default_rng([stream.seed, p, w, 0x5EC]).permutation(len(keys))
    return [(keys[o], segs[o], pcms[o], sids[o]) for o in order]


def clip_ids(cfg: Config, corpus: dict, rank: int, world: int, n: int) -> list[int]:
    """The segment ids of the first n clips of a rank's stream (to audit what a run consumed)."""
    stream = RankStream.of(corpus["blocks"], cfg.data.shuffle_blocks, cfg.seed, rank, world)
    out, j = [], 0
    while len(out) < n:
        p, w, _ = stream.window(j)
        out += [sid for *_, sid in window_segments(stream, corpus["blocks"], p, w, cfg.data.source.rstrip("/"),
                                                   cfg.storage)]
        j += 1
    return out[:n]


_STREAMS: dict = {}


def window_clips(batch: dict[str, np.ndarray], corpus, root: str, seed: int, k: int, rank: int, world: int,
                 first: int, start: int, fc: FeaturesConfig, dc: DataConfig, st: StorageConfig, ledger=None):
    """Ray Data UDF: rows `id` (the rank's windows counted from `first`) -> their clips (x, epoch, clip id,
    stream position), in stream order.  Clips before position `start` (the resume point) are dropped."""
    torch.set_num_threads(1)
    blocks = fetch_once(corpus)
    key = (corpus.hex() if isinstance(corpus, ray.ObjectRef) else id(corpus), k, seed, rank, world)
    if key not in _STREAMS:  # one per process: its pass positions are computed once
        _STREAMS.clear()
        _STREAMS[key] = RankStream.of(blocks, k, seed, rank, world)
    stream = _STREAMS[key]
    waves, epochs, ids, positions, sources = [], [], [], [], set()
    for j in batch["id"]:
        p, w, pos0 = stream.window(first + int(j))
        for i, (key, seg, pcm, sid) in enumerate(window_segments(stream, blocks, p, w, root, st)):
            if pos0 + i < start:
                continue
            sources.add(key)
            audio = np.frombuffer(pcm, dtype="<i2") if dc.features_in == "trainer" else from_pcm(pcm)
            waves.append(crops(audio, fc.clip_samples, 1, segment_crop_rng(seed, p, key, seg), dc.short_audio)[0])
            epochs.append(p)
            ids.append(sid)
            positions.append(pos0 + i)
    if ledger is not None:
        ray.get(ledger.record.remote(sorted(sources), len(waves), []))  # the source files these clips came from
    if dc.features_in == "trainer":  # int16 PCM as stored, cropped as is: half the bytes; the trainer scales it
        x = np.stack(waves) if waves else np.zeros((0, fc.clip_samples), np.int16)
    elif waves:
        x = frontend(fc)(torch.from_numpy(np.stack(waves))).numpy()
    else:
        x = np.zeros((0, fc.n_mels, fc.n_frames), np.float32)
    return {"x": x, "epoch": np.asarray(epochs, np.int64), "clip": np.asarray(ids, np.int64),
            "pos": np.asarray(positions, np.int64)}


def rank_dataset(cfg: Config, corpus: dict, corpus_ref, rank: int, world: int, start: int, end: int,
                 ledger=None) -> "ray.data.Dataset":
    """Rank's clips at positions [start, end) (end rounded up to whole windows), lazily: one row per window,
    so nothing on the driver grows with train.steps."""
    stream = RankStream.of(corpus["blocks"], cfg.data.shuffle_blocks, cfg.seed, rank, world)
    rows, k = stream.rows, stream.k
    j0 = stream.locate(start)[0]
    j1 = stream.locate(max(end - 1, start))[0] + 1
    clips, fc = k * int(rows.max()), cfg.features
    # declared to Ray: the process (~512 MB with torch), the window's PCM and crops, the batched STFT
    window_bytes = 2 ** 29 + clips * (corpus["segment_seconds"] * 1.5 * fc.sample_rate * 6 + fc.clip_samples * 8
                                      + (fc.n_fft // 2 + 1) * fc.n_frames * 24)
    ds = ray.data.range(j1 - j0, override_num_blocks=max(1, min(j1 - j0, 4096)))
    return ds.map_batches(window_clips, batch_size=1, batch_format="numpy", num_cpus=1,
                          memory=int(window_bytes), concurrency=cfg.data.concurrency or None,
                          fn_kwargs=dict(corpus=corpus_ref, root=cfg.data.source.rstrip("/"), seed=cfg.seed, k=k,
                                         rank=rank, world=world, first=j0, start=start, fc=cfg.features,
                                         dc=cfg.data, st=cfg.storage, ledger=ledger))


def example_segment(cfg: Config, corpus: dict) -> np.ndarray:
    """The first segment of the corpus (for pictures)."""
    t = read_block(cfg.data.source.rstrip("/"), corpus["blocks"][0], cfg.storage)
    return from_pcm(t["pcm"][0].as_py())


__all__ = ["PrepareOptions", "prepare", "is_corpus", "load_corpus", "rank_dataset", "RankStream", "read_block",
           "clip_ids", "window_segments",
           "plan_tasks", "segment"]

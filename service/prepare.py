"""Writing a prepared corpus (`jobs.prepare`): every file of a source decoded once into Parquet shards.

The work is cut into tasks of contiguous listing ranges; each task writes its shards, then its done
record, so a killed preparation resumes by redoing only the tasks without one.  The index and
`corpus.json` are written last, from the done records (`service.corpus` says what a corpus holds and
reads it).
"""
from __future__ import annotations

import hashlib
import json
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from service.audio import Skip, decode
from service.config import Config, DataConfig, FeaturesConfig, StorageConfig
from service.corpus import CORPUS, INDEX, PLAN, SCHEMA, VERSION, exists, is_corpus, read_json, write_json
from service.data import DataSourceError, Listing, list_source, put_listing, read_object
from service.features import logmel_sums, stats_from_sums
from service.ledger import check_skips, skip_totals
from service.raydata import fetch_once, quiet_ray_data, refuse_local_paths
from service.storage import join, resolve, write_bytes


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
        write_json(join(out, f"done/part-{int(t):05d}.json"), rec, st)
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
    refuse_local_paths({"data.source": cfg.data.source, "--out": out})
    listing = list_source(cfg)
    digest = _listing_digest(listing)
    if is_corpus(out, st):
        c = read_json(join(out, CORPUS), st)
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
    if exists(plan_uri, st):
        plan = read_json(plan_uri, st)
        differs = [k for k in settings if plan.get(k) != settings[k]]
        if differs:
            raise DataSourceError(f"{out} holds a preparation of another source or settings ({', '.join(differs)} "
                                  "differ): use another --out, or delete it to start over")
    else:
        plan = {**settings, "version": VERSION, "tasks": plan_tasks([f.size for f in listing.files], opts.task_mb,
                                                                     opts.task_files)}
        write_json(plan_uri, plan, st)
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
    with ThreadPoolExecutor(16) as pool:  # in order; many small GETs at once
        records = pool.map(lambda t: read_json(join(out, f"done/part-{t:05d}.json"), st), range(len(plan["tasks"])))
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
    listed = len(listing.files) + len(listing.too_large)
    totals = skip_totals(listed, skipped)
    counts, examples = totals["skipped"], totals["examples"]
    problem = check_skips(totals, cfg.data)
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
    write_json(join(out, CORPUS), summary, st)
    progress(f"prepare: committed {out}: {files} files, {next_id} segments, {seconds / 3600:.2f} h, "
             f"{len(blocks)} row groups; skipped " + (", ".join(f"{r}={n}" for r, n in counts.items()) or "none")
             + (f"; log-mel mean {stats['features.mean']} std {stats['features.std']}" if stats else ""))
    return summary


__all__ = ["PrepareOptions", "prepare", "plan_tasks", "segment", "to_pcm"]

"""Prepared corpora: what one holds, and reading it as exact, resumable per-rank streams.

A corpus is a directory or s3:// prefix (written by `service.prepare`):
  plan.json                 what is being prepared (listing digest, tasks, segmenting): written first
  shards/part-T-K.parquet   mono int16 PCM at the model rate, one row per segment (key, segment, samples,
                            pcm, crc32), in row groups of `row_group` segments (a "block")
  done/part-T.json          task T's record (its shards' row groups, index rows, skips, log-mel sums):
                            written after its shards, so a killed run's half-written task is simply redone
  index.parquet             one row per segment: id, key, segment, seconds, shard, row_group, crc32
  corpus.json               the summary, written last: a source is a prepared corpus once it exists

Training reads one random crop of every segment per pass.  Each pass permutes the blocks from
(seed, pass) and cuts the permutation into shuffle buffers of `data.shuffle_blocks` blocks; buffers
are dealt to ranks in turn across passes, and a buffer's segments are shuffled from (seed, pass,
buffer).  Every rank's clip sequence is thus a pure function of the seed, and a position in it
(clips consumed) is all a checkpoint needs to resume exactly.
"""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from service.audio import crops
from service.config import Config, DataConfig, FeaturesConfig, StorageConfig
from service.data import DataSourceError
from service.features import frontend
from service.raydata import fetch_once
from service.storage import join, read_bytes, resolve, write_bytes


CORPUS, PLAN, INDEX, VERSION = "corpus.json", "plan.json", "index.parquet", 1
SCHEMA = pa.schema([("key", pa.string()), ("segment", pa.int32()), ("samples", pa.int32()),
                    ("pcm", pa.binary()), ("crc32", pa.int64())])


def exists(uri: str, st: StorageConfig) -> bool:
    fs, path = resolve(uri, st.s3_endpoint, st.s3_region)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_json(uri: str, st: StorageConfig) -> dict:
    return json.loads(read_bytes(uri, st.s3_endpoint, st.s3_region))


def write_json(uri: str, obj: dict, st: StorageConfig) -> None:
    write_bytes(uri, json.dumps(obj, indent=1).encode(), st.s3_endpoint, st.s3_region)


def is_corpus(source: str, st: StorageConfig) -> bool:
    """True when `source` is a finished prepared corpus (its corpus.json exists)."""
    if not source or source.lower().endswith((".csv", ".parquet")):
        return False
    try:
        return exists(join(source, CORPUS), st)
    except OSError:
        return False


def load_corpus(source: str, cfg: Config) -> dict:
    """The corpus summary, checked against the run (version, sample rate)."""
    c = read_json(join(source, CORPUS), cfg.storage)
    if c.get("version") != VERSION:
        raise DataSourceError(f"{source}: corpus version {c.get('version')!r}, this service reads {VERSION}; "
                              "prepare it again with jobs.prepare")
    if c["sample_rate"] != cfg.features.sample_rate:
        raise DataSourceError(f"{source} was prepared at {c['sample_rate']} Hz but features.sample_rate is "
                              f"{cfg.features.sample_rate}; prepare it again with this config")
    if not c["blocks"]:
        raise DataSourceError(f"{source}: the prepared corpus has no segments (every file was skipped)")
    return c


def from_pcm(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767.0


# --- the per-rank stream ------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _pass_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """Block order of pass `epoch`; its shuffle buffers are consecutive runs of data.shuffle_blocks."""
    return np.random.default_rng([seed, epoch, 0xB10C]).permutation(n_blocks)


def _buffer_sizes(block_sizes: np.ndarray, blocks_per_buffer: int, seed: int, epoch: int) -> np.ndarray:
    """Segments in each shuffle buffer of pass `epoch`."""
    order = _pass_order(len(block_sizes), seed, epoch)
    return np.add.reduceat(block_sizes[order], np.arange(0, len(block_sizes), blocks_per_buffer))


class Buffer(NamedTuple):
    """A shuffle buffer as one rank's stream sees it: the rank's `nth` buffer is buffer `index` of pass
    `epoch`, and its first clip is at stream position `start`."""
    nth: int
    epoch: int
    index: int
    start: int


class RankStream:
    """Rank `rank`'s clip sequence over a corpus: the buffers rank, rank + world, rank + 2 world, ... of the
    global sequence of shuffle buffers (pass e holds buffers e * buffers_per_pass ... (e + 1) *
    buffers_per_pass - 1).  Positions count the rank's clips from the start of the run."""

    def __init__(self, block_sizes: np.ndarray, blocks_per_buffer: int, seed: int, rank: int, world: int):
        self.block_sizes, self.blocks_per_buffer = block_sizes, blocks_per_buffer
        self.seed, self.rank, self.world = seed, rank, world
        self.buffers_per_pass = -(-len(block_sizes) // blocks_per_buffer)
        self._pass_start = [0]  # position of the rank's first clip in each pass computed so far

    @classmethod
    def of(cls, blocks: list, shuffle_blocks: int, seed: int, rank: int, world: int) -> "RankStream":
        """The stream over a corpus's blocks (`corpus.json`'s [shard, row group, segments, first id] rows)."""
        sizes = np.array([b[2] for b in blocks], dtype=np.int64)
        return cls(sizes, min(shuffle_blocks, len(sizes)), seed, rank, world)

    def _dealt(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices of the buffers of pass `epoch` dealt to this rank, their sizes in segments)."""
        first = (self.rank - epoch * self.buffers_per_pass) % self.world
        index = np.arange(first, self.buffers_per_pass, self.world)
        return index, _buffer_sizes(self.block_sizes, self.blocks_per_buffer, self.seed, epoch)[index]

    def pass_start(self, epoch: int) -> int:
        while len(self._pass_start) <= epoch:
            e = len(self._pass_start) - 1
            self._pass_start.append(self._pass_start[e] + int(self._dealt(e)[1].sum()))
        return self._pass_start[epoch]

    def buffer(self, nth: int) -> Buffer:
        """The rank's `nth` buffer."""
        epoch, index = divmod(self.rank + self.world * nth, self.buffers_per_pass)
        dealt, sizes = self._dealt(epoch)
        i = int(np.searchsorted(dealt, index))
        return Buffer(nth, epoch, index, self.pass_start(epoch) + int(sizes[:i].sum()))

    def locate(self, position: int) -> tuple[Buffer, int]:
        """(the buffer that holds the clip at `position`, the clip's offset in it)."""
        epoch = 0
        while self.pass_start(epoch + 1) <= position:
            epoch += 1
        dealt, sizes = self._dealt(epoch)
        ends = self.pass_start(epoch) + np.cumsum(sizes)
        i = int(np.searchsorted(ends, position, side="right"))
        index, start = int(dealt[i]), int(ends[i] - sizes[i])
        nth = (epoch * self.buffers_per_pass + index - self.rank) // self.world
        return Buffer(nth, epoch, index, start), position - start

    def block_ids(self, buf: Buffer) -> np.ndarray:
        """The blocks a buffer is made of."""
        k = self.blocks_per_buffer
        return _pass_order(len(self.block_sizes), self.seed, buf.epoch)[buf.index * k:(buf.index + 1) * k]


@lru_cache(maxsize=16)
def _shard_file(uri: str, endpoint: str | None, region: str) -> pq.ParquetFile:
    fs, path = resolve(uri, endpoint, region)
    return pq.ParquetFile(fs.open_input_file(path))


def read_block(root: str, block: list, st: StorageConfig) -> pa.Table:
    """One block (a shard's row group), every segment's checksum verified (a mismatch names the shard and
    the segment)."""
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


def segment_crop_rng(seed: int, epoch: int, key: str, seg: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(f"{key}#{seg}".encode())])


def buffer_segments(stream: RankStream, buf: Buffer, blocks: list, root: str, st: StorageConfig):
    """A buffer's segments in stream order: (key, segment, pcm bytes, segment id) each.  The one
    definition of the order that training, resume and audits share."""
    keys, segs, pcms, sids = [], [], [], []
    for b in stream.block_ids(buf):
        t = read_block(root, blocks[b], st)
        keys += t["key"].to_pylist()
        segs += t["segment"].to_pylist()
        pcms += t["pcm"].to_pylist()
        sids += range(blocks[b][3], blocks[b][3] + t.num_rows)
    order = np.random.default_rng([stream.seed, buf.epoch, buf.index, 0x5EC]).permutation(len(keys))
    return [(keys[o], segs[o], pcms[o], sids[o]) for o in order]


def clip_ids(cfg: Config, corpus: dict, rank: int, world: int, n: int) -> list[int]:
    """The segment ids of the first n clips of a rank's stream (to audit what a run consumed)."""
    stream = RankStream.of(corpus["blocks"], cfg.data.shuffle_blocks, cfg.seed, rank, world)
    out, nth = [], 0
    while len(out) < n:
        segments = buffer_segments(stream, stream.buffer(nth), corpus["blocks"], cfg.data.source.rstrip("/"),
                                   cfg.storage)
        out += [sid for *_, sid in segments]
        nth += 1
    return out[:n]


@dataclass(frozen=True)
class RankSlice:
    """What one rank's Ray Data stream reads: the rank's buffers counted from `first_buffer`, dropping the
    clips before `start` (the resume point), cropped and featurised as the run's config says."""
    root: str
    seed: int
    blocks_per_buffer: int
    rank: int
    world: int
    first_buffer: int
    start: int
    features: FeaturesConfig
    data: DataConfig
    storage: StorageConfig


_STREAMS: dict = {}


def _stream(blocks_ref, blocks: list, part: RankSlice) -> RankStream:
    """One RankStream per process (its pass positions are computed once)."""
    key = (blocks_ref.hex() if isinstance(blocks_ref, ray.ObjectRef) else id(blocks_ref), part.blocks_per_buffer,
           part.seed, part.rank, part.world)
    if key not in _STREAMS:
        _STREAMS.clear()
        _STREAMS[key] = RankStream.of(blocks, part.blocks_per_buffer, part.seed, part.rank, part.world)
    return _STREAMS[key]


def buffer_clips(batch: dict[str, np.ndarray], blocks, part: RankSlice, ledger=None) -> dict[str, np.ndarray]:
    """Ray Data UDF: rows `id` (the rank's buffers counted from `part.first_buffer`) -> their clips (x, epoch,
    clip id, stream position), in stream order."""
    torch.set_num_threads(1)
    all_blocks = fetch_once(blocks)
    stream = _stream(blocks, all_blocks, part)
    fc, dc = part.features, part.data
    waves, epochs, ids, positions, sources = [], [], [], [], set()
    for row in batch["id"]:
        buf = stream.buffer(part.first_buffer + int(row))
        for i, (key, seg, pcm, sid) in enumerate(buffer_segments(stream, buf, all_blocks, part.root, part.storage)):
            if buf.start + i < part.start:
                continue
            sources.add(key)
            audio = np.frombuffer(pcm, dtype="<i2") if dc.features_in == "trainer" else from_pcm(pcm)
            waves.append(crops(audio, fc.clip_samples, 1, segment_crop_rng(part.seed, buf.epoch, key, seg),
                               dc.short_audio)[0])
            epochs.append(buf.epoch)
            ids.append(sid)
            positions.append(buf.start + i)
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


def rank_dataset(cfg: Config, corpus: dict, blocks_ref, rank: int, world: int, start: int, end: int,
                 ledger=None) -> "ray.data.Dataset":
    """Rank's clips at positions [start, end) (end rounded up to whole buffers), lazily: one row per buffer,
    so nothing on the driver grows with train.steps."""
    stream = RankStream.of(corpus["blocks"], cfg.data.shuffle_blocks, cfg.seed, rank, world)
    first = stream.locate(start)[0].nth
    last = stream.locate(max(end - 1, start))[0].nth
    n = last - first + 1
    clips, fc = stream.blocks_per_buffer * int(stream.block_sizes.max()), cfg.features
    # declared to Ray: the process (~512 MB with torch), the buffer's PCM and crops, the batched STFT
    buffer_bytes = 2 ** 29 + clips * (corpus["segment_seconds"] * 1.5 * fc.sample_rate * 6 + fc.clip_samples * 8
                                      + (fc.n_fft // 2 + 1) * fc.n_frames * 24)
    part = RankSlice(cfg.data.source.rstrip("/"), cfg.seed, stream.blocks_per_buffer, rank, world, first, start,
                     cfg.features, cfg.data, cfg.storage)
    ds = ray.data.range(n, override_num_blocks=max(1, min(n, 4096)))
    return ds.map_batches(buffer_clips, batch_size=1, batch_format="numpy", num_cpus=1, memory=int(buffer_bytes),
                          concurrency=cfg.data.concurrency or None,
                          fn_kwargs=dict(blocks=blocks_ref, part=part, ledger=ledger))


def example_segment(cfg: Config, corpus: dict) -> np.ndarray:
    """The first segment of the corpus (for pictures)."""
    t = read_block(cfg.data.source.rstrip("/"), corpus["blocks"][0], cfg.storage)
    return from_pcm(t["pcm"][0].as_py())


__all__ = ["is_corpus", "load_corpus", "rank_dataset", "RankStream", "Buffer", "read_block", "clip_ids",
           "buffer_segments", "from_pcm", "example_segment"]

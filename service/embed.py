"""Embedding a whole corpus with a model: the Ray Data batch-inference job behind `python -m jobs.embed`.

    OUT/embed_plan.json           what is being embedded (model digest, readout, source listing, parts): first
    OUT/shards/part-NNNNN.parquet one row per embedded file: key, duration (s), embedding [D]
                                  (+ frame_ms [T], frames [T, frame_dim] with --frames); the part's record
                                  (model, digest, files, skips, seconds) in the file's key-value metadata
    OUT/skipped.csv               every skipped file: key, reason, detail
    OUT/embeddings.json           the summary, written last: a finished output has one

The source is listed the way training lists it (`service.data.list_source`: a directory, an s3://
prefix or a manifest) or is a prepared corpus (`service.corpus`).  A "file" is a source file: a raw
file is decoded whole (`service.audio.decode`: the skip rules of training, no crops, no silence
trimming, so frame times count from the file's start); a prepared corpus's file is its segments put
back together in order (the audio as it was prepared: mono, at the model's rate, int16).  Each file is
embedded whole, any length, by the model's own readout (`AudioEncoder.embed_with_frames`, the function
behind `embed` and `embed_frames`); files of similar length share a forward pass.

The sorted listing is cut into parts of contiguous files (at most `files_per_part` files or `part_mb` of
source bytes); part N is always the same files and always lands in `part-N.parquet`, written whole (an
S3 object appears complete, a local file is renamed into place).  A rerun of the same command verifies
the shards already there (plan id, part number and row count in their footers) and embeds only the
missing parts: no part is done twice and no file appears twice.  The model is loaded once per actor
(Ray Data `map_batches` with a callable class over an actor pool sized from the cluster: one actor per
CPU, or per GPU with that GPU's share of the node's CPUs decoding and bf16 autocast on it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from service.audio import Skip, decode
from service.config import Config, DataConfig, StorageConfig, config_from_dict
from service.corpus import INDEX, exists, from_pcm, is_corpus, load_corpus, read_block, read_json, write_json
from service.data import DataSourceError, list_source, read_object
from service.encoder import AudioEncoder, load_encoder
from service.ledger import check_skips, skip_summary, skip_totals, skipped_csv
from service.prepare import plan_tasks
from service.storage import is_remote, join, resolve, write_bytes

log = logging.getLogger("audio_jepa.embed")

PLAN, SUMMARY, SKIPPED, SHARDS = "embed_plan.json", "embeddings.json", "skipped.csv", "shards"
VERSION = 1
META_KEY = b"audio_jepa.embed"
SHARD_NAME = re.compile(r"^part-(\d{5,})\.parquet$")


class EmbedError(RuntimeError):
    """The job cannot run (or finish): the message names the culprit (model, source, output, skips)."""


@dataclass(frozen=True)
class EmbedOptions:
    """How the job runs: frame embeddings too; parts of at most files_per_part files / part_mb source MB;
    `actors` (0: one per CPU, or per GPU); `precision` (auto: bf16 autocast on CUDA, fp32 elsewhere);
    `batch_chunks`: model clips (of the training length) per forward pass (0: 16 on a CPU, where larger passes
    measured no faster with one thread, 256 on a GPU)."""
    frames: bool = False
    files_per_part: int = 1000
    part_mb: float = 256.0
    actors: int = 0
    precision: str = "auto"
    batch_chunks: int = 0

    def validate(self) -> None:
        for k in ("files_per_part", "part_mb"):
            if not getattr(self, k) > 0:
                raise EmbedError(f"{k}={getattr(self, k)!r} must be > 0")
        for k in ("actors", "batch_chunks"):
            if getattr(self, k) < 0:
                raise EmbedError(f"{k}={getattr(self, k)} must be >= 0 (0: chosen for the cluster)")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise EmbedError(f"precision={self.precision!r}: expected auto, bf16 or fp32")


# --- sources: the files of a raw source or of a prepared corpus, cut into parts -----------------------
class RawFiles:
    """Audio files listed from a directory, an s3:// prefix or a manifest, decoded whole as they are read."""
    kind = "raw"

    def __init__(self, cfg: Config):
        self.source = cfg.data.source
        self.listing = list_source(cfg)
        self.keys = [f.key for f in self.listing.files]
        self.sizes = [f.size for f in self.listing.files]
        self.listed = len(self.listing.files) + len(self.listing.too_large)
        self.skipped_before = [[f.uri, "too_large", f"{f.size} bytes"] for f in self.listing.too_large]

    def digest(self) -> str:
        h = hashlib.sha256()
        for f in sorted(self.listing.files + self.listing.too_large, key=lambda e: e.key):
            h.update(f"{f.key}\t{f.size}\n".encode())
        return h.hexdigest()

    def describe(self) -> str:
        ls = self.listing
        return (f"{len(ls.files)} audio files in {self.source} ({ls.ignored_by_extension} other files ignored, "
                f"{len(ls.too_large)} too large)")

    def payload(self) -> dict:
        """What a reader needs, put in the object store once."""
        return {"kind": self.kind, "uris": np.array([f.uri for f in self.listing.files], dtype=object),
                "keys": np.array(self.keys, dtype=object)}


class CorpusFiles:
    """A corpus prepared by `jobs.prepare`: a file is its segments in order (index.parquet says where they are);
    its skips were counted when it was prepared."""
    kind = "corpus"

    def __init__(self, cfg: Config):
        st = cfg.storage
        self.source = cfg.data.source.rstrip("/")
        self.corpus = load_corpus(self.source, cfg)
        fs, path = resolve(join(self.source, INDEX), st.s3_endpoint, st.s3_region)
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["key", "segment", "seconds", "shard", "row_group"])
        table = table.sort_by([("key", "ascending"), ("segment", "ascending")])
        keys = np.array(table["key"].to_pylist(), dtype=object)
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
        block_of = {(b[0], b[1]): i for i, b in enumerate(self.corpus["blocks"])}
        self.keys = list(keys[starts])
        self.rows = np.r_[starts, len(keys)].astype(np.int64)  # file i: index rows rows[i]:rows[i + 1]
        self.segments = np.asarray(table["segment"].to_numpy(), np.int64)
        self.block = np.array([block_of[(s, g)] for s, g in zip(table["shard"].to_pylist(),
                                                                 table["row_group"].to_pylist())], np.int64)
        seconds = np.asarray(table["seconds"].to_numpy(), np.float64)
        file_seconds = np.add.reduceat(seconds, starts) if len(starts) else np.zeros(0)
        self.sizes = [int(s * self.corpus["sample_rate"] * 2) for s in file_seconds]  # int16 PCM bytes
        self.listed = self.corpus["listed"]
        self.skipped_before = [list(r) for r in self.corpus["skipped_files"]]

    def digest(self) -> str:
        return hashlib.sha256(f"{self.corpus['listing_sha256']}\t{self.corpus['created']}\t"
                              f"{self.corpus['segments']}".encode()).hexdigest()

    def describe(self) -> str:
        c = self.corpus
        return (f"prepared corpus {self.source}: {len(self.keys)} files, {c['segments']} segments, {c['hours']:.2f} h "
                f"({sum(c['skipped'].values())} files skipped when it was prepared)")

    def payload(self) -> dict:
        return {"kind": self.kind, "root": self.source, "keys": np.array(self.keys, dtype=object),
                "rows": self.rows, "segments": self.segments, "block": self.block, "blocks": self.corpus["blocks"]}


def open_files(cfg: Config) -> RawFiles | CorpusFiles:
    """The source's files: a prepared corpus when it holds a corpus.json, else raw audio files (refused, naming
    the source, when it is unreachable or holds no audio)."""
    try:
        return CorpusFiles(cfg) if is_corpus(cfg.data.source, cfg.storage) else RawFiles(cfg)
    except (DataSourceError, OSError) as e:
        raise EmbedError(f"--source {cfg.data.source}: {e}") from e


# --- reading a part's files (in the actor) --------------------------------------------------------------
def _raw_part(payload: dict, start: int, end: int, sample_rate: int, data: DataConfig, st: StorageConfig,
              threads: int):
    """(key, waveform or None, Skip or None) for files start..end-1 in order, `threads` read and decoded at once
    (at most threads + 1 waiting)."""
    fs_by_root: dict[str, pafs.FileSystem] = {}

    def one(i: int):
        uri, key = str(payload["uris"][i]), str(payload["keys"][i])
        root = "s3://" if uri.startswith("s3://") else "/"
        fs = fs_by_root.get(root) or fs_by_root.setdefault(root, resolve(root, st.s3_endpoint, st.s3_region)[0])
        try:
            wav = decode(read_object(uri, fs, data.read_retries), sample_rate, data.max_channels, data.min_seconds,
                         False, data.max_decoded_mb)
            return key, wav, None
        except Skip as s:
            log.debug("skipped %s: %s", uri, s)
            return key, None, Skip(s.reason, s.detail)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: deque = deque()
        for i in range(start, end):
            pending.append(pool.submit(one, i))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _corpus_part(payload: dict, start: int, end: int, st: StorageConfig):
    """(key, waveform, None) for files start..end-1: each file's segments read (checksums verified) and put
    back together in order; the last two row groups read are kept (a file's segments are consecutive)."""
    cache: dict[int, dict] = {}
    for i in range(start, end):
        key, pieces = str(payload["keys"][i]), []
        for r in range(int(payload["rows"][i]), int(payload["rows"][i + 1])):
            b = int(payload["block"][r])
            if b not in cache:
                t = read_block(payload["root"], payload["blocks"][b], st)
                while len(cache) >= 2:
                    cache.pop(next(iter(cache)))
                cache[b] = {(k, s): p for k, s, p in zip(t["key"].to_pylist(), t["segment"].to_pylist(),
                                                        t["pcm"].to_pylist())}
            pieces.append(cache[b][(key, int(payload["segments"][r]))])
        yield key, from_pcm(b"".join(pieces)), None


# --- embedding ------------------------------------------------------------------------------------------
def _chunks(enc: AudioEncoder, n: int) -> int:
    """Model clips that `n` samples are cut into by embed_frames."""
    fc = enc.cfg.features
    return -(-fc.frames_for(n) // fc.n_frames)


def embed_waveforms(enc: AudioEncoder, wavs: list[np.ndarray], frames: bool = False, batch_chunks: int = 16,
                    precision: str = "auto") -> list[tuple]:
    """(clip embedding [D], frame embeddings [T, frame_dim] or None, frame centre times [T] ms or None) for each
    waveform, by `enc.embed_with_frames`: waveforms sorted by length share passes of at most `batch_chunks`
    model clips (each row padded to the longest, its readout kept to its own frames; a longer one goes alone)."""
    from service.model import autocast
    out: list = [None] * len(wavs)
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    batches, cur = [], []
    for i in order:  # ascending: the row added is the longest so far
        if cur and (len(cur) + 1) * _chunks(enc, len(wavs[i])) > batch_chunks:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    for idx in batches:
        lengths = [len(wavs[i]) for i in idx]
        x = torch.zeros(len(idx), max(lengths))
        for j, i in enumerate(idx):
            x[j, :lengths[j]] = torch.from_numpy(wavs[i])
        with autocast(enc.device, precision):
            clip, fr, t_ms = enc.embed_with_frames(x, lengths, batch_chunks=batch_chunks)
        clip = clip.float().numpy()
        for j, i in enumerate(idx):
            if frames:
                k = enc.frame_count(lengths[j])
                out[i] = (clip[j], fr[j, :k].float().numpy(), t_ms[j, :k].numpy())
            else:
                out[i] = (clip[j], None, None)
    return out


def shard_schema(enc: AudioEncoder, frames: bool) -> pa.Schema:
    """key, duration (s), embedding [embedding_dim] (+ frame_ms [T], frames [T, frame_dim] with frames)."""
    fields = [("key", pa.string()), ("duration", pa.float32()),
              ("embedding", pa.list_(pa.float32(), enc.embedding_dim))]
    if frames:
        fields += [("frame_ms", pa.list_(pa.float32())), ("frames", pa.list_(pa.list_(pa.float32(), enc.frame_dim)))]
    return pa.schema(fields)


def shard_table(keys: list[str], durations: list[float], results: list[tuple], enc: AudioEncoder,
                frames: bool) -> pa.Table:
    """Rows of embedded files (`embed_waveforms`' results) in the shard schema."""
    d, fd = enc.embedding_dim, enc.frame_dim
    emb = np.stack([r[0] for r in results]).astype(np.float32) if results else np.zeros((0, d), np.float32)
    cols = [pa.array(keys, pa.string()), pa.array(durations, pa.float32()),
            pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d)]
    if frames:
        offsets = pa.array(np.r_[0, np.cumsum([len(r[2]) for r in results])].astype(np.int32))
        flat_t = np.concatenate([r[2] for r in results]).astype(np.float32) if results else np.zeros(0, np.float32)
        flat_f = (np.concatenate([r[1] for r in results]).astype(np.float32) if results
                  else np.zeros((0, fd), np.float32))
        cols += [pa.ListArray.from_arrays(offsets, pa.array(flat_t)),
                 pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(pa.array(flat_f.reshape(-1)), fd))]
    return pa.Table.from_arrays(cols, schema=shard_schema(enc, frames))


def shard_uri(out: str, part: int) -> str:
    return join(out, f"{SHARDS}/part-{part:05d}.parquet")


class _ShardFile:
    """A part's shard written row group by row group to a local file (memory holds one group of files, however
    long the part's audio), then published whole: renamed into place, or uploaded (an S3 object appears
    complete).  The part's record goes in the footer's key-value metadata."""

    def __init__(self, uri: str, schema: pa.Schema, st: StorageConfig):
        self.uri, self.st = uri, st
        if is_remote(uri):
            fd, self.tmp = tempfile.mkstemp(prefix="audio-jepa-shard-", suffix=".parquet")
            os.close(fd)
        else:
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            self.tmp = f"{uri}.tmp-{os.getpid()}"
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table)

    def publish(self, meta: dict) -> None:
        self.writer.add_key_value_metadata({META_KEY: json.dumps(meta).encode()})
        self.writer.close()
        try:
            if not is_remote(self.uri):
                os.replace(self.tmp, self.uri)
                return
            fs, path = resolve(self.uri, self.st.s3_endpoint, self.st.s3_region)
            with open(self.tmp, "rb") as src, fs.open_output_stream(path) as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
        finally:
            self.abort()

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


class PartEmbedder:
    """Ray Data callable class: the model loaded once per actor; each call embeds whole parts and writes their
    shards.  In: {"part": [N]}; out: {"record": [the part's record as JSON]}."""

    def __init__(self, model, files, job: dict):
        import ray
        blob = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.files = ray.get(files) if isinstance(files, ray.ObjectRef) else files
        self.job = job
        gpu = job["gpus_per_actor"] > 0 and torch.cuda.is_available()
        torch.set_num_threads(max(1, job["threads"]))
        self.enc = AudioEncoder(config_from_dict(json.loads(blob["config"])), blob["weights"],
                                "cuda" if gpu else "cpu")
        if self.enc.digest() != job["weights_sha256"]:
            raise RuntimeError("the model's weights changed on their way to the actor (digest mismatch)")
        self.batch_chunks = job["batch_chunks"] or (256 if gpu else 16)

    def __call__(self, batch: dict) -> dict:
        return {"record": np.array([json.dumps(self.embed_part(int(p))) for p in batch["part"]], dtype=object)}

    def embed_part(self, part: int) -> dict:
        job, t0 = self.job, time.time()
        start, end = job["parts"][part]
        st = StorageConfig(**job["storage"])
        if self.files["kind"] == "corpus":
            files = _corpus_part(self.files, start, end, st)
        else:
            files = _raw_part(self.files, start, end, self.enc.sample_rate, DataConfig(**job["data"]), st,
                              job["threads"])
        keys, durations, skipped = [], [], []
        shard = _ShardFile(shard_uri(job["out"], part), shard_schema(self.enc, job["frames"]), st)
        group, chunks = [], 0  # decoded files waiting: embedded together, written as one row group

        def flush():
            results = embed_waveforms(self.enc, group, job["frames"], self.batch_chunks, job["precision"])
            shard.write(shard_table(keys[len(keys) - len(group):], durations[len(keys) - len(group):], results,
                                    self.enc, job["frames"]))

        try:
            for key, wav, skip in files:
                if skip is not None:
                    skipped.append([key, skip.reason, skip.detail])
                    continue
                keys.append(key)
                durations.append(len(wav) / self.enc.sample_rate)
                group.append(wav)
                chunks += _chunks(self.enc, len(wav))
                if chunks >= max(4 * self.batch_chunks, 256):
                    flush()
                    group, chunks = [], 0
            if group:
                flush()
        except BaseException:
            shard.abort()
            raise
        meta = {"plan": job["plan_id"], "part": part, "files": end - start, "rows": len(keys),
                "seconds": float(sum(durations)), "skipped": skipped, "model": job["resolved"],
                "weights_sha256": job["weights_sha256"]}
        shard.publish(meta)
        return {**meta, "wall_s": time.time() - t0}


# --- the driver ---------------------------------------------------------------------------------------
def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def load_model(uri: str) -> AudioEncoder:
    """The model on the driver's CPU, or EmbedError naming the URI."""
    try:
        return load_encoder(uri, "cpu")
    except Exception as e:  # noqa: BLE001 - MLflow, storage, checkpoint verification: all name the URI
        raise EmbedError(f"--model-uri {uri} cannot be read: {type(e).__name__}: {str(e)[:300]}") from e


def readout_of(enc: AudioEncoder) -> dict:
    r = enc.cfg.readout
    return {"frames": r.frames, "pooling": r.pooling, "layers": r.layers, "embedding_dim": enc.embedding_dim,
            "frame_dim": enc.frame_dim, "hop_ms": enc.hop_ms, "sample_rate": enc.sample_rate,
            "short_audio": enc.cfg.data.short_audio}


def make_plan(enc: AudioEncoder, model_uri: str, files, cfg: Config, opts: EmbedOptions) -> dict:
    """What this job embeds; its `plan_id` (everything but the URIs' spelling) marks every shard it writes."""
    dc = cfg.data
    plan = {"version": VERSION, "weights_sha256": enc.digest(), "readout": readout_of(enc), "frames": opts.frames,
            "source": files.source, "source_kind": files.kind, "listing_sha256": files.digest(),
            "files": len(files.keys),
            "decode": {"trim_silence": False, **{k: getattr(dc, k) for k in
                                                 ("min_seconds", "max_channels", "max_decoded_mb", "max_file_mb",
                                                  "extensions")}},
            "parts": plan_tasks(files.sizes, opts.part_mb, opts.files_per_part)}
    plan["plan_id"] = _sha(plan)[:16]
    return {**plan, "model_uri": model_uri, "resolved_model_uri": enc.resolved}


def _listdir(out: str, st: StorageConfig, sub: str = "") -> list[pafs.FileInfo]:
    fs, path = resolve(join(out, sub) if sub else out, st.s3_endpoint, st.s3_region)
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []


def check_output(out: str, plan: dict, st: StorageConfig) -> dict | None:
    """The plan already in `out` when it is this job's (a rerun), None for an empty/new `out`; EmbedError naming
    `out` when it holds another model's embeddings, other settings, or anything that is not this job's."""
    plan_uri = join(out, PLAN)
    try:
        old = read_json(plan_uri, st) if exists(plan_uri, st) else None
        entries = _listdir(out, st) if old is None else []
    except (OSError, ValueError) as e:
        raise EmbedError(f"--out {out} cannot be read: {e}") from e
    if old is None:
        if entries:
            names = sorted(i.base_name for i in entries)[:5]
            raise EmbedError(f"--out {out} is not empty and holds no {PLAN}: not an output of jobs.embed "
                             f"(holds {', '.join(names)}…); choose an empty or new --out")
        return None
    if old.get("weights_sha256") != plan["weights_sha256"]:
        raise EmbedError(f"--out {out} holds embeddings of another model: {old.get('resolved_model_uri')} (weights "
                         f"sha256 {str(old.get('weights_sha256'))[:12]}…); this job's model is "
                         f"{plan['resolved_model_uri']} ({plan['weights_sha256'][:12]}…). Choose another --out")
    if old.get("plan_id") != plan["plan_id"]:
        differs = [k for k in ("readout", "frames", "source", "source_kind", "listing_sha256", "files", "decode",
                               "parts", "version") if old.get(k) != plan.get(k)]
        raise EmbedError(f"--out {out} holds embeddings of this model with other settings ({', '.join(differs)} "
                         "differ: e.g. files were added to the source since, or --frames/--files-per-part changed); "
                         "choose another --out")
    return old


def finished_parts(out: str, plan: dict, st: StorageConfig, progress=print) -> dict[int, dict]:
    """Records of the parts whose shard is there and verified (this plan, this part, its row count); a shard
    that is not is redone, and temporary files of writes that were killed are removed."""
    fs, _ = resolve(out, st.s3_endpoint, st.s3_region)
    entries = [i for i in _listdir(out, st, SHARDS) if i.type == pafs.FileType.File]
    for i in entries:
        if ".tmp-" in i.base_name and not is_remote(out):
            fs.delete_file(i.path)

    def verify(info):
        m = SHARD_NAME.match(info.base_name)
        if not m:
            return None
        part = int(m.group(1))
        try:
            with fs.open_input_file(info.path) as f:
                md = pq.read_metadata(f)
            meta = json.loads(md.metadata[META_KEY])
            ok = meta["plan"] == plan["plan_id"] and meta["part"] == part and meta["rows"] == md.num_rows
        except Exception as e:  # noqa: BLE001 - unreadable or foreign: redone
            meta, ok = {}, False
            progress(f"embed: {info.base_name} is not a readable shard of this job ({type(e).__name__}); redoing it")
        if not ok:
            if meta:
                progress(f"embed: {info.base_name} is not a shard of this plan; redoing it")
            return None
        return part, meta

    with ThreadPoolExecutor(16) as pool:
        found = [r for r in pool.map(verify, entries) if r is not None]
    return {p: m for p, m in found if p < len(plan["parts"])}


def pool_size(n_parts: int, opts: EmbedOptions, data: DataConfig, model_bytes: int) -> dict:
    """Actors, CPUs and GPUs per actor from the cluster: one actor per GPU (with the CPUs per GPU of the GPU
    nodes, to decode) when it has GPUs, else one per CPU; never more than its memory holds or there are parts."""
    import ray
    from service.data import decode_memory
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        ratios = [n["Resources"].get("CPU", 0) / n["Resources"]["GPU"] for n in ray.nodes()
                  if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
        cpus, per_gpu, actors = max(1, int(min(ratios) if ratios else 1)), 1, gpus
    else:
        cpus, per_gpu, actors = 1, 0, max(1, int(res.get("CPU", 1)))
    memory = decode_memory(data) + 4 * model_bytes
    if res.get("memory"):
        actors = min(actors, max(1, int(res["memory"] // memory)))
    actors = max(1, min(opts.actors or actors, n_parts))
    return {"actors": actors, "cpus_per_actor": cpus, "gpus_per_actor": per_gpu, "memory": memory,
            "threads": cpus}


def link_to_model(plan: dict, out: str, summary: dict) -> dict | None:
    """Registry (or runs:/) URIs: the model version and the run that produced it get a tag
    `audio_jepa.embeddings.<id of out>` = out, and the run the summary as an artifact under embeddings/."""
    resolved = plan["resolved_model_uri"]
    if not resolved.startswith(("models:/", "runs:/")):
        return None
    from mlflow import MlflowClient
    c, tag = MlflowClient(), f"audio_jepa.embeddings.{_sha(out)[:12]}"
    link = {"tag": tag}
    if resolved.startswith("models:/"):
        name, version = resolved[len("models:/"):].split("/", 1)
        run_id = c.get_model_version(name, version).run_id
        c.set_model_version_tag(name, version, tag, out)
        link["model_version"] = f"{name}/{version}"
    else:
        run_id = resolved[len("runs:/"):].split("/", 1)[0]
    if run_id:
        c.set_tag(run_id, tag, out)
        c.log_dict(run_id, summary, f"embeddings/{_sha(out)[:12]}.json")
        link.update(run_id=run_id, artifact=f"embeddings/{_sha(out)[:12]}.json")
    return link


@dataclass
class Job:
    """A job checked and planned, nothing embedded yet."""
    enc: AudioEncoder
    files: "RawFiles | CorpusFiles"
    plan: dict
    old: dict | None  # the plan already in `out` (a rerun), None for a new output
    cfg: Config
    out: str
    opts: EmbedOptions


def prepare_job(model_uri: str, cfg: Config, out: str, opts: EmbedOptions = EmbedOptions(), progress=print) -> Job:
    """Everything checked before any work, without Ray: the model read, the source listed, the output checked
    (and claimed with the plan when new).  EmbedError names the culprit: the model URI, the source, or the output."""
    opts.validate()
    out = out.rstrip("/") if is_remote(out) else os.path.abspath(os.path.expanduser(out))
    enc = load_model(model_uri)
    cfg = cfg.with_overrides({"features.sample_rate": enc.sample_rate})
    files = open_files(cfg)
    plan = make_plan(enc, model_uri, files, cfg, opts)
    old = check_output(out, plan, cfg.storage)
    if old is None:  # the output's first object: a rerun finds it, another job is refused by it
        try:
            write_json(join(out, PLAN), plan, cfg.storage)
        except OSError as e:
            raise EmbedError(f"--out {out} cannot be written: {e}") from e
    progress(f"embed: {model_uri} ({enc.resolved}, weights sha256 {plan['weights_sha256'][:12]}…, "
             f"{enc.embedding_dim}-d clips{f', {enc.frame_dim}-d frames' if opts.frames else ''}); "
             f"{files.describe()} -> {out}: {len(plan['parts'])} parts")
    return Job(enc, files, plan, old, cfg, out, opts)


def run_embed(model_uri: str, cfg: Config, out: str, opts: EmbedOptions = EmbedOptions(), progress=print) -> dict:
    """`prepare_job` then `run_job`: the whole job.  Needs Ray initialised."""
    return run_job(prepare_job(model_uri, cfg, out, opts, progress), progress)


def run_job(job: Job, progress=print) -> dict:
    """Embed the parts not yet done on an actor pool, then the summary (written last).  Needs Ray initialised
    (jobs.embed joins the cluster or starts a private one)."""
    import ray
    from service.raydata import quiet_ray_data, refuse_local_paths
    enc, files, plan, out, opts, st = job.enc, job.files, job.plan, job.out, job.opts, job.cfg.storage
    refuse_local_paths({"--source": job.cfg.data.source, "--out": out})
    done = finished_parts(out, plan, st, progress)
    todo = [p for p in range(len(plan["parts"])) if p not in done]
    if not todo and exists(join(out, SUMMARY), st):
        summary = read_json(join(out, SUMMARY), st)
        if summary.get("plan_id") == plan["plan_id"]:
            progress(f"embed: {out} is already finished ({summary['embedded']} files embedded); nothing to do")
            return summary
    t0 = time.time()
    records, arrivals = dict(done), []
    pool = None
    if todo:
        quiet_ray_data()
        weights = {k: v.detach().cpu() for k, v in enc.encoder.state_dict().items()}
        model_bytes = sum(v.numel() * v.element_size() for v in weights.values())
        pool = pool_size(len(todo), opts, job.cfg.data, model_bytes)
        spec = {"plan_id": plan["plan_id"], "parts": plan["parts"], "out": out, "frames": opts.frames,
                "precision": opts.precision, "batch_chunks": opts.batch_chunks, "resolved": enc.resolved,
                "weights_sha256": plan["weights_sha256"], "data": asdict(job.cfg.data), "storage": asdict(st),
                "threads": pool["threads"], "gpus_per_actor": pool["gpus_per_actor"]}
        gpu = f", {pool['gpus_per_actor']} GPU" if pool["gpus_per_actor"] else ""
        progress(f"embed: {len(done)} parts already done, {len(todo)} to do on {pool['actors']} actors "
                 f"({pool['cpus_per_actor']} CPU{gpu} each)")
        model_ref = ray.put({"config": json.dumps(enc.cfg.to_dict()), "weights": weights})
        files_ref = ray.put(files.payload())
        ds = ray.data.from_items([{"part": p} for p in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(PartEmbedder, batch_size=1, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=pool["actors"], max_tasks_in_flight_per_actor=1),
                            num_cpus=pool["cpus_per_actor"], num_gpus=pool["gpus_per_actor"] or None,
                            memory=pool["memory"],
                            fn_constructor_kwargs={"model": model_ref, "files": files_ref, "job": spec})
        last = 0.0
        for row in ds.iter_rows():
            rec = json.loads(row["record"])
            records[rec["part"]] = rec
            arrivals.append((time.time() - t0, rec["rows"], rec["seconds"], rec["wall_s"]))
            n = len(arrivals)
            if time.time() - last > 10 or n == len(todo):
                last = time.time()
                rows = sum(a[1] for a in arrivals)
                progress(f"embed: {len(done) + n}/{len(plan['parts'])} parts, {rows} files embedded this run "
                         f"({rows / max(time.time() - t0, 1e-9):.1f} files/s)")
    missing = [p for p in range(len(plan["parts"])) if p not in records]
    if missing:
        raise EmbedError(f"embed {out}: parts {missing[:10]} produced no shard; re-run the same command")
    return _finish(out, plan, files, records, arrivals, done, pool, time.time() - t0, job.cfg, progress)


def _throughput(arrivals: list, wall: float, pool: dict | None) -> dict:
    """This run's rates: end to end (actor start, model load and scheduling included) and inside the actors
    (files over the seconds the actors spent on parts), per CPU the actors hold."""
    files = sum(a[1] for a in arrivals)
    seconds = sum(a[2] for a in arrivals)
    busy = sum(a[3] for a in arrivals)
    cpus = pool["actors"] * pool["cpus_per_actor"] if pool else 0
    res = {"wall_s": round(wall, 3), "files": files, "audio_s": round(seconds, 3), "actors": pool and pool["actors"],
           "cpus": cpus, "gpus": pool["actors"] * pool["gpus_per_actor"] if pool else 0,
           "first_part_s": round(arrivals[0][0], 3) if arrivals else None,
           "files_per_s": files / wall if wall > 0 else 0.0,
           "audio_hours_per_hour": seconds / wall if wall > 0 else 0.0}
    per_cpu = 1 / cpus if cpus else 0.0
    res["files_per_s_per_cpu"] = res["files_per_s"] * per_cpu
    res["audio_hours_per_hour_per_cpu"] = res["audio_hours_per_hour"] * per_cpu
    if busy > 0:  # an actor's rate while it embeds, per CPU it holds
        per_actor_cpu = 1 / pool["cpus_per_actor"]
        res["actor_files_per_s_per_cpu"] = files / busy * per_actor_cpu
        res["actor_audio_hours_per_hour_per_cpu"] = seconds / busy * per_actor_cpu
    return res


def _finish(out: str, plan: dict, files, records: dict, arrivals: list, done: dict, pool: dict | None,
            wall: float, cfg: Config, progress) -> dict:
    st = cfg.storage
    skipped = [list(r) for r in files.skipped_before] + [s for p in sorted(records) for s in records[p]["skipped"]]
    totals = skip_totals(files.listed, skipped)
    if files.kind == "raw":  # a prepared corpus was checked when it was prepared
        problem = check_skips(totals, cfg.data)
        if problem:
            raise EmbedError(f"embed {out}: {problem}. The shards are kept: re-run with a higher threshold (--set "
                             "data.max_skip_fraction=…) to finish")
    embedded = sum(r["rows"] for r in records.values())
    seconds = sum(r["seconds"] for r in records.values())
    summary = {"status": "succeeded", "out": out, "plan_id": plan["plan_id"], "model_uri": plan["model_uri"],
               "resolved_model_uri": plan["resolved_model_uri"], "weights_sha256": plan["weights_sha256"],
               "readout": plan["readout"], "frames": plan["frames"], "source": plan["source"],
               "source_kind": plan["source_kind"], "files": files.listed, "embedded": embedded,
               "skipped": totals["skipped"], "skipped_examples": totals["examples"],
               "seconds": round(seconds, 3), "hours": round(seconds / 3600, 4),
               "shards": [f"{SHARDS}/part-{p:05d}.parquet" for p in sorted(records)],
               "parts": {"total": len(plan["parts"]), "done_before": len(done), "done_now": len(records) - len(done)},
               "throughput": _throughput(arrivals, wall, pool),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_bytes(join(out, SKIPPED), skipped_csv(sorted(skipped)), st.s3_endpoint, st.s3_region)
    try:
        summary["mlflow"] = link_to_model(plan, out, summary)
    except Exception as e:  # noqa: BLE001 - the embeddings are written; the link is reported, not fatal
        log.warning("could not link %s to the model's MLflow run: %s", out, e)
        summary["mlflow"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    write_json(join(out, SUMMARY), summary, st)
    tp = summary["throughput"]
    progress(f"embed: finished {out}: {embedded} of {files.listed} files embedded, {seconds / 3600:.3f} h of audio; "
             + (skip_summary(totals).replace("data: ", "") if totals["skipped"] else "skipped none")
             + (f"; this run {tp['files']} files in {tp['wall_s']:.1f} s ({tp['files_per_s_per_cpu']:.1f} files/s "
                f"per CPU, {tp['audio_hours_per_hour_per_cpu']:.0f} h of audio per hour per CPU)" if tp["files"]
                else ""))
    return summary


def read_embeddings(out: str, st: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """All rows of a finished output (the shards its summary lists), in part order."""
    st = st or StorageConfig()
    summary = read_json(join(out, SUMMARY), st)
    tables = []
    for name in summary["shards"]:
        fs, path = resolve(join(out, name), st.s3_endpoint, st.s3_region)
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if tables else pa.table({})


__all__ = ["EmbedOptions", "EmbedError", "Job", "run_embed", "prepare_job", "run_job", "embed_waveforms", "read_embeddings",
           "PartEmbedder", "open_files"]

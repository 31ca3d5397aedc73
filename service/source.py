"""The run's data source as one object: raw audio files, or a prepared corpus.

`open_source(cfg)` decides which, once.  Everything after it talks to the object through one
interface, so no training code asks the question again:
  describe()            a line for the log
  listed                files the source listed (skipped ones included)
  stats(cfg, progress)  features.mean/std for a run that sets none
  new_ledger()          the run's skip ledger, seeded with what listing already refused
  datasets(cfg, ledger) Ray Train's dataset factories and DataConfig; a factory starts its stream at
                        the run's newest verified checkpoint (Ray calls it at every worker-group start)
  batches               the worker's adapter: its rank's float batches, from where its state resumed
  example_clip(cfg)     one decodable clip, for the mask picture
  data_summary(totals)  the summary's `data`, and skipped_files(ledger) for skipped.csv
"""
from __future__ import annotations

import time
from functools import partial

import numpy as np
import ray
import ray.train
import torch

from service import checkpoint as ckpt
from service.audio import Skip, crop_rng, crops, decode
from service.config import Config, ConfigError
from service.corpus import example_segment, is_corpus, load_corpus, rank_dataset
from service.data import DataSourceError, build_dataset, list_source, measure_stats, put_listing
from service.ledger import new_ledger
from service.raydata import quiet_ray_data
from service.storage import read_bytes
from service.worker import RunStopped


def open_source(cfg: Config) -> "RawSource | CorpusSource":
    """The source `data.source` names: a prepared corpus when it holds a corpus.json, else raw audio files
    (a directory, an s3:// prefix or a manifest)."""
    if not cfg.data.source:
        raise DataSourceError("data.source is empty: pass --set data.source=s3://bucket/prefix (or a dir/manifest)")
    return CorpusSource(cfg) if is_corpus(cfg.data.source, cfg.storage) else RawSource(cfg)


def _batches(shard, per_worker: int, device: torch.device):
    """The shard's batches on the host (pinned for a GPU): bookkeeping columns never wait for the device."""
    return shard.iter_torch_batches(batch_size=per_worker, drop_last=True, prefetch_batches=2, device="cpu",
                                    pin_memory=device.type == "cuda")


def _on_device(b: dict, device: torch.device, full_scale: float | None = None) -> dict:
    """`x` copied to the trainer's device without blocking (int16 PCM moves as int16, half the bytes, and is
    scaled there)."""
    x = b["x"].to(device, non_blocking=True)
    b["x"] = x.float() / full_scale if full_scale is not None else x.float()
    return b


class RawBatches:
    """A worker's batches from raw files: one dataset that Ray splits between the ranks, read pass after
    pass (more passes than planned if many files were skipped)."""

    def stream(self, rank: int, per_worker: int, device: torch.device, position: int):
        shard = ray.train.get_dataset_shard("train")
        while True:
            got = False
            for b in _batches(shard, per_worker, device):
                got = True
                yield _on_device(b, device)
            if not got:
                raise RuntimeError("the dataset produced no full batch: every file was skipped or there are "
                                   f"fewer than {per_worker} clips")


class CorpusBatches:
    """A worker's batches from a prepared corpus: its rank's own stream, which must start exactly where the
    restored checkpoint left it (batches before that are dropped, a gap is an error); int16 PCM is scaled
    to [-1, 1] here (the corpus sends waveforms as stored, half the bytes)."""

    def __init__(self, pcm: bool):
        self.full_scale = 32767.0 if pcm else None

    def stream(self, rank: int, per_worker: int, device: torch.device, position: int):
        for b in _batches(ray.train.get_dataset_shard(f"train.{rank}"), per_worker, device):
            first = int(b["pos"][0])
            if first < position:
                continue
            if first > position:
                raise RunStopped(f"rank {rank}: the data stream starts at clip {first} but the restored "
                                 f"checkpoint consumed {position}; resubmit the run")
            yield _on_device(b, device, self.full_scale)
            position += per_worker
        raise RunStopped(f"rank {rank}: the prepared corpus stream ended at clip {position} before the run's "
                         "last step")


class RawSource:
    """Audio files listed from a directory, an s3:// prefix or a manifest, decoded as the run reads them."""

    def __init__(self, cfg: Config):
        self.source = cfg.data.source
        self.listing = list_source(cfg)
        self.listed = len(self.listing.files) + len(self.listing.too_large)
        self.batches = RawBatches()

    def describe(self) -> str:
        ls = self.listing
        return (f"{len(ls.files)} audio files in {self.source} ({ls.ignored_by_extension} other files ignored, "
                f"{len(ls.too_large)} too large)")

    def stats(self, cfg: Config, progress) -> dict[str, float]:
        t0 = time.time()
        stats = measure_stats(cfg, self.listing)
        progress(f"features: log-mel mean {stats['features.mean']} std {stats['features.std']} measured on real "
                 f"frames of {min(cfg.data.stats_files, len(self.listing.files))} files ({time.time() - t0:.1f} s)")
        return stats

    def new_ledger(self):
        return new_ledger(self.listed, [f.uri for f in self.listing.too_large])

    def datasets(self, cfg: Config, ledger) -> tuple[dict, ray.train.DataConfig]:
        return {"train": partial(_raw_dataset, cfg, put_listing(self.listing), ledger)}, ray.train.DataConfig()

    def example_clip(self, cfg: Config) -> np.ndarray | None:
        for f in self.listing.files[:20]:
            try:
                wav = decode(read_bytes(f.uri, cfg.storage.s3_endpoint, cfg.storage.s3_region),
                             cfg.features.sample_rate, trim=cfg.data.trim_silence)
            except (Skip, OSError):
                continue
            return _first_crop(cfg, wav)
        return None

    def data_summary(self, totals: dict) -> dict:
        return {"files": totals["files"], "clips": totals["clips"], "skipped": totals["skipped"],
                "skipped_examples": totals["examples"]}

    def skipped_files(self, ledger) -> list[tuple[str, str, str]]:
        return ray.get(ledger.skipped_files.remote())


class CorpusSource:
    """A corpus prepared by `jobs.prepare`: decoded once, streamed per rank in a seeded, resumable order;
    its files and skips were counted when it was prepared."""

    def __init__(self, cfg: Config):
        self.source = cfg.data.source
        self.corpus = load_corpus(cfg.data.source, cfg)
        self.listed = self.corpus["listed"]
        self.batches = CorpusBatches(pcm=cfg.data.features_in == "trainer")

    def describe(self) -> str:
        c = self.corpus
        return (f"prepared corpus {self.source}: {c['files']} files, {c['segments']} segments, {c['hours']:.2f} h "
                f"({sum(c['skipped'].values())} files skipped when it was prepared)")

    def stats(self, cfg: Config, progress) -> dict[str, float]:
        stats = self.corpus.get("stats")
        if not stats:
            raise ConfigError(f"{self.source}: the corpus has no log-mel statistics; set features.mean/std")
        progress(f"features: log-mel mean {stats['features.mean']} std {stats['features.std']} from the prepared "
                 "corpus")
        return stats

    def new_ledger(self):
        return new_ledger(self.listed, [])

    def datasets(self, cfg: Config, ledger) -> tuple[dict, ray.train.DataConfig]:
        blocks = ray.put(self.corpus["blocks"])
        datasets = {f"train.{r}": partial(_corpus_dataset, cfg, self.corpus["segment_seconds"], blocks, r, ledger)
                    for r in range(cfg.train.workers)}
        ingest = ray.train.DataConfig.default_ingest_options()
        ingest.preserve_order = True  # each rank's clip sequence is a function of the seed
        return datasets, ray.train.DataConfig(datasets_to_split=[], execution_options={k: ingest for k in datasets})

    def example_clip(self, cfg: Config) -> np.ndarray | None:
        return _first_crop(cfg, example_segment(cfg, self.corpus))

    def data_summary(self, totals: dict) -> dict:
        c = self.corpus
        return {"files": c["listed"], "clips": totals["clips"], "skipped": c["skipped"],
                "skipped_examples": c["skipped_examples"], "prepared": self.source}

    def skipped_files(self, ledger) -> list[tuple[str, str, str]]:
        return [tuple(row) for row in self.corpus["skipped_files"]]


def _first_crop(cfg: Config, wav: np.ndarray) -> np.ndarray:
    return crops(wav, cfg.features.clip_samples, 1, crop_rng(cfg.seed, 0, "example"), cfg.data.short_audio)[0]


# --- dataset factories: Ray Train calls them at every worker-group start --------------------------
def resume_point(cfg: Config) -> dict:
    """Marker of the checkpoint the workers restore ({} when none): where a rebuilt stream starts.  The
    same look-up as the workers' (`checkpoint.latest`), never Ray's registered checkpoint, which lags
    behind storage when a worker or the driver died between an upload and its registration."""
    found = ckpt.latest(cfg)
    return found[1] if found else {}


def _corpus_dataset(cfg: Config, segment_seconds: float, blocks, rank: int, ledger):
    """Rank's stream over a prepared corpus from the restored checkpoint's data position to the end of the run."""
    quiet_ray_data()
    per_worker = cfg.train.batch_size // cfg.train.workers
    start = int(resume_point(cfg).get("data_position", 0))
    corpus = {"segment_seconds": segment_seconds, "blocks": ray.get(blocks)}
    return rank_dataset(cfg, corpus, blocks, rank, cfg.train.workers, start,
                        max(cfg.train.steps * per_worker, start + per_worker), ledger)


def _raw_dataset(cfg: Config, files, ledger):
    """The raw-source stream, starting at the pass of the checkpoint being restored."""
    return build_dataset(cfg, files, ledger, start_epoch=int(resume_point(cfg).get("epoch", 0)))


__all__ = ["open_source", "RawSource", "CorpusSource", "RawBatches", "CorpusBatches", "resume_point"]

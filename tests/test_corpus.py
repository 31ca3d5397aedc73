"""Prepared corpora: prepare -> index -> per-rank streams (training from them, with an exact resume
after a worker failure, is tested in test_train)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.audio import decode
from service.config import load_config
from service.corpus import Buffer, RankStream, from_pcm, is_corpus
from service.prepare import PrepareOptions, plan_tasks, prepare, segment
from service.storage import list_files, read_bytes
from tests.conftest import GOOD, bad_files, upload_dir

SMALL = ["model.width=32", "model.depth=1", "model.heads=2", "model.pred_width=32", "model.pred_depth=1",
         "model.pred_heads=2", "train.batch_size=8", "train.log_every=1", "optim.warmup_steps=1"]
OPTS = PrepareOptions(segment_seconds=1.0, row_group=2, task_files=2)


def test_rank_streams_cover_every_segment_once_per_pass_and_locate_positions():
    rows = np.random.default_rng(0).integers(1, 6, size=13)
    for k, world in ((1, 1), (3, 2), (4, 3), (13, 2)):
        streams = [RankStream(rows, k, seed=7, rank=r, world=world) for r in range(world)]
        seen: dict[int, list[int]] = {}
        for s in streams:
            pos, nth = 0, 0
            while s.buffer(nth).epoch < 2:  # two whole passes
                buf = s.buffer(nth)
                assert buf.nth == nth and buf.start == pos  # positions contiguous
                assert (buf.epoch * s.buffers_per_pass + buf.index) % world == s.rank  # dealt in turn
                size = int(rows[s.block_ids(buf)].sum())
                for q in (buf.start, buf.start + size - 1):
                    assert s.locate(q) == (buf, q - buf.start)
                seen.setdefault(buf.epoch, []).extend(s.block_ids(buf).tolist())
                pos, nth = pos + size, nth + 1
        for epoch in (0, 1):  # a pass visits every row group exactly once, across the ranks
            assert sorted(seen[epoch]) == list(range(len(rows)))
    a, b = RankStream(rows, 3, 7, 0, 1), RankStream(rows, 3, 8, 0, 1)
    second_pass = Buffer(a.buffers_per_pass, 1, 0, 0)
    assert (not np.array_equal(a.block_ids(a.buffer(0)), b.block_ids(b.buffer(0)))
            or not np.array_equal(a.block_ids(second_pass), b.block_ids(second_pass)))


def test_tasks_and_segments():
    assert plan_tasks([10, 10, 10, 10, 10], task_mb=1, task_files=2) == [[0, 2], [2, 4], [4, 5]]
    assert plan_tasks([2 ** 20] * 3, task_mb=1.5, task_files=100) == [[0, 1], [1, 2], [2, 3]]
    segs = segment(np.zeros(16000 * 25), 16000, 10.0)
    assert [len(s) for s in segs] == [200000, 200000] and len(segment(np.zeros(100), 16000, 10.0)) == 1


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_prepare_on_s3_keeps_the_good_audio_and_counts_skips_by_reason(corpus_dir, s3_server, tmp_path):
    src = upload_dir(s3_server, corpus_dir, "prep", "raw")
    cfg = load_config("tiny", [f"data.source={src}", "data.max_skip_fraction=0.9", "data.max_file_mb=1",
                               f"storage.s3_endpoint={s3_server}"])
    summary = prepare(cfg, "s3://prep/corpus", OPTS)
    assert is_corpus("s3://prep/corpus", cfg.storage)
    expected = {}
    for _, reason in bad_files().values():
        expected[reason] = expected.get(reason, 0) + 1
    assert summary["skipped"] == expected and summary["files"] == len(GOOD)
    assert summary["stats"]["features.std"] > 0
    index = pq.read_table(_local_copy(s3_server, "prep", "corpus/index.parquet", tmp_path)).to_pylist()
    # every good file's audio is there once, segment by segment, equal to what the raw path decodes
    by_key: dict[str, list] = {}
    for row in index:
        by_key.setdefault(row["key"], []).append(row)
    assert sorted(by_key) == sorted(n for n, *_ in GOOD)
    files, _ = list_files(src, endpoint=s3_server)
    for f in files:
        if f.key not in by_key:
            continue
        rows = sorted(by_key[f.key], key=lambda r: r["segment"])
        assert [r["segment"] for r in rows] == list(range(len(rows)))
        raw = decode(read_bytes(f.uri, s3_server), 16000, trim=True)
        got = np.concatenate([_segment_audio(s3_server, tmp_path, r) for r in rows])
        assert len(got) == len(raw) and np.abs(got - raw).max() < 2e-4, f.key
    assert len({r["id"] for r in index}) == len(index) == summary["segments"]
    # and a run trains from the S3 corpus (int16 waveforms to the trainer's log-mel), reporting its skips
    from service.train import run_pretraining
    run = run_pretraining(load_config("tiny", SMALL + [
        "data.source=s3://prep/corpus", f"storage.s3_endpoint={s3_server}", f"checkpoint.storage_path={tmp_path}",
        "run_name=from-s3", "train.steps=2", "checkpoint.every_steps=2", "data.features_in=trainer",
        "train.precision=bf16"]))  # the GPU's bf16 autocast path, run on the CPU
    assert run["status"] == "succeeded", run["error"]
    assert run["data"]["skipped"] == expected and run["data"]["prepared"] == "s3://prep/corpus"
    assert run["metrics"]["data_position"] == 2 * 8


def test_a_killed_prepare_resumes_without_duplicates(clean_corpus_dir, tmp_path, ray_local):
    cfg = load_config("tiny", [f"data.source={clean_corpus_dir}"])
    full = tmp_path / "full"
    reference = prepare(cfg, str(full), OPTS)
    assert reference["files"] == len(GOOD) and reference["skipped"] == {}
    # a run killed during task 2: task 1 finished (shards + done record), task 2 left half a shard behind
    killed = tmp_path / "killed"
    (killed / "shards").mkdir(parents=True)
    (killed / "done").mkdir()
    shutil.copy(full / "plan.json", killed / "plan.json")
    shutil.copy(full / "done" / "part-00001.json", killed / "done" / "part-00001.json")
    for shard in json.loads((full / "done" / "part-00001.json").read_text())["shards"]:
        shutil.copy(full / "shards" / shard["name"], killed / "shards" / shard["name"])
    kept = (killed / "shards" / "part-00001-00.parquet").stat().st_mtime_ns
    half = (full / "shards" / "part-00002-00.parquet").read_bytes()
    (killed / "shards" / "part-00002-00.parquet").write_bytes(half[:len(half) // 2])
    resumed = prepare(cfg, str(killed), OPTS)
    assert (killed / "shards" / "part-00001-00.parquet").stat().st_mtime_ns == kept  # finished work is kept
    a = pq.read_table(full / "index.parquet").to_pylist()
    b = pq.read_table(killed / "index.parquet").to_pylist()
    assert a == b and resumed["segments"] == reference["segments"]
    assert len({(r["key"], r["segment"]) for r in b}) == len(b)  # no duplicates
    # the same out dir with another source is refused, naming what differs
    other = load_config("tiny", [f"data.source={clean_corpus_dir / 'a'}"])
    (killed / "corpus.json").unlink()
    with pytest.raises(Exception, match="another source"):
        prepare(other, str(killed), OPTS)


def _local_copy(endpoint: str, bucket: str, key: str, tmp: Path) -> Path:
    import boto3
    out = tmp / key.replace("/", "_")
    boto3.client("s3", endpoint_url=endpoint).download_file(bucket, key, str(out))
    return out


def _segment_audio(endpoint: str, tmp: Path, row: dict) -> np.ndarray:
    path = _local_copy(endpoint, "prep", f"corpus/shards/{row['shard']}", tmp)
    table = pq.ParquetFile(path).read_row_group(row["row_group"])
    i = [(k, s) for k, s in zip(table["key"].to_pylist(), table["segment"].to_pylist())].index(
        (row["key"], row["segment"]))
    return from_pcm(table["pcm"][i].as_py())

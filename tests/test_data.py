"""Ray Data pipeline: sources (dir, S3, manifest), bad input, epoch order, shapes."""
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import GOOD, bad_files, upload_dir
from service.config import load_config
import service.raydata
from service.data import DataSourceError, build_dataset, epoch_order, list_source
from service.ledger import DataLedger, check_skips, skip_summary
from service.raydata import calm_streaming_executor

pytestmark = pytest.mark.usefixtures("ray_local")


def cfg_for(source, endpoint=None, **over):
    sets = [f"data.source={source}", "data.max_file_mb=1", "data.crops_per_file=2", "train.steps=1",
            "train.batch_size=2", "seed=3", "features.mean=-5.0", "features.std=5.0"] + \
        [f"{k}={v}" for k, v in over.items()]
    if endpoint:
        sets.append(f"storage.s3_endpoint={endpoint}")
    return load_config("tiny", sets)


def run_pipeline(cfg, passes=1, start_epoch=0):
    import ray
    listing = list_source(cfg)
    ledger = DataLedger.remote(len(listing.files) + len(listing.too_large), [f.uri for f in listing.too_large])
    rows = build_dataset(cfg, listing, ledger, passes=passes, start_epoch=start_epoch).take_all()
    totals = ray.get(ledger.totals.remote())
    totals["skipped_files"] = ray.get(ledger.skipped_files.remote())
    return listing, rows, totals


def expected_clips(cfg):
    clip_s = cfg.features.clip_samples / cfg.features.sample_rate
    return sum(min(cfg.data.crops_per_file, max(1, int(s * cfg.features.sample_rate // cfg.features.clip_samples)))
               if s > clip_s else 1 for _, _, s, _, _, _ in GOOD)


def test_s3_prefix_with_bad_files_yields_exactly_the_good_clips(corpus_dir, s3_server):
    uri = upload_dir(s3_server, corpus_dir, "audio", "corpus")
    cfg = cfg_for(uri, s3_server)
    listing, rows, totals = run_pipeline(cfg)
    assert listing.ignored_by_extension == 1  # README.txt
    assert len(rows) == expected_clips(cfg)
    assert all(r["x"].shape == (cfg.features.n_mels, cfg.features.n_frames) for r in rows)
    assert all(np.isfinite(r["x"]).all() for r in rows)
    want = Counter(reason for reason in (v[1] for v in bad_files().values()))
    assert totals["skipped"] == dict(want)
    assert totals["clips"] == len(rows)
    assert totals["files_seen"] == len(GOOD) + len(bad_files())
    # every skipped object is named in the examples
    assert any("nan.wav" in k for k in totals["examples"]["non_finite"])
    # the full list names each bad file once with its reason; the user gets one summary line
    listed = {key.rsplit("/", 1)[-1]: reason for key, reason, _ in totals["skipped_files"]}
    assert listed == {name.rsplit("/", 1)[-1]: reason for name, (_, reason) in bad_files().items()}
    line = skip_summary(totals)
    assert "\n" not in line and "undecodable=3" in line and "skipped.csv" in line


def test_local_dir_and_manifest_match_s3(clean_corpus_dir, s3_server):
    uri = upload_dir(s3_server, clean_corpus_dir, "audio", "clean")
    manifest = clean_corpus_dir / "manifest.csv"
    manifest.write_text("path\n" + "\n".join(name for name, *_ in GOOD) + "\n")

    def fingerprint(rows):
        return sorted(round(float(r["x"].sum()), 2) for r in rows)

    fps = [fingerprint(run_pipeline(cfg_for(src, s3_server))[1])
           for src in (uri, str(clean_corpus_dir), str(manifest))]
    assert fps[0] == fps[1] == fps[2]
    assert len(fps[0]) == expected_clips(cfg_for(uri))


def test_waveform_rows_when_features_in_trainer(clean_corpus_dir):
    cfg = cfg_for(str(clean_corpus_dir), **{"data.features_in": "trainer"})
    _, rows, _ = run_pipeline(cfg)
    assert rows and all(r["x"].shape == (cfg.features.clip_samples,) for r in rows)


def test_epoch_orders_differ_and_repeat_under_seed(clean_corpus_dir):
    a, b = epoch_order(50, seed=1, epoch=0), epoch_order(50, seed=1, epoch=1)
    assert not np.array_equal(a, b) and sorted(a) == list(range(50))
    assert np.array_equal(a, epoch_order(50, seed=1, epoch=0))
    # through the pipeline: same clips each pass (as a set), different crops/order, and reproducible
    import ray
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    try:
        cfg = cfg_for(str(clean_corpus_dir))
        _, rows, _ = run_pipeline(cfg, passes=2)
        e0 = [round(float(r["x"].sum()), 3) for r in rows if r["epoch"] == 0]
        e1 = [round(float(r["x"].sum()), 3) for r in rows if r["epoch"] == 1]
        assert len(e0) == len(e1) and e0 != e1
        _, again, _ = run_pipeline(cfg, passes=2)
        assert [round(float(r["x"].sum()), 3) for r in again] == [round(float(r["x"].sum()), 3) for r in rows]
    finally:
        ctx.execution_options.preserve_order = False


def test_empty_or_unreachable_source_fails_clearly(tmp_path, s3_server):
    (tmp_path / "notes.txt").write_text("no audio here")
    with pytest.raises(DataSourceError, match="no audio files"):
        list_source(cfg_for(str(tmp_path)))
    with pytest.raises(DataSourceError, match="unreachable|no audio"):
        list_source(cfg_for(str(tmp_path / "missing")))
    with pytest.raises(DataSourceError, match="s3://nobucket"):
        list_source(cfg_for("s3://nobucket/x", s3_server))


def test_skip_fraction_limit_message_names_reasons_and_keys():
    data = cfg_for("x").data  # max_skip_fraction 0.5, max_read_error_fraction 0.01
    totals = {"files_seen": 40, "skipped": {"undecodable": 30}, "examples": {"undecodable": ["s3://b/k.wav"]}}
    msg = check_skips(totals, data)
    assert "30 of 40" in msg and "undecodable" in msg and "s3://b/k.wav" in msg
    assert check_skips({**totals, "skipped": {"undecodable": 5}}, data) is None
    # files the storage would not give us are a storage problem with their own (small) limit
    unreadable = {"files_seen": 400, "skipped": {"read_error": 5}, "examples": {"read_error": ["s3://b/r.wav"]}}
    msg = check_skips(unreadable, data)
    assert "could not be read after retries" in msg and "data.max_read_error_fraction" in msg and "s3://b/r.wav" in msg


def test_skips_count_files_not_visits(corpus_dir):
    """Three passes over 6 bad files report 6 skipped files, not 18 visits."""
    cfg = cfg_for(str(corpus_dir))
    _, rows, totals = run_pipeline(cfg, passes=3)
    assert totals["skipped"] == dict(Counter(reason for _, reason in bad_files().values()))
    assert totals["files_seen"] == len(GOOD) + len(bad_files())
    assert totals["clips"] == len(rows) == 3 * expected_clips(cfg)


def test_manifest_rows_are_confined_and_checked(clean_corpus_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    good = [name for name, *_ in GOOD]
    (clean_corpus_dir / "m.CSV").write_text("path\n" + "\n".join(good + [good[0]]) + "\n")  # a duplicate
    files = list_source(cfg_for(str(clean_corpus_dir / "m.CSV"))).files
    assert sorted(f.key for f in files) == sorted(good)  # upper-case extension read; duplicate dropped

    def refused(rows, match, **over):
        (clean_corpus_dir / "bad.csv").write_text("path\n" + "\n".join(rows) + "\n")
        with pytest.raises(DataSourceError, match=match):
            list_source(cfg_for(str(clean_corpus_dir / "bad.csv"), **over))

    refused([good[0], "../outside.wav"], r"row 3: path '../outside.wav' resolves to .*outside")
    refused([good[0], "/dev/zero"], r"row 3: path '/dev/zero' is a device or kernel file")
    refused(["/dev/zero"], r"device or kernel file", **{"data.allow_outside_paths": "true"})
    refused(["a"], r"row 2: 'a' is not a regular file")  # a directory
    (tmp_path / "elsewhere.wav").write_bytes((clean_corpus_dir / good[0]).read_bytes())
    refused([str(tmp_path / "elsewhere.wav")], r"outside")
    (clean_corpus_dir / "out.csv").write_text(f"path\n{tmp_path / 'elsewhere.wav'}\n")
    assert len(list_source(cfg_for(str(clean_corpus_dir / "out.csv"), **{"data.allow_outside_paths": "true"})).files) == 1
    pq.write_table(pa.table({"path": [1, 2]}), clean_corpus_dir / "ints.PARQUET")
    with pytest.raises(DataSourceError, match=r"row 0: path 1 is not a non-empty string"):
        list_source(cfg_for(str(clean_corpus_dir / "ints.PARQUET")))


def test_a_huge_but_small_on_disk_file_is_skipped_from_its_header(monkeypatch):
    import soundfile as sf

    from conftest import encode, tone
    from service.audio import Skip, decode
    data = encode(tone(440, 5.0, 16000), 16000, "FLAC")  # 5 s: 0.3 MB of float32 once decoded
    monkeypatch.setattr(sf.SoundFile, "read", lambda *a, **k: pytest.fail("decoded a file it should skip"))
    with pytest.raises(Skip) as e:
        decode(data, 16000, max_decoded_mb=0.1)
    assert e.value.reason == "too_long" and "data.max_decoded_mb=0.1" in e.value.detail


def test_long_files_are_read_around_their_crop_windows_only(tmp_path, monkeypatch):
    """A long object is never decoded whole: each crop window is sought and read alone, and (same rate,
    no silence to trim) the crops are exactly those of the whole-file path."""
    import soundfile as sf

    from conftest import encode, tone
    from service import data as data_mod
    long = tmp_path / "long.flac"
    long.write_bytes(encode(tone(330, 120.0, 16000), 16000, "FLAC"))  # 2 min, ~1 MB on disk
    cfg = cfg_for(str(tmp_path), **{"data.crops_per_file": 3, "data.trim_silence": "false"})
    batch = {"uri": np.array([str(long)]), "key": np.array(["long.flac"]), "epoch": np.array([2]),
             "size": np.array([long.stat().st_size])}
    whole = data_mod.clips_from_files(batch, cfg.features, cfg.data, cfg.storage, cfg.seed)["x"]
    reads, real_read = [], sf.SoundFile.read

    def spy(self, frames=-1, *a, **k):
        reads.append(frames)
        return real_read(self, frames, *a, **k)
    monkeypatch.setattr(sf.SoundFile, "read", spy)
    seek_cfg = cfg.with_overrides({"data.seek_above_mb": 0.01})
    windows = data_mod.clips_from_files(batch, seek_cfg.features, seek_cfg.data, seek_cfg.storage, cfg.seed)["x"]
    assert reads == [cfg.features.clip_samples] * 3  # three windows, nothing else decoded
    assert windows.shape == whole.shape == (3, cfg.features.n_mels, cfg.features.n_frames)
    assert np.allclose(windows, whole, atol=1e-5)


def test_a_transient_storage_error_is_retried_not_counted_as_bad_audio(clean_corpus_dir, monkeypatch):
    import pyarrow.fs as pafs

    from service import data as data_mod
    real, fails = pafs.LocalFileSystem(), {"left": 2}

    class Flaky:  # the object store answers 503 twice, then serves the object
        def open_input_stream(self, path):
            if fails["left"]:
                fails["left"] -= 1
                raise OSError("503 SlowDown")
            return real.open_input_stream(path)

    monkeypatch.setattr(data_mod, "_fs", lambda *a: Flaky())
    cfg = cfg_for(str(clean_corpus_dir))
    name = GOOD[0][0]
    out = data_mod.clips_from_files({"uri": np.array([str(clean_corpus_dir / name)]), "key": np.array([name]),
                                     "epoch": np.array([0])}, cfg.features, cfg.data, cfg.storage, cfg.seed)
    assert fails["left"] == 0 and len(out["x"]) >= 1  # read on the third try: clips, not a skipped file


def test_the_driver_never_builds_rows_per_planned_clip(clean_corpus_dir):
    """A 100k-step x 256 plan (~26M file visits on this corpus) costs the driver what a small one does."""
    import tracemalloc
    listing = list_source(cfg_for(str(clean_corpus_dir)))
    peaks = []
    for steps, batch in ((100, 2), (100_000, 256)):
        cfg = cfg_for(str(clean_corpus_dir), **{"train.steps": steps, "train.batch_size": batch})
        tracemalloc.start()
        build_dataset(cfg, listing)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] + 5 * 2 ** 20, peaks


@pytest.fixture
def pauses(monkeypatch):
    """Ray Data's scheduling loop as it was before the test (restored after it), and every pause the calm
    loop takes (still slept)."""
    import time
    from ray.data._internal.execution.streaming_executor import StreamingExecutor
    monkeypatch.setattr(StreamingExecutor, "_scheduling_loop_step", StreamingExecutor._scheduling_loop_step)
    slept = []
    monkeypatch.setattr(service.raydata, "time", SimpleNamespace(sleep=lambda s: (slept.append(s), time.sleep(s))))
    return slept


def test_the_calm_loop_pauses_only_while_its_consumer_has_output(pauses, monkeypatch):
    from ray.data._internal.execution.streaming_executor import StreamingExecutor
    topologies = []
    monkeypatch.setattr(StreamingExecutor, "_scheduling_loop_step",
                        lambda self, topology: topologies.append(topology) or self.more)
    assert calm_streaming_executor(pause_s=0.001) and calm_streaming_executor(pause_s=0.001)
    step = StreamingExecutor._scheduling_loop_step
    assert step.calm and not getattr(step.plain, "calm", False)  # wrapped once

    class Loop:
        more, idle = True, False

        def _consumer_idling(self):
            return self.idle

    loop = Loop()
    assert step(loop, "t") is True and pauses == [0.001]  # output waiting: pause
    loop.idle = True
    assert step(loop, "t") is True and pauses == [0.001]  # consumer waiting: full speed
    loop.more, loop.idle = False, False
    assert step(loop, "t") is False and pauses == [0.001]  # finished: return at once
    assert topologies == ["t"] * 3


def test_a_calm_stream_delivers_every_row_in_order_to_a_slow_consumer(pauses):
    import time

    import ray
    assert calm_streaming_executor()
    ds = ray.data.range(300, override_num_blocks=30).map_batches(lambda b: {"id": b["id"] * 2}, batch_size=10)
    ds.context.execution_options.preserve_order = True
    got = []
    for b in ds.iter_batches(batch_size=16, batch_format="numpy"):
        time.sleep(0.02)  # slower than the stream, so output waits and the loop pauses
        got.extend(b["id"].tolist())
    assert got == list(range(0, 600, 2))
    assert pauses and set(pauses) == {0.05}

"""The embed job (Ray Data batch inference): its embeddings are `load_encoder(uri).embed`'s on the same files,
bad files are counted and not fatal, a rerun after a kill finishes without duplicates, culprits are named
before any work, a prepared corpus's file is its segments put back together, the registry run links to the
output; and the pyfunc, HEAR and X-ARES wrappers return what `AudioEncoder.embed` returns."""
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import GOOD, bad_files
from service.audio import decode
from service.config import load_config
from service.embed import EmbedOptions, embed_waveforms, read_embeddings, run_embed
from service.encoder import load_encoder, random_encoder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

SMALL = ["model.width=64", "model.depth=2", "model.heads=2", "features.mean=-6.0", "features.std=4.0"]
NAME = "embed-test"
SETS = ["data.max_file_mb=2", "data.max_skip_fraction=0.9"]  # bad/huge.wav (2.6 MB) is too_large


def job_cfg(source, extra=()):
    from jobs.embed import job_config
    return job_config(str(source), [*SETS, *extra])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two small random-init models as encoder.pt files (other weights, same architecture)."""
    d = tmp_path_factory.mktemp("models")
    cfg = load_config("tiny", SMALL)
    paths = []
    for seed in (0, 1):
        (d / f"m{seed}").mkdir()
        paths.append(str(random_encoder(cfg, seed, "cpu").save(d / f"m{seed}" / "encoder.pt")))
    return paths


@pytest.fixture(scope="module")
def registry(models, tmp_path_factory):
    """A SQLite MLflow registry with models[0] registered as NAME version 1 (alias current), as a pretraining run
    registers it: (tracking URI, the version's run id).  MLflow's global URI and the env are restored after."""
    import mlflow
    from mlflow import MlflowClient

    from service.registry import log_encoder_model
    d = tmp_path_factory.mktemp("mlflow")
    uri, before = f"sqlite:///{d}/mlflow.db", os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        c = MlflowClient(uri)
        exp = c.create_experiment("embed-tests", artifact_location=(d / "artifacts").as_uri())
        run_id = c.create_run(exp).info.run_id
        blob = torch.load(models[0], weights_only=True)
        state = {"config": blob["config"], "target_encoder": blob["target_encoder"], "step": 0}
        log_encoder_model(state, run_id, uri, registered_name=NAME)
        c.set_registered_model_alias(NAME, "current", "1")
        c.set_terminated(run_id)
        yield uri, run_id
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="module")
def first_run(registry, corpus_dir, tmp_path_factory):
    """The job on the corpus with every kind of bad file, frames on, 4 files per part, from the registry."""
    out = tmp_path_factory.mktemp("embed") / "run1"
    summary = run_embed(f"models:/{NAME}@current", job_cfg(corpus_dir), str(out),
                        EmbedOptions(frames=True, files_per_part=4, actors=2), progress=lambda *_: None)
    return out, summary


def test_job_embeds_each_file_as_load_encoder_embed_does_and_counts_bad_files(first_run, registry, corpus_dir):
    out, s = first_run
    enc = load_encoder(f"models:/{NAME}@current", "cpu")
    rows = read_embeddings(str(out)).to_pylist()
    assert [r["key"] for r in rows] == sorted(name for name, *_ in GOOD)  # every good file once, in key order
    for r in rows:
        wav = decode((corpus_dir / r["key"]).read_bytes(), enc.sample_rate)
        assert r["duration"] == pytest.approx(len(wav) / enc.sample_rate, abs=1e-4)
        np.testing.assert_allclose(r["embedding"], enc.embed(wav[None])[0].numpy(), rtol=1e-4, atol=1e-4)
        frames, t_ms = enc.embed_frames(wav[None])
        np.testing.assert_allclose(np.asarray(r["frames"]), frames[0].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r["frame_ms"], t_ms[0].numpy(), rtol=1e-6)
    # bad audio: skipped, counted by reason like in training, not fatal
    expected: dict[str, int] = {}
    for _, reason in bad_files().values():
        expected[reason] = expected.get(reason, 0) + 1
    assert s["status"] == "succeeded" and s["skipped"] == expected
    assert s["files"] == len(GOOD) + len(bad_files()) and s["embedded"] == len(GOOD)
    skipped_csv = (out / "skipped.csv").read_text().splitlines()
    assert len(skipped_csv) == 1 + len(bad_files()) and any("bad/nan.wav,non_finite" in line for line in skipped_csv)
    # the model read: resolved version, weights digest, readout; in the summary and in every shard
    assert s["resolved_model_uri"] == f"models:/{NAME}/1" and s["weights_sha256"] == enc.digest()
    assert s["readout"]["embedding_dim"] == enc.embedding_dim == 1024 and s["readout"]["pooling"] == "meanstd"
    assert s["seconds"] == pytest.approx(sum(r["duration"] for r in rows), rel=1e-4)
    assert s["throughput"]["files"] == len(GOOD) and s["throughput"]["files_per_s"] > 0
    assert json.loads((out / "embeddings.json").read_text()) == json.loads(json.dumps(s))
    for name in s["shards"]:
        meta = json.loads(pq.read_metadata(out / name).metadata[b"audio_jepa.embed"])
        assert meta["model"] == f"models:/{NAME}/1" and meta["weights_sha256"] == enc.digest()
    # the registry run that produced the version links to the output (tag + the summary as an artifact)
    from mlflow import MlflowClient
    uri, run_id = registry
    c = MlflowClient(uri)
    assert s["mlflow"]["run_id"] == run_id
    assert c.get_run(run_id).data.tags[s["mlflow"]["tag"]] == str(out)
    assert c.get_model_version(NAME, "1").tags[s["mlflow"]["tag"]] == str(out)
    assert s["mlflow"]["artifact"] in {a.path for a in c.list_artifacts(run_id, "embeddings")}


def test_rerun_after_a_kill_gives_the_same_rows_without_duplicates(first_run, tmp_path):
    """What a killed job leaves (some shards, one half-written, a temp file of a write, no summary) finishes
    with the same command: finished shards kept, the rest redone, each file once."""
    out, first = first_run
    again = tmp_path / "run1"
    shutil.copytree(out, again)
    shards = sorted((again / "shards").glob("part-*.parquet"))
    assert len(shards) == 4
    kept = {p.name: p.stat().st_mtime_ns for p in shards[2:]}
    shards[0].unlink()  # never written
    shards[1].write_bytes(shards[1].read_bytes()[:200])  # damaged
    (again / "shards" / "part-00000.parquet.tmp-4242").write_bytes(b"half a shard")  # a killed local write
    (again / "embeddings.json").unlink()
    (again / "skipped.csv").unlink()
    before = read_embeddings(str(out)).to_pylist()
    log = []
    s = run_embed(f"models:/{NAME}@current", job_cfg(first["source"]), str(again),
                  EmbedOptions(frames=True, files_per_part=4, actors=2), progress=log.append)
    assert s["parts"] == {"total": 4, "done_before": 2, "done_now": 2}
    assert {p.name: p.stat().st_mtime_ns for p in sorted((again / "shards").glob("part-*.parquet"))[2:]} == kept
    assert not list((again / "shards").glob("*.tmp-*"))
    after = read_embeddings(str(again)).to_pylist()
    assert [r["key"] for r in after] == [r["key"] for r in before]  # no duplicates, none missing
    for a, b in zip(after, before):
        np.testing.assert_allclose(a["embedding"], b["embedding"], rtol=1e-6, atol=1e-6)
    assert s["skipped"] == first["skipped"] and s["embedded"] == first["embedded"]
    # a finished output: the same command again does nothing
    log.clear()
    assert run_embed(f"models:/{NAME}/1", job_cfg(first["source"]), str(again),
                     EmbedOptions(frames=True, files_per_part=4), progress=log.append) == s
    assert any("nothing to do" in line for line in log)


def test_culprits_are_named_before_any_work(first_run, models, tmp_path, capsys):
    from jobs.embed import main
    out, first = first_run

    def fails(*args, code=1):
        with pytest.raises(SystemExit) as e:
            main(["--model-uri", models[0], "--source", first["source"], "--out", str(tmp_path / "new"),
                  *[a for s in SETS for a in ("--set", s)], *args])
        assert e.value.code == code
        return capsys.readouterr().err

    err = fails("--model-uri", str(tmp_path / "no-such-checkpoint"))
    assert f"--model-uri {tmp_path / 'no-such-checkpoint'} cannot be read" in err
    (tmp_path / "silence").mkdir()
    (tmp_path / "silence" / "notes.txt").write_text("no audio here")
    err = fails("--source", str(tmp_path / "silence"))
    assert f"--source {tmp_path / 'silence'}" in err and "has no audio files" in err
    err = fails("--out", str(out), "--model-uri", models[1])  # other weights
    assert f"--out {out} holds embeddings of another model: models:/{NAME}/1" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.parquet").write_bytes(b"x")
    assert "is not empty and holds no embed_plan.json" in fails("--out", str(tmp_path / "other"))
    err = fails("--out", str(out), "--frames", "--files-per-part", "3")  # the same model, other parts
    assert "other settings (parts differ" in err
    assert "--set model.width" in fails("--set", "model.width=8", code=2)
    assert not (tmp_path / "new").exists()  # nothing was written anywhere


def test_prepared_corpus_file_is_its_segments_put_back_together(models, clean_corpus_dir, tmp_path):
    from service.prepare import PrepareOptions, prepare
    cfg = load_config("tiny", [f"data.source={clean_corpus_dir}"])
    corpus = tmp_path / "corpus"
    prepare(cfg, str(corpus), PrepareOptions(segment_seconds=1.0, row_group=2, shard_mb=0.05), progress=lambda *_: None)
    s = run_embed(models[0], job_cfg(corpus), str(tmp_path / "out"), EmbedOptions(files_per_part=2, actors=2),
                  progress=lambda *_: None)
    assert s["source_kind"] == "corpus" and s["embedded"] == s["files"] == len(GOOD)
    # independently: every shard row of the corpus, grouped by key, in segment order
    segs: dict[str, list] = {}
    for shard in sorted((corpus / "shards").glob("*.parquet")):
        for r in pq.read_table(shard).to_pylist():
            segs.setdefault(r["key"], []).append((r["segment"], r["pcm"]))
    assert max(len(v) for v in segs.values()) >= 8  # long_330.wav spans row groups and shards
    enc = load_encoder(models[0], "cpu")
    rows = read_embeddings(str(tmp_path / "out")).to_pylist()
    assert [r["key"] for r in rows] == sorted(segs)
    for r in rows:
        pcm = b"".join(p for _, p in sorted(segs[r["key"]]))
        wav = np.frombuffer(pcm, "<i2").astype(np.float32) / 32767.0
        assert r["duration"] == pytest.approx(len(wav) / 16000, abs=1e-4)
        np.testing.assert_allclose(r["embedding"], enc.embed(wav[None])[0].numpy(), rtol=1e-4, atol=1e-4)


def test_batched_files_equal_files_alone_and_bf16_stays_close(models):
    """Files of different lengths sharing passes get what each gets alone; bf16 autocast (the GPU's path, here
    forced on the CPU) stays close to fp32."""
    enc = load_encoder(models[0], "cpu")
    rng = np.random.default_rng(0)
    wavs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (3000, 16000, 40000, 100_000, 20000)]
    got = embed_waveforms(enc, wavs, frames=True, batch_chunks=8)
    for w, (clip, frames, t_ms) in zip(wavs, got):
        f, t = enc.embed_frames(w[None])
        np.testing.assert_allclose(clip, enc.embed(w[None])[0].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(frames, f[0].numpy(), rtol=1e-4, atol=1e-4)
        assert np.array_equal(t_ms, t[0].numpy())
    bf16 = embed_waveforms(enc, wavs, precision="bf16")
    for (a, *_), (b, *_) in zip(got, bf16):
        assert np.isfinite(b).all() and np.corrcoef(a, b)[0, 1] > 0.99


def test_pyfunc_hear_and_xares_return_what_embed_returns(registry, models):
    import mlflow.pyfunc

    from service.adapters import hear
    from service.adapters.xares import AudioJEPAEncoder
    enc = load_encoder(models[0], "cpu")
    rng = np.random.default_rng(1)
    for n in (4000, 2 * 16000, 5 * 16000 + 123):  # shorter than a clip, one, several
        audio = (0.1 * rng.standard_normal((3, n))).astype(np.float32)
        clip = enc.embed(audio).numpy()
        frames, t_ms = enc.embed_frames(audio)
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@current")  # as registered: pickled class, code_paths
        np.testing.assert_allclose(np.asarray(pyfunc.predict(audio)), clip, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(pyfunc.predict({"waveform": audio})), clip, rtol=1e-5, atol=1e-5)
        model = hear.load_model(models[0], "cpu")
        x = torch.from_numpy(audio)
        np.testing.assert_allclose(hear.get_scene_embeddings(x, model).numpy(), clip, rtol=1e-5, atol=1e-5)
        emb, ts = hear.get_timestamp_embeddings(x, model)
        np.testing.assert_allclose(emb.numpy(), frames.numpy(), rtol=1e-5, atol=1e-5)
        assert torch.equal(ts, t_ms)
        np.testing.assert_allclose(AudioJEPAEncoder(models[0], "cpu")(x).numpy(), frames.numpy(), rtol=1e-5,
                                   atol=1e-5)

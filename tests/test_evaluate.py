"""Evaluation: probes learn a spectrally separable task, fall to chance on shuffled labels,
never fit on test, and always report the baselines."""
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from service import probe
from service.probe import TaskError, load_task, run_probes

BANDS = {"low": (200, 400), "mid": (1000, 1600), "high": (3000, 4500)}


def make_task(root, per_split=(14, 6, 8), shuffle=False, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, (lo, hi) in BANDS.items():
        for split, n in zip(("train", "valid", "test"), per_split):
            for i in range(n):
                sr = 16000
                dur = rng.uniform(0.6, 1.6)
                t = np.arange(int(dur * sr)) / sr
                f = rng.uniform(lo, hi)
                x = 0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.shape)
                name = f"{label}_{split}_{i}.wav"
                sf.write(root / name, x.astype(np.float32), sr)
                rows.append([name, label, split])
    if shuffle:
        labels = [r[1] for r in rows]
        rng.shuffle(labels)
        for r, l in zip(rows, labels):
            r[1] = l
    (root / "manifest.csv").write_text("path,label,split\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return root


def run_eval(task, tmp_path, extra=()):
    out = tmp_path / "summary.json"
    r = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--model-uri", "random", "--config", "tiny",
                        "--set", "model.depth=2", "--task", str(task), "--cache-dir", str(tmp_path / "cache"),
                        "--summary-json", str(out), *extra], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_probe_learns_bands_and_drops_to_chance_on_shuffled_labels(tmp_path):
    summary, stdout = run_eval(make_task(tmp_path / "bands"), tmp_path)
    rows = {(r["model"], r["probe"]): r for r in summary["results"]}
    assert set(rows) == {(m, p) for m in ("random", "logmel") for p in ("linear", "knn")}
    assert rows[("logmel", "linear")]["accuracy"] >= 0.9
    assert rows[("random", "linear")]["accuracy"] > 0.5  # well above chance (1/3)
    assert "| bands | logmel | linear |" in stdout
    shuffled, _ = run_eval(make_task(tmp_path / "shuffled", shuffle=True), tmp_path)
    for r in shuffled["results"]:
        assert r["accuracy"] < 0.6, r  # 3 classes: chance is 1/3


def test_nothing_from_test_reaches_fitting_or_selection(monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((90, 8))
    y = np.repeat(["a", "b", "c"], 30)
    X[y == "b"] += 2
    split = np.array((["train"] * 18 + ["valid"] * 6 + ["test"] * 6) * 3)
    X[split == "test"] += 1000.0  # any test row seen by a fit is recognisable
    seen = []
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler
    for cls in (LogisticRegression, KNeighborsClassifier, StandardScaler):
        orig = cls.fit

        def spy(self, Xf, yf=None, *a, _orig=orig, **k):
            seen.append(np.asarray(Xf))
            return _orig(self, Xf, yf, *a, **k)
        monkeypatch.setattr(cls, "fit", spy)
    rows = run_probes(X, y, split)
    assert seen and all(np.abs(s).max() < 500 for s in seen)
    assert {r["probe"] for r in rows} == {"linear", "knn"}
    # sweeps score on valid: then neither valid labels nor test rows are fit on
    seen.clear()
    run_probes(X, y, split, eval_split="valid")
    assert all(len(s) <= 54 and np.abs(s).max() < 500 for s in seen)


def test_manifest_errors_name_the_problem(tmp_path):
    (tmp_path / "manifest.csv").write_text("file,label\nx.wav,a\n")
    with pytest.raises(TaskError, match="header"):
        load_task(str(tmp_path))
    (tmp_path / "manifest.csv").write_text("path,label,split\nx.wav,a,training\n")
    with pytest.raises(TaskError, match="line 2"):
        load_task(str(tmp_path))
    with pytest.raises(TaskError, match="manifest.csv"):
        load_task(str(tmp_path / "nowhere"))
    # leakage: one clip in two splits is refused, naming it and both lines
    (tmp_path / "manifest.csv").write_text("path,label,split\na.wav,x,train\n\nb.wav,y,test\n./a.wav,x,test\n")
    with pytest.raises(TaskError, match=r"'./a.wav' is in split 'train' \(line 2\) and in 'test' \(line 5\)"):
        load_task(str(tmp_path))


def test_embedding_cache_reuses(tmp_path):
    calls = []
    f = lambda: calls.append(1) or np.ones((2, 3))  # noqa: E731
    a = probe.cached(str(tmp_path), {"k": 1}, f)
    b = probe.cached(str(tmp_path), {"k": 1}, f)
    assert len(calls) == 1 and np.array_equal(a, b)


def test_probe_results_are_cached_with_their_features_and_the_probes_version(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 12)
    X = rng.standard_normal((24, 4)) + (y == "a")[:, None] * 2.0
    split = np.tile(np.array(["train"] * 8 + ["valid"] * 2 + ["test"] * 2), 2)
    calls = []
    real = probe.run_probes
    monkeypatch.setattr(probe, "run_probes", lambda *a: calls.append(1) or real(*a))
    first = probe.cached_probes(str(tmp_path), {"model": "m#1"}, X, y, split)
    assert probe.cached_probes(str(tmp_path), {"model": "m#1"}, X, y, split) == first and len(calls) == 1
    probe.cached_probes(str(tmp_path), {"model": "m#2"}, X, y, split)  # other features: probed
    monkeypatch.setattr(probe, "PROBES_VERSION", probe.PROBES_VERSION + 1)  # the probes changed: probed again
    assert probe.cached_probes(str(tmp_path), {"model": "m#1"}, X, y, split) == first and len(calls) == 3
    assert {r["probe"] for r in first} == {"linear", "knn"}


def test_knn_is_on_standardised_features():
    """A large shared offset (what uncentred encoder features have) must not change the kNN answer."""
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], 30)
    X = rng.standard_normal((90, 16)) + np.repeat(np.eye(3, 16) * 3.0, 30, axis=0)
    split = np.tile(np.array(["train"] * 20 + ["valid"] * 4 + ["test"] * 6), 3)
    knn = lambda feats: next(r for r in run_probes(feats, y, split) if r["probe"] == "knn")["accuracy"]
    shifted = X + 50.0 * rng.standard_normal(16)  # one mean vector holding almost all the energy
    assert knn(shifted) == knn(X) > 0.6


def test_random_and_trained_encoders_share_one_readout(tmp_path, monkeypatch):
    """`jobs.evaluate`'s models all go through AudioEncoder.embed -> clip_readout: like for like."""
    import torch

    from service import encoder as encoder_mod
    from service.config import load_config
    from service.evaluate import evaluate
    cfg = load_config("tiny", ["model.width=32", "model.depth=1", "model.heads=2", "model.pred_width=32",
                               "model.pred_heads=2", "model.pred_depth=1", "features.mean=-5.0", "features.std=5.0"])
    trained = encoder_mod.AudioEncoder(cfg, device="cpu")
    with torch.no_grad():
        for p in trained.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    monkeypatch.setattr(encoder_mod, "load_encoder", lambda uri, device=None: trained)
    monkeypatch.setattr("service.evaluate.load_encoder", lambda uri: trained)
    seen = []
    real = encoder_mod.clip_readout
    monkeypatch.setattr(encoder_mod, "clip_readout", lambda *a, **k: seen.append(a[0].shape[-1]) or real(*a, **k))
    sources = []
    embed = encoder_mod.AudioEncoder.embed
    monkeypatch.setattr(encoder_mod.AudioEncoder, "embed",
                        lambda self, *a, **k: sources.append(self.source) or embed(self, *a, **k))
    task = make_task(tmp_path / "bands", per_split=(4, 2, 2))
    out = evaluate("models:/x@y", [str(task)], log_to_mlflow=False, progress=lambda *_: None)
    assert {r["model"] for r in out["results"]} == {"jepa", "random", "logmel"}
    assert set(sources) == {"", "random"} and len(seen) == len(sources)


def test_dev_tasks_splits_share_no_source_group():
    """Valid is disjoint from train the way test is: by soundfont, by voice, by recording."""
    from jobs.make_demo_corpus import INSTRUMENT_PLAN, digit_voice_splits, language_splits
    fonts = {split: sf for sf, split, _ in INSTRUMENT_PLAN}
    assert set(fonts) == {"train", "valid", "test"} and len(set(fonts.values())) == 3
    voices = [f"en-us+v{i}" for i in range(100)]
    splits = digit_voice_splits(voices, np.random.default_rng(1), 60)
    assert all(splits[s] for s in ("train", "valid", "test"))
    assert not (set(splits["train"]) & set(splits["valid"]) or set(splits["train"]) & set(splits["test"])
                or set(splits["valid"]) & set(splits["test"]))
    files = [f"{lang}/{kind}/{c}.ogg" for lang in ("de", "fr", "ru") for kind in ("alpha", "syllab")
             for c in "abcdefghijklmnopqrst"]
    rows = language_splits(files)
    by_split = {s: {f for f, _, sp in rows if sp == s} for s in ("train", "valid", "test")}
    assert sum(len(v) for v in by_split.values()) == len({f for f, _, _ in rows}) == len(rows)
    for lang in ("de", "fr", "ru"):  # every class in every split
        assert all(any(f.startswith(lang) for f in by_split[s]) for s in by_split)


def test_noisy_dev_tasks_backgrounds_split_and_mix_at_snr():
    """The noisy tasks: a background file in one split only, the mix at the drawn SNR over the clip's active
    frames, and spoken_language_noisy's recordings split exactly as spoken_language's."""
    from jobs.make_demo_corpus import (INSTRUMENT_NOISY_PLAN, active_frames, background_splits, language_splits,
                                       mix_at_snr)
    names = [f"ufoai/ambience/a{i}.ogg" for i in range(120)] + [f"colobot/music/m{i}.ogg" for i in range(30)]
    splits = background_splits(names + names[:10])  # duplicates count once
    assert sorted(sum(splits.values(), [])) == sorted(names)
    assert all(len(splits[s]) >= 10 for s in ("train", "valid", "test"))
    assert background_splits(list(reversed(names))) == splits  # a stable hash, not the listing order
    fonts = {split: sf for sf, split, _ in INSTRUMENT_NOISY_PLAN}
    assert set(fonts) == {"train", "valid", "test"} and len(set(fonts.values())) == 3
    assert 128 * len(next(k for _, s, k in INSTRUMENT_NOISY_PLAN if s == "test")) >= 500

    rng = np.random.default_rng(0)
    clean = np.concatenate([np.zeros(8000), 0.01 * rng.standard_normal(16000), np.zeros(8000)]).astype(np.float32)
    noise = (0.3 * rng.standard_normal(5000)).astype(np.float32)  # shorter than the clip: looped
    assert len(active_frames(clean)) == 16000
    for snr in (-5.0, 0.0, 5.0):
        y = mix_at_snr(clean, noise, snr, offset=1234)
        assert y.shape == clean.shape and y.dtype == np.float32 and np.abs(y).max() <= 0.99
        n = y - clean
        measured = 10 * np.log10((clean[8000:24000] ** 2).mean() / (n ** 2).mean())
        assert abs(measured - snr) < 0.05, (snr, measured)
    loud = mix_at_snr(np.ones(4000, np.float32) * 0.9, noise, -5.0, 0)
    assert abs(np.abs(loud).max() - 0.99) < 1e-6  # scaled down instead of clipping
    try:
        mix_at_snr(clean, np.zeros(100, np.float32), 0.0, 0)
        raise AssertionError("a silent background must be refused")
    except ValueError:
        pass

    files = [f"{lang}/{kind}/{c}{i}.ogg" for lang in ("de", "ml") for kind in ("alpha", "syllab")
             for c in "abcdefghij" for i in range(8)]
    small, big = language_splits(files), language_splits(files, per_language=120)
    assert set(small) <= set(big) and len(big) > len(small)
    by_split = {s: {f for f, _, sp in big if sp == s} for s in ("train", "valid", "test")}
    assert not (by_split["train"] & by_split["test"] or by_split["valid"] & by_split["test"]
                or by_split["train"] & by_split["valid"])


def test_study_controls_blend_and_projection(tmp_path):
    """The EMA blend mixes the online encoder with the very init the run started from, at the product of the
    taus; the projection baseline reads a fixed random map of the patches out like an encoder's tokens."""
    import math

    import torch

    from service import checkpoint as ckpt
    from service.config import load_config
    from service.controls import blend_encoder, init_weight, projection_encoder
    from service.encoder import random_encoder
    from service.model import AudioJEPA
    from service.optim import build_optimizer, tau_at
    cfg = load_config("tiny", ["model.width=32", "model.depth=1", "model.heads=2", "model.pred_width=32",
                               "model.pred_depth=1", "model.pred_heads=2", "features.mean=-5.0", "features.std=5.0",
                               "train.steps=50", "ema.tau_start=0.9", "ema.tau_end=1.0"])
    torch.manual_seed(cfg.seed)
    model = AudioJEPA(cfg)  # how a run initialises
    init = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert all(torch.equal(init[k], v) for k, v in random_encoder(cfg, cfg.seed).encoder.state_dict().items())
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)  # "trained" online weights
    d = ckpt.save(tmp_path / "c", cfg, model, build_optimizer(model, cfg.optim), 20, 0)
    p = init_weight(cfg, 20)
    assert p == pytest.approx(math.prod(tau_at(s, 50, cfg.ema) for s in range(1, 21)))
    blend = blend_encoder(ckpt.load_state(d), device="cpu")
    for k, v in blend.encoder.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, p * init[k] + (1 - p) * (init[k] + 1.0), atol=1e-6), k
    proj = projection_encoder(cfg, seed=0, device="cpu")
    wav = torch.randn(2, cfg.features.clip_samples) * 0.1
    out = proj.embed(wav)
    assert out.shape == (2, proj.embedding_dim) and torch.isfinite(out).all()
    assert torch.equal(out, projection_encoder(cfg, seed=0, device="cpu").embed(wav))  # fixed, seeded
    assert proj.digest() != projection_encoder(cfg, seed=1, device="cpu").digest()


def test_a_random_inits_normalisation_is_measured_on_every_tasks_train_split_whatever_their_order(tmp_path):
    """`--model-uri random` has no stats of its own: they are pooled over all tasks' train clips, so a task's
    figures do not depend on which task came first."""
    from service.evaluate import evaluate, train_split_stats
    loud, quiet = make_task(tmp_path / "loud", per_split=(4, 2, 2)), make_task(tmp_path / "quiet", (4, 2, 2), seed=1)
    for f in quiet.glob("*.wav"):
        x, sr = sf.read(f)
        sf.write(f, 0.01 * x, sr)  # 40 dB quieter: another log-mel mean
    small = ["model.depth=1", "model.width=32", "model.heads=2", "model.pred_width=32", "model.pred_heads=2"]

    def measured(tasks):
        said = []
        evaluate("random", [str(t) for t in tasks], config="tiny", overrides=small, log_to_mlflow=False,
                 progress=said.append)
        return [s for s in said if s.startswith("features.mean/std measured on the train splits of 2 task(s)")]

    first, second = measured([loud, quiet]), measured([quiet, loud])
    assert len(first) == 1 and first == second
    from service.config import load_config
    fc = load_config("tiny", small)
    pooled, alone = train_split_stats([str(loud), str(quiet)], fc), train_split_stats([str(loud)], fc)
    assert pooled["features.mean"] < alone["features.mean"] - 1  # the quiet task's train clips count

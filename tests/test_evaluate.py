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


def test_embedding_cache_reuses(tmp_path):
    calls = []
    f = lambda: calls.append(1) or np.ones((2, 3))  # noqa: E731
    a = probe.cached(str(tmp_path), {"k": 1}, f)
    b = probe.cached(str(tmp_path), {"k": 1}, f)
    assert len(calls) == 1 and np.array_equal(a, b)

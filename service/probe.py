"""Frozen-feature evaluation: labeled task -> clip embeddings (cached) -> linear probe and kNN.

Split discipline: model selection (the logistic-regression C) uses `valid` (or cross-validation
inside `train` when there is no `valid`); the final probe is fit on train(+valid); `test` is only
ever predicted.  Baselines (random-init encoder, log-mel mean+std) run on the same splits.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from service.audio import Skip, decode
from service.config import FeaturesConfig
from service.features import LogMel
from service.storage import join, read_bytes

log = logging.getLogger("audio_jepa.probe")
SPLITS = ("train", "valid", "test")
C_GRID = (0.01, 0.1, 1.0, 10.0)
KNN_K = 10
PROBES_VERSION = 1  # bump when run_probes changes what it fits or reports: cached probe rows are keyed on it


class TaskError(ValueError):
    pass


@dataclass
class Task:
    uri: str
    paths: list[str]
    labels: list[str]
    splits: list[str]
    manifest_sha: str
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return Path(self.uri.rstrip("/")).name


def load_task(uri: str, endpoint: str | None = None) -> Task:
    """Read and validate `manifest.csv` (header path,label,split) of a task dir or s3:// prefix."""
    try:
        raw = read_bytes(join(uri, "manifest.csv"), endpoint)
    except (FileNotFoundError, OSError) as e:
        raise TaskError(f"task {uri}: cannot read manifest.csv ({e})") from e
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))
    if not rows or [h.strip() for h in rows[0]] != ["path", "label", "split"]:
        raise TaskError(f"task {uri}: manifest.csv header must be 'path,label,split', got {rows[:1]}")
    paths, labels, splits, lines = [], [], [], []
    for i, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        if len(r) != 3 or r[2].strip() not in SPLITS or not r[0].strip() or not r[1].strip():
            raise TaskError(f"task {uri}: manifest.csv line {i} is invalid: {r} "
                            f"(need path,label,split with split in {'|'.join(SPLITS)})")
        paths.append(r[0].strip())
        labels.append(r[1].strip())
        splits.append(r[2].strip())
        lines.append(i)
    for s in ("train", "test"):
        if s not in splits:
            raise TaskError(f"task {uri}: manifest.csv has no '{s}' rows")
    first: dict[str, tuple[int, str]] = {}
    for i, p, s in zip(lines, paths, splits):
        j, other = first.setdefault(os.path.normpath(p), (i, s))
        if other != s:  # the same clip on both sides of a split boundary inflates every score
            raise TaskError(f"task {uri}: '{p}' is in split '{other}' (line {j}) and in '{s}' (line {i}): "
                            "a clip must be in one split only")
    return Task(uri, paths, labels, splits, hashlib.sha256(raw).hexdigest()[:16])


def load_audio(task: Task, sample_rate: int, endpoint: str | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode every clip at `sample_rate`; bad files are skipped with a warning. Returns (wavs, kept mask)."""
    wavs, keep = [], np.zeros(len(task.paths), dtype=bool)
    for i, p in enumerate(task.paths):
        try:
            wavs.append(decode(read_bytes(join(task.uri, p), endpoint), sample_rate, min_seconds=0.05))
            keep[i] = True
        except (Skip, OSError) as e:
            task.skipped[p] = str(e)
            log.warning("task %s: skipped %s: %s", task.uri, p, e)
    return wavs, keep


# --- features ------------------------------------------------------------------------------
@torch.no_grad()
def encoder_features(encoder, wavs: list[np.ndarray], pooling: str | None = None, batch: int = 32) -> np.ndarray:
    """Clip embeddings through the encoder's own readout; clips of similar length batched together."""
    order = np.argsort([len(w) for w in wavs])
    out = None
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        lengths = [len(wavs[i]) for i in idx]
        x = torch.zeros(len(idx), max(lengths))
        for j, i in enumerate(idx):
            x[j, :len(wavs[i])] = torch.from_numpy(wavs[i])
        emb = encoder.embed(x, lengths, pooling).numpy()
        if out is None:
            out = np.zeros((len(wavs), emb.shape[1]), np.float32)
        out[idx] = emb
    return out if out is not None else np.zeros((0, encoder.embedding_dim), np.float32)


@torch.no_grad()
def logmel_features(wavs: list[np.ndarray], fc: FeaturesConfig) -> np.ndarray:
    """Baseline: per-mel-bin mean and std of the log-mel over time."""
    fe = LogMel(fc)
    out = []
    for w in wavs:
        x = torch.from_numpy(w)[None]
        if x.shape[1] < fc.win_length:
            x = torch.nn.functional.pad(x, (0, fc.win_length - x.shape[1]))
        spec = fe(x)[0, :, :min(fc.frames_for(x.shape[1]), fc.n_frames)] if x.shape[1] <= fc.clip_samples else \
            _long_logmel(fe, x, fc)
        out.append(torch.cat([spec.mean(1), spec.std(1, unbiased=False)]).numpy())
    return np.stack(out).astype(np.float32)


def _long_logmel(fe: LogMel, x: torch.Tensor, fc: FeaturesConfig) -> torch.Tensor:
    chunks = [fe(x[:, s:s + fc.clip_samples])[0] for s in range(0, x.shape[1] - fc.win_length + 1,
                                                              fc.n_frames * fc.hop_length)]
    return torch.cat(chunks, dim=1)


def _cached(cache_dir: str | None, key: dict, suffix: str, compute, load, save):
    """`compute()`, stored under sha256(key) in `cache_dir` (written whole, then renamed) and loaded next time."""
    if not cache_dir:
        return compute()
    path = Path(cache_dir) / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + suffix)
    if path.exists():
        return load(path)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save(tmp, value)
    os.replace(tmp, path)
    return value


def _save_npy(path: Path, value: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, value)


def cached(cache_dir: str | None, key: dict, compute) -> np.ndarray:
    """Embeddings cached per (model, task, pooling) so re-running a probe does not re-encode."""
    return _cached(cache_dir, key, ".npy", compute, np.load, _save_npy)


def cached_probes(cache_dir: str | None, key: dict, X: np.ndarray, y: np.ndarray, split: np.ndarray) -> list[dict]:
    """`run_probes` on the test split, cached beside the features it read (same key, PROBES_VERSION added):
    the random init, the controls and log-mel are probed once per seed and task, not once per study run."""
    return _cached(cache_dir, {**key, "probes": PROBES_VERSION}, ".probes.json", lambda: run_probes(X, y, split),
                   lambda p: json.loads(p.read_text()), lambda p, rows: p.write_text(json.dumps(rows)))


# --- probes --------------------------------------------------------------------------------
def _linear(c: float):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))


def _knn(k: int):
    """Cosine kNN on standardised features: uncentred, one shared mean vector dominates every cosine."""
    return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance"))


def select_c(X: np.ndarray, y: np.ndarray, split: np.ndarray) -> float:
    """C by accuracy on `valid`, or by 3-fold CV inside `train` when there is no valid split."""
    tr, va = split == "train", split == "valid"
    scores = {}
    for c in C_GRID:
        if va.any():
            scores[c] = accuracy_score(y[va], _linear(c).fit(X[tr], y[tr]).predict(X[va]))
        else:
            counts = np.unique(y[tr], return_counts=True)[1]
            k = int(min(3, counts.min())) if len(counts) > 1 else 0
            if k < 2:
                return 1.0
            folds = StratifiedKFold(k, shuffle=True, random_state=0).split(X[tr], y[tr])
            Xt, yt = X[tr], y[tr]
            scores[c] = np.mean([accuracy_score(yt[b], _linear(c).fit(Xt[a], yt[a]).predict(Xt[b])) for a, b in folds])
    return max(C_GRID, key=lambda c: (scores[c], -abs(np.log10(c))))


def run_probes(X: np.ndarray, y: np.ndarray, split: np.ndarray, eval_split: str = "test") -> list[dict]:
    """Linear and kNN probes: fit on train(+valid), report accuracy / macro-F1 on `eval_split`.

    With eval_split="valid" (sweeps) the probes fit on train only and test is never touched.
    """
    fit = (split == "train") | ((split == "valid") if eval_split == "test" else False)
    ev = split == eval_split
    if not ev.any():
        raise TaskError(f"no '{eval_split}' rows to evaluate on")
    c = select_c(X[split != "test"], y[split != "test"], split[split != "test"]) if eval_split == "test" \
        else select_c(X[split == "train"], y[split == "train"], split[split == "train"])
    rows = []
    lin = _linear(c).fit(X[fit], y[fit])
    pred = lin.predict(X[ev])
    rows.append({"probe": "linear", "accuracy": float(accuracy_score(y[ev], pred)),
                 "macro_f1": float(f1_score(y[ev], pred, average="macro")), "C": c})
    k = int(min(KNN_K, fit.sum()))
    knn = _knn(k).fit(X[fit], y[fit])
    pred = knn.predict(X[ev])
    rows.append({"probe": "knn", "accuracy": float(accuracy_score(y[ev], pred)),
                 "macro_f1": float(f1_score(y[ev], pred, average="macro")), "k": k})
    return rows


def markdown_table(rows: list[dict], task: str) -> str:
    lines = ["| task | model | probe | accuracy | macro-F1 |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {task} | {r['model']} | {r['probe']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |")
    return "\n".join(lines)


class TrainingProbe:
    """The probe run inside pretraining: train/valid clips of a task loaded once, scored on valid."""

    def __init__(self, task_uri: str, sample_rate: int, kind: str = "knn", max_clips: int = 800,
                 endpoint: str | None = None, seed: int = 0):
        task = load_task(task_uri, endpoint)
        idx = [i for i, s in enumerate(task.splits) if s in ("train", "valid")]
        if not any(task.splits[i] == "valid" for i in idx):
            raise TaskError(f"task {task_uri}: the training probe scores on 'valid', and there are no valid rows")
        if len(idx) > max_clips:
            idx = sorted(np.random.default_rng(seed).choice(idx, max_clips, replace=False).tolist())
        sub = Task(task.uri, [task.paths[i] for i in idx], [task.labels[i] for i in idx],
                   [task.splits[i] for i in idx], task.manifest_sha)
        self.wavs, keep = load_audio(sub, sample_rate, endpoint)
        self.y = np.asarray(sub.labels)[keep]
        self.split = np.asarray(sub.splits)[keep]
        self.kind, self.name = kind, task.name

    def score(self, encoder) -> dict[str, float]:
        """{probe_score, probe_knn_acc, probe_linear_acc} on valid (fit on train)."""
        rows = run_probes(encoder_features(encoder, self.wavs), self.y, self.split, eval_split="valid")
        out = {f"probe_{r['probe']}_acc": r["accuracy"] for r in rows}
        out["probe_score"] = out[f"probe_{self.kind}_acc"]
        return out

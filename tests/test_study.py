"""The quality study at toy size: every run is judged against its own random init, same readout and probes."""
import json
import subprocess
import sys

import pytest

from test_evaluate import make_task

pytestmark = pytest.mark.slow
SMALL = ["model.width=32", "model.depth=1", "model.heads=2", "model.pred_width=32", "model.pred_heads=2",
         "model.pred_depth=1", "train.batch_size=4", "data.stats_files=8", "data.concurrency=1"]


def test_quality_study_pairs_each_run_with_its_random_init(clean_corpus_dir, tmp_path):
    task = make_task(tmp_path / "bands", per_split=(6, 3, 3))
    out = tmp_path / "q" / "quality.json"
    args = [sys.executable, "-m", "jobs.benchmark", "quality", "--config", "tiny", "--source", str(clean_corpus_dir),
            "--task", str(task), "--steps", "3", "--seeds", "2", "--ablate", "readout", "--ablation-seeds", "1",
            "--json", str(out)]
    for s in SMALL:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    runs = {(x["variant"], x["seed"]) for x in rows}
    assert runs == {("recipe", 0), ("recipe", 1), ("readout", 0)}  # readout: the same run read out the old way
    for variant, seed in runs:  # every run: jepa, its random init and log-mel, linear and kNN, on test
        got = {(x["model"], x["probe"]) for x in rows if (x["variant"], x["seed"]) == (variant, seed)}
        assert got == {(m, p) for m in ("jepa", "random", "logmel") for p in ("linear", "knn")}
    # the looping recipe never trains on constant padding (the toy corpus has a 0.8 s file)
    assert {x["target_silence_fraction"] for x in rows} == {0.0}
    dims = {x["variant"]: x for x in rows}
    assert dims["readout"]["seed"] == 0
    md = (tmp_path / "q" / "quality.md").read_text()
    assert "| recipe | bands | 3 | 2 |" in md and "JEPA − random" in md and "± " in md
    assert (tmp_path / "q" / "quality.png").stat().st_size > 1000

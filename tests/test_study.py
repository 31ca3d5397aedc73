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

    def study(seeds: int, *extra: str, against=None) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "jobs.benchmark", "quality", "--config", "tiny", "--source",
                str(clean_corpus_dir), "--task", str(task), "--steps", "3", "--seeds", str(seeds),
                "--ablate", "readout", "--ablation-seeds", "1", "--json", str(out)]
        for s in SMALL + list(extra):
            args += ["--set", s]
        args += ["--against", str(against)] if against else []
        return subprocess.run(args, capture_output=True, text=True, timeout=900)

    r = study(1)
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads(out.read_text())["rows"]
    base = tmp_path / "base.json"
    base.write_text(out.read_text())
    r = study(2, against=base)  # grows the finished study by a seed: seed 0 (and its readout rows) kept,
    assert r.returncode == 0, r.stderr[-3000:]  # seed 1 trained; compared with the base study, paired by seed
    assert "candidate − base" in r.stdout and "verdict: undecided: 1 shared seed(s), the rule needs 3" in r.stdout
    assert "3 steps, seed 0: kept" in r.stdout and "3 steps, seed 1: kept" not in r.stdout
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [x for x in rows if x["seed"] == 0] == first
    runs = {(x["variant"], x["seed"]) for x in rows}
    assert runs == {("recipe", 0), ("recipe", 1), ("readout", 0)}  # readout: the same run read out the old way
    for variant, seed in runs:  # every run: jepa, its random init, log-mel and the controls (EMA blend, no
        got = {(x["model"], x["probe"]) for x in rows if (x["variant"], x["seed"]) == (variant, seed)}  # network)
        models = ("jepa", "random", "logmel", "blend", "projection")
        assert got == {(m, p) for m in models for p in ("linear", "knn")}
    # the looping recipe never trains on constant padding (the toy corpus has a 0.8 s file)
    assert {x["target_silence_fraction"] for x in rows} == {0.0}
    md = (tmp_path / "q" / "quality.md").read_text()
    assert "| recipe | bands | 3 | 2 |" in md and "JEPA − random" in md and "± " in md
    assert "JEPA − blend | JEPA − projection" in md
    assert (tmp_path / "q" / "quality.png").stat().st_size > 1000
    # an interrupted study's saved runs are never mixed with runs of other settings
    out.with_suffix(".partial.json").write_text(json.dumps({"study": res["study"], "rows": rows[:1]}))
    r = study(2, "optim.lr=0.002")
    assert r.returncode != 0 and "quality.partial.json: runs of a study with other settings" in r.stderr + r.stdout


def rows_of(acc: dict[str, list[float]], erank: float = 50.0) -> list[dict]:
    return [{"task": t, "model": "jepa", "probe": "linear", "accuracy": a, "steps": 600, "seed": seed,
             "variant": "recipe", "target_erank": erank} for t, accs in acc.items() for seed, a in enumerate(accs)]


def test_the_adoption_rule_pairs_seeds_and_names_a_task_that_falls():
    from jobs.study import compare
    base = rows_of({"a": [0.50, 0.52, 0.48], "b": [0.80, 0.81, 0.79]}, erank=20)
    better = rows_of({"a": [0.56, 0.57, 0.55], "b": [0.80, 0.815, 0.785]}, erank=100)
    c = compare(base, better)
    assert c["verdict"].startswith("adopt") and c["seeds"] == [0, 1, 2] and c["erank"] == {"base": 20, "candidate": 100}
    assert abs(c["mean"][0] - (0.06 + 0.05 + 0.07) / 6) < 1e-9
    trade = rows_of({"a": [0.62, 0.63, 0.61], "b": [0.75, 0.76, 0.745]})  # the mean rises, b falls
    c = compare(base, trade)
    assert c["verdict"].startswith("keep the base") and c["lowered"] == ["b"] and "b fall(s)" in c["verdict"]
    assert compare(base, rows_of({"a": [0.6, 0.6], "b": [0.8, 0.8]}))["verdict"].startswith("undecided: 2 shared")

"""The quality study: does pretraining beat the encoder's own random init, read out and probed the same way?

For every budget (train.steps) and seed, one pretraining run; its exported encoder and the random init
of the same seed (the very weights the run started from) go through the same readout and the same
probes on each dev task's test split, beside log-mel.  Ablations switch one recipe change back at a
time.  Results: rows (JSON), a Markdown table of mean ± standard error over seeds, and a plot.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib
import numpy as np

from service.evaluate import evaluate
from service.train import run_pretraining

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the headless backend is chosen

# each recipe choice, and the overrides of the alternative it is measured against (mostly what the service did before)
ABLATIONS: dict[str, dict] = {
    "padding": {"data.short_audio": "pad", "data.trim_silence": False},
    "stats": {"features.mean": -11.8, "features.std": 9.6},
    "ema": {"ema.tau_start": 0.99, "ema.tau_end": 0.999, "ema.schedule": "linear"},  # faster, "run-sized" EMA
    "ratio": {"masking.ratio": [0.4, 0.6]},
    "readout": {"readout.frames": "mean", "readout.pooling": "mean"},  # evaluation only: no retraining
}
EVAL_ONLY = {"readout"}


def run_one(cfg, tasks: list[str], cache_dir: str, progress=print,
            readouts: dict[str, dict] | None = None) -> dict[str, list[dict]]:
    """Pretrain `cfg`, then probe its encoder and the same-seed random init; one row per task, model, probe.

    `readouts` ({variant: overrides}) also evaluates the same checkpoint read out other ways."""
    summary = run_pretraining(cfg, progress=progress)
    if summary["status"] != "succeeded":
        raise RuntimeError(f"pretraining {cfg.run_name} {summary['status']}: {summary.get('error')}")
    out = {}
    for variant, readout in {None: None, **(readouts or {})}.items():
        res = evaluate(summary["checkpoint"], tasks, cache_dir=cache_dir, log_to_mlflow=False, progress=progress,
                       controls=True,
                       readout={k.split(".", 1)[1]: v for k, v in readout.items()} if readout else None)
        out[variant] = [{"task": r["task"], "model": r["model"], "probe": r["probe"], "accuracy": r["accuracy"],
                         "steps": cfg.train.steps, "seed": cfg.seed,
                         "target_silence_fraction": summary["metrics"].get("target_silence_fraction"),
                         "target_erank": summary["metrics"].get("target_erank")} for r in res["results"]]
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def table(rows: list[dict], probe: str = "linear", variant_key: str = "variant") -> str:
    """Per task x budget (x variant): JEPA, random init, log-mel (mean ± s.e. over seeds), JEPA − random."""
    lines = ["| variant | task | steps | seeds | JEPA | random init | log-mel | JEPA − random |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r.get(variant_key, "recipe"), r["task"], r["steps"]) for r in rows if r["probe"] == probe})
    fmt = lambda m, s: f"{m:.3f} ± {s:.3f}" if s == s else f"{m:.3f}"
    for variant, task, steps in keys:
        sel = [r for r in rows if r.get(variant_key, "recipe") == variant and r["task"] == task
               and r["steps"] == steps and r["probe"] == probe]
        acc = {m: {r["seed"]: r["accuracy"] for r in sel if r["model"] == m} for m in ("jepa", "random", "logmel")}
        seeds = sorted(acc["jepa"])
        diff = mean_se([acc["jepa"][s] - acc["random"][s] for s in seeds])
        lines.append(f"| {variant} | {task} | {steps} | {len(seeds)} | {fmt(*mean_se(list(acc['jepa'].values())))} "
                     f"| {fmt(*mean_se(list(acc['random'].values())))} | {fmt(*mean_se(list(acc['logmel'].values())))} "
                     f"| {fmt(*diff)} |")
    means = {}
    for variant in sorted({r.get(variant_key, "recipe") for r in rows}):
        for steps in sorted({r["steps"] for r in rows if r.get(variant_key, "recipe") == variant}):
            sel = [r for r in rows if r.get(variant_key, "recipe") == variant and r["steps"] == steps
                   and r["probe"] == probe]
            by_seed: dict[int, list[float]] = {}
            for r in sel:
                if r["model"] in ("jepa", "random"):
                    by_seed.setdefault(r["seed"], []).append(r["accuracy"] * (1 if r["model"] == "jepa" else -1))
            n_tasks = len({r["task"] for r in sel})
            ranks = {r["seed"]: r["target_erank"] for r in sel if r.get("target_erank") is not None}
            means[(variant, steps)] = (mean_se([sum(v) / n_tasks for v in by_seed.values()]),
                                       mean_se(list(ranks.values())) if ranks else (float("nan"),) * 2)
    controls = [m for m in ("blend", "projection") if any(r["model"] == m for r in rows)]
    if controls:  # the study's controls: is the gain more than blending with the init, or than no network?
        lines += ["", "| variant | task | steps | " + " | ".join(f"JEPA − {m}" for m in controls) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in controls) + " |"]
        for variant, task, steps in keys:
            sel = [r for r in rows if r.get(variant_key, "recipe") == variant and r["task"] == task
                   and r["steps"] == steps and r["probe"] == probe]
            acc = {m: {r["seed"]: r["accuracy"] for r in sel if r["model"] == m} for m in ("jepa", *controls)}
            cells = [fmt(*mean_se([acc["jepa"][s] - acc[m][s] for s in sorted(acc[m]) if s in acc["jepa"]]))
                     if acc[m] else "–" for m in controls]
            lines.append(f"| {variant} | {task} | {steps} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| variant | steps | mean over tasks of JEPA − random | target effective rank |")
    lines.append("| --- | --- | --- | --- |")
    for (variant, steps), ((m, s), (rank, rank_se)) in means.items():
        lines.append(f"| {variant} | {steps} | {fmt(m, s)} | "
                     + (f"{rank:.0f} ± {rank_se:.0f} |" if rank_se == rank_se else f"{rank:.0f} |"))
    return "\n".join(lines)


def compare(base: list[dict], cand: list[dict], probe: str = "linear", min_seeds: int = 3) -> dict:
    """The adoption rule: the candidate's JEPA minus the base's, paired by seed (same steps, same tasks).

    Adopt when the mean over tasks rises by more than two standard errors over seeds and no task falls
    by more than two of its own, on at least `min_seeds` seeds.  Rows are a study's (the "recipe" variant)."""
    pick = lambda rows: {(r["task"], r["steps"], r["seed"]): r["accuracy"] for r in rows  # noqa: E731
                         if r.get("variant", "recipe") == "recipe" and r["model"] == "jepa" and r["probe"] == probe}
    a, b = pick(base), pick(cand)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two studies share no (task, steps, seed) run to compare")
    steps = max({s for _, s, _ in shared})
    tasks = sorted({t for t, s, _ in shared if s == steps})
    seeds = sorted(set.intersection(*({sd for t2, s, sd in shared if t2 == t and s == steps} for t in tasks)))
    diff = {t: [b[(t, steps, sd)] - a[(t, steps, sd)] for sd in seeds] for t in tasks}
    per_task = {t: mean_se(v) for t, v in diff.items()}
    mean = mean_se([float(np.mean([diff[t][i] for t in tasks])) for i in range(len(seeds))])
    erank = {name: mean_se([r["target_erank"] for r in rows if r.get("variant", "recipe") == "recipe"
                            and r["steps"] == steps and r["seed"] in seeds and r["model"] == "jepa"
                            and r["probe"] == probe and r.get("target_erank") is not None] or [float("nan")])[0]
             for name, rows in (("base", base), ("candidate", cand))}
    lowered = [t for t, (m, se) in per_task.items() if se == se and m < -2 * se]
    if len(seeds) < min_seeds:
        verdict = f"undecided: {len(seeds)} shared seed(s), the rule needs {min_seeds}"
    elif mean[0] > 2 * mean[1] and not lowered:
        verdict = "adopt: the mean rises by more than 2 s.e. and no task falls by more than 2"
    else:
        verdict = "keep the base: " + ("; ".join(filter(None, [
            "the mean does not rise by more than 2 s.e." if not mean[0] > 2 * mean[1] else "",
            f"{', '.join(lowered)} fall(s) by more than 2 s.e." if lowered else ""])))
    only = sorted({t for t, _, _ in set(a) ^ set(b)} - set(tasks))
    return {"steps": steps, "seeds": seeds, "tasks": per_task, "mean": mean, "erank": erank, "lowered": lowered,
            "verdict": verdict, "only_in_one": only}


def compare_table(c: dict) -> str:
    fmt = lambda m, s: f"{m:+.3f} ± {s:.3f}" if s == s else f"{m:+.3f}"  # noqa: E731
    lines = [f"candidate − base, JEPA linear accuracy, {c['steps']} steps, paired over seeds {c['seeds']}:", "",
             "| task | candidate − base |", "| --- | --- |"]
    lines += [f"| {t} | {fmt(*ms)} |" for t, ms in c["tasks"].items()]
    lines += [f"| **mean over tasks** | **{fmt(*c['mean'])}** |", "",
              f"target effective rank: base {c['erank']['base']:.0f}, candidate {c['erank']['candidate']:.0f}",
              f"verdict: {c['verdict']}"]
    if c["only_in_one"]:
        lines.append(f"(tasks read by one study only, not compared: {', '.join(c['only_in_one'])})")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, probe: str = "linear") -> str:
    """Accuracy against pretraining steps per task: JEPA and random init (mean ± s.e.), log-mel."""
    main = [r for r in rows if r.get("variant", "recipe") == "recipe" and r["probe"] == probe]
    tasks = sorted({r["task"] for r in main})
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4.2 * max(len(tasks), 1), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        steps = sorted({r["steps"] for r in main if r["task"] == task})
        for model, colour in (("jepa", "C0"), ("random", "C1"), ("logmel", "C2")):
            ms = [mean_se([r["accuracy"] for r in main if r["task"] == task and r["steps"] == s
                           and r["model"] == model]) for s in steps]
            m = np.array([x[0] for x in ms])
            se = np.nan_to_num(np.array([x[1] for x in ms]))
            ax.errorbar(steps, m, yerr=se, marker="o", color=colour, capsize=3, label=model)
        ax.set_title(task)
        ax.set_xlabel("pretraining steps")
        ax.set_ylabel(f"{probe} accuracy (test)")
    axes[0][0].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_study(base, tasks: list[str], budgets: list[int], seeds: int, storage: str, cache_dir: str,
              ablate: list[str] = (), ablation_steps: int = 0, ablation_seeds: int = 2, progress=print,
              on_rows=None, done: list[dict] = ()) -> list[dict]:
    """All runs of the study, in order; each row says its variant ("recipe" or the change switched back).

    `on_rows(rows)` is called after every run with all rows so far (a long study saves as it goes);
    `done` holds rows of an earlier study with the same config and tasks: its runs are kept, not rerun."""
    plan = [("recipe", {}, steps, seed) for steps in budgets for seed in range(seeds)]
    a_steps = ablation_steps or budgets[-1]
    if ablate:  # the recipe itself at the ablations' budget and seeds, unless the main grid has it
        plan += [("recipe", {}, a_steps, seed) for seed in range(ablation_seeds)
                 if ("recipe", {}, a_steps, seed) not in plan]
    for name in ablate:
        if name not in EVAL_ONLY:
            plan += [(name, ABLATIONS[name], a_steps, seed) for seed in range(ablation_seeds)]
    rows = []
    for i, (variant, overrides, steps, seed) in enumerate(plan, start=1):
        readouts = {n: ABLATIONS[n] for n in ablate if n in EVAL_ONLY} \
            if variant == "recipe" and steps == a_steps and seed < ablation_seeds else {}
        kept = [r for r in done if (r["steps"], r["seed"]) == (steps, seed) and r["variant"] in {variant, *readouts}]
        if {r["variant"] for r in kept} == {variant, *readouts}:
            progress(f"[study {i}/{len(plan)}] {variant}: {steps} steps, seed {seed}: kept from {len(kept)} saved rows")
            rows += kept
            continue
        progress(f"[study {i}/{len(plan)}] {variant}: {steps} steps, seed {seed}")
        cfg = base.with_overrides({**overrides, "train.steps": steps, "seed": seed,
                                   "checkpoint.every_steps": steps,
                                   "optim.warmup_steps": min(base.optim.warmup_steps, max(steps // 10, 1)),
                                   "run_name": f"study-{variant}-{steps}-s{seed}",
                                   "checkpoint.storage_path": os.path.join(storage, variant)})
        for v, got in run_one(cfg, tasks, cache_dir, progress, readouts).items():
            rows += [{**r, "variant": v or variant} for r in got]
        if on_rows is not None:
            on_rows(rows)
    return rows

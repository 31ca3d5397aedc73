"""A sweep's results report on its parent MLflow run: `results.csv` and probe score against mask ratio."""
from __future__ import annotations

import csv
import os
import tempfile

from service import tracking


def write_results_csv(rows: list[dict], path: str) -> str:
    """One line per trial: its swept params, status, last step and probe scores."""
    keys = sorted({k for r in rows for k in r["params"]})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_name", *keys, "status", "step", "probe_score", "best_probe_score", "mlflow_run_id"])
        for r in rows:
            w.writerow([r["run_name"], *[r["params"].get(k) for k in keys], r["status"], r["step"],
                        r["probe_score"], r["best_probe_score"], r["mlflow_run_id"]])
    return path


def plot_probe_vs_ratio(rows: list[dict], title: str, path: str) -> str:
    """Best probe score against mask ratio (range midpoint), one line per geometry, stopped trials marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_geom: dict[str, list] = {}
    for r in rows:
        ratio = r["params"].get("masking.ratio")
        if isinstance(ratio, list):
            ratio = sum(ratio) / 2
        by_geom.setdefault(str(r["params"].get("masking.geometry", "configured")), []).append(
            (ratio if ratio is not None else float("nan"), r["best_probe_score"], r["status"]))
    for g, pts in sorted(by_geom.items()):
        pts = sorted(p for p in pts if p[0] == p[0])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=g)
            for x, y, st in pts:
                if st in ("collapsed", "early_stopped", "failed"):
                    ax.annotate(st, (x, y), fontsize=7)
    ax.set_xlabel("mask ratio")
    ax.set_ylabel("probe score (valid accuracy)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def log_sweep_report(uri: str, run_id: str, rows: list[dict], sweep_name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tracking.log_artifact(uri, run_id, write_results_csv(rows, os.path.join(tmp, "results.csv")))
        tracking.log_artifact(uri, run_id, plot_probe_vs_ratio(rows, f"sweep {sweep_name}",
                                                               os.path.join(tmp, "probe_vs_mask_ratio.png")))

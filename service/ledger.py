"""The skip ledger: files, clips and skipped files counted across every pipeline task of a run.

One Ray actor per run, fed by the decode tasks (raw sources) or the shard readers (prepared corpora);
the driver and rank 0 read its totals to report progress and to stop a run whose source is too bad
(`data.max_skip_fraction`, `data.max_read_error_fraction`).
"""
from __future__ import annotations

import csv
import io

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from service.config import DataConfig


@ray.remote(num_cpus=0)
class DataLedger:
    """Counts files, clips and skips across all pipeline tasks.  Skips count distinct files (a bad file
    visited on every pass is one bad file), by reason, with example keys."""

    def __init__(self, listed: int, too_large: list[str]):
        self.listed = listed
        self.seen_keys: set[str] = set(too_large)
        self.clips = 0
        self.skipped: dict[str, int] = {"too_large": len(too_large)} if too_large else {}
        self.bad: dict[str, tuple[str, str]] = {k: ("too_large", "") for k in too_large}  # key -> (reason, detail)

    @property
    def seen(self) -> int:
        return len(self.seen_keys)

    def record(self, keys: list[str], clips: int, skipped: list[tuple[str, str, str]]) -> None:
        self.seen_keys.update(keys)
        self.clips += clips
        for reason, key, detail in skipped:
            if key not in self.bad:
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
                self.bad[key] = (reason, detail)

    def skipped_files(self) -> list[tuple[str, str, str]]:
        """Every distinct skipped file once: (key, reason, detail), sorted by key."""
        return sorted((k, r, d) for k, (r, d) in self.bad.items())

    def totals(self) -> dict:
        examples: dict[str, list[str]] = {}  # the first 5 distinct files skipped for each reason
        for key, (reason, _) in self.bad.items():
            if len(examples.setdefault(reason, [])) < 5:
                examples[reason].append(key)
        return {"files": self.listed, "files_seen": self.seen, "clips": self.clips,
                "skipped": dict(self.skipped), "examples": examples}


def new_ledger(listed: int, too_large: list[str]):
    """The run's ledger, placed on the driver's node: a lost worker node cannot take the counts with it (the
    driver's own node going down ends the run anyway).  Hard affinity: a soft one let Ray spill the actor to a
    worker node (seen on a 3-node cluster whose head has 0 CPUs), where the loss of that node ended the run."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return DataLedger.options(scheduling_strategy=here).remote(listed, too_large)


def check_skips(totals: dict, data: DataConfig, min_seen: int = 20) -> str | None:
    """A message when too much of the source is bad (or unreadable: storage, not audio), else None."""
    max_fraction, max_read_errors = data.max_skip_fraction, data.max_read_error_fraction
    seen = totals["files_seen"]
    bad = sum(totals["skipped"].values())
    unreadable = totals["skipped"].get("read_error", 0)
    if seen >= min_seen and unreadable / seen > max_read_errors:
        return (f"{unreadable} of {seen} files could not be read after retries ({unreadable / seen:.1%} > "
                f"data.max_read_error_fraction={max_read_errors}): a storage problem, not bad audio "
                f"(e.g. {', '.join(totals['examples'].get('read_error', [])[:3])})")
    if seen >= min_seen and bad / seen > max_fraction:
        reasons = ", ".join(f"{r}={n} (e.g. {totals['examples'].get(r, ['?'])[0]})"
                            for r, n in sorted(totals["skipped"].items(), key=lambda kv: -kv[1]))
        return (f"{bad} of {seen} files were skipped ({bad / seen:.0%} > data.max_skip_fraction="
                f"{max_fraction}): {reasons}")
    return None


def skip_summary(totals: dict) -> str:
    """One line for the user: skips by reason with a few example keys (the full list is an artifact)."""
    parts = [f"{r}={n} (e.g. {', '.join(totals['examples'].get(r, [])[:3])})"
             for r, n in sorted(totals["skipped"].items(), key=lambda kv: -kv[1])]
    return f"data: skipped {sum(totals['skipped'].values())} files: {'; '.join(parts)} (list: skipped.csv)"


def skip_totals(listed: int, skipped: list) -> dict:
    """Totals (as `DataLedger.totals` gives them) of a finished list of (key, reason, detail) skips, every
    listed file seen: what a job that counts its own skips (prepare, embed) checks and reports."""
    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for key, reason, _ in sorted(skipped):
        counts[reason] = counts.get(reason, 0) + 1
        if len(examples.setdefault(reason, [])) < 5:
            examples[reason].append(key)
    return {"files": listed, "files_seen": listed, "skipped": counts, "examples": examples}


def skipped_csv(skipped: list) -> bytes:
    """skipped.csv: one (key, reason, detail) row per skipped file."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "reason", "detail"])
    w.writerows(skipped)
    return buf.getvalue().encode()


def write_skipped_csv(skipped: list[tuple[str, str, str]], path: str) -> str:
    with open(path, "wb") as f:
        f.write(skipped_csv(skipped))
    return path

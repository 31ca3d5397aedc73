"""Ray Tune sweeps over pretraining settings (mask ratio, geometry, EMA tau, any dotted key).

Each trial is a full `run_pretraining` (TorchTrainer, own checkpoints, own nested MLflow run) scored
by the downstream probe on the task's valid split — not by JEPA loss, which is not comparable
across mask ratios or geometries.  Metrics reach Tune through Ray Train's TuneReportCallback so
ASHA can stop weak trials; a collapsed trial ends itself and is recorded as collapsed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from service import tracking
from service.storage import uri_for
from service.sweep_report import log_sweep_report
from service.config import Config, ConfigError, build, load_config, resolve_path

TUNING_DIR = Path(__file__).resolve().parents[1] / "tuning"


@dataclass
class SearchConfig:
    algorithm: str = "grid"          # grid | optuna (TPE)
    num_samples: int = 1             # grid: repeats of every point; optuna: number of trials
    params: dict = field(default_factory=dict)  # dotted key -> {grid: [...]} | {choice|uniform|loguniform: ...}


@dataclass
class SchedulerConfig:
    type: str = "asha"               # asha | none
    grace_period: int = 1            # probe evaluations before a trial may be stopped
    reduction_factor: int = 2


@dataclass
class SweepConfig:
    name: str = "sweep"
    base_config: str = "tiny"
    set: dict = field(default_factory=dict)      # dotted overrides for every trial
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_concurrent: int = 0           # 0 = as many as the cluster's CPUs fit
    register_alias: str = "sweep-best"


def load_sweep(path_or_name: str, overrides: list[str] | None = None) -> tuple[SweepConfig, Config]:
    p = Path(path_or_name)
    if not p.exists() and (TUNING_DIR / f"{path_or_name}.yaml").exists():
        p = TUNING_DIR / f"{path_or_name}.yaml"
    if not p.exists():
        raise ConfigError(f"sweep config not found: {path_or_name}")
    raw = yaml.safe_load(p.read_text()) or {}
    sweep = build(SweepConfig, raw)
    if sweep.search.algorithm not in ("grid", "optuna"):
        raise ConfigError(f"config key 'search.algorithm' = {sweep.search.algorithm!r}: expected grid or optuna")
    if sweep.scheduler.type not in ("asha", "none"):
        raise ConfigError(f"config key 'scheduler.type' = {sweep.scheduler.type!r}: expected asha or none")
    if not sweep.search.params:
        raise ConfigError("config key 'search.params' is empty: nothing to sweep")
    base = load_config(str(resolve_path(sweep.base_config)) if sweep.base_config.endswith((".yaml", ".yml"))
                       else sweep.base_config).with_overrides(sweep.set)
    base = load_config(base.to_dict(), overrides)  # the command line's --set last
    if not base.probe.task:
        raise ConfigError("sweeps are scored by a downstream probe: set probe.task (a labeled task with a valid split)")
    if base.probe.every_steps <= 0:
        raise ConfigError("sweeps need probe.every_steps > 0 so the early stopper sees intermediate scores")
    for key in sweep.search.params:  # every swept key must be a real config key
        base.with_overrides({key: _example(sweep.search.params[key], key)})
    return sweep, base


def _example(spec: Any, key: str) -> Any:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"search.params.{key}: expected one of {{grid|choice: [...]}}, {{uniform|loguniform: [lo, hi]}}")
    kind, v = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        return v[0]
    if kind in ("uniform", "loguniform"):
        return float(v[0])
    raise ConfigError(f"search.params.{key}: unknown distribution {kind!r}")


def param_space(sweep: SweepConfig) -> tuple[dict, Any]:
    """(Tune param_space, search_alg or None)."""
    from ray import tune
    space = {}
    for key, spec in sweep.search.params.items():
        kind, v = next(iter(spec.items()))
        if sweep.search.algorithm == "grid":
            if kind != "grid":
                raise ConfigError(f"search.params.{key}: grid search needs {{grid: [...]}}, got {kind}")
            space[key] = tune.grid_search(v)
        else:
            space[key] = {"grid": tune.choice, "choice": tune.choice, "uniform": lambda x: tune.uniform(*x),
                          "loguniform": lambda x: tune.loguniform(*x)}[kind](v)
    if sweep.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        return space, OptunaSearch(metric="probe_score", mode="max", seed=0)
    return space, None


def data_cpus(base: Config) -> int:
    """Decode tasks per trial: left unbounded, Ray Data would take every free CPU of the cluster."""
    return base.data.concurrency or 1


def trial_cpus(base: Config) -> int:
    """Logical CPUs one trial uses: its Train workers and its Ray Data decode tasks."""
    return base.train.workers * base.train.cpus_per_worker + data_cpus(base)


def trial_config(base: Config, params: dict, trial_name: str) -> Config:
    return base.with_overrides({**params, "run_name": trial_name})


def run_trial(params: dict, base: dict, sweep_name: str, parent_run_id: str | None, exclusive: bool) -> dict:
    """Tune function trainable: one full pretraining run, metrics forwarded by TuneReportCallback."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util import get_current_placement_group

    from service.train import run_pretraining
    cfg = trial_config(load_config(base), params, f"{sweep_name}-{ray.tune.get_context().get_trial_id()}")
    cfg.mlflow.registered_model = ""  # only the best trial is registered, by the sweep driver
    own = get_current_placement_group()
    try:
        before = set(_job_placement_groups()) | ({own.id.hex()} if own else set())
    except Exception as e:  # noqa: BLE001 - clean-up is a convenience, never a reason to fail the trial
        print(f"placement groups not listed, no clean-up after this trial: {e}", flush=True)
        before = None
    summary = run_pretraining(cfg, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()])
    if before is not None:
        _release_placement_groups(before, exclusive)
    m = summary.get("metrics", {})
    return {"final_step": summary.get("final_step") or 0, "status": summary["status"],
            "probe_score": m.get("probe_score", float("nan")), "collapsed": float(summary["status"] == "collapsed"),
            "checkpoint": summary.get("checkpoint"), "mlflow_run_id": summary.get("mlflow_run_id"),
            "done": True}


def _job_placement_groups() -> list[str]:
    """Live placement groups created by this Ray job (this sweep), never another job's."""
    import ray
    from ray.util.state import list_placement_groups
    ctx = ray.get_runtime_context()
    # this cluster's address, never "auto": with two Rays on one machine auto-detection refuses to choose
    return [pg.placement_group_id for pg in list_placement_groups(
        address=ctx.gcs_address, filters=[("creator_job_id", "=", ctx.get_job_id())], detail=True, limit=10_000,
        raise_on_missing_output=False) if pg.state == "CREATED"]


def _release_placement_groups(before: set[str], exclusive: bool, wait_s: float = 20.0) -> None:
    """Make sure the finished Train run's placement group is gone before the trial ends.

    When the trial actor exits right after `fit()`, Ray Train's own clean-up can lose the race and
    leave the worker group's CPUs reserved, which starves every later trial on a small machine.
    We wait for it; when trials run one at a time (`exclusive`), any placement group this job
    created since the trial started is this trial's and is removed (other jobs' are never touched).
    """
    import time

    import ray
    from ray.util import remove_placement_group
    from ray.util.placement_group import PlacementGroup

    def left() -> list[str]:
        return [k for k in _job_placement_groups() if k not in before]

    try:
        deadline = time.time() + wait_s
        while left() and time.time() < deadline:
            time.sleep(0.5)
        if exclusive:
            for pg_id in left():
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
    except Exception as e:  # never fail a finished trial over clean-up
        print(f"placement-group clean-up after the trial failed: {e}", flush=True)


def run_sweep(sweep: SweepConfig, base: Config, progress=print) -> dict:
    import ray
    from ray import tune

    uri = tracking.tracking_uri(base)
    parent = None
    if uri:
        key_cfg = base.with_overrides({"run_name": f"sweep-{sweep.name}"})
        parent = tracking.start_or_resume(key_cfg, extra_tags={"audio_jepa.sweep": sweep.name})
    storage, storage_fs = _tune_storage(base)
    space, search_alg = param_space(sweep)
    base = base.with_overrides({"data.concurrency": data_cpus(base)})  # trials share the cluster
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrent = sweep.max_concurrent or max(1, cpus // trial_cpus(base))
    scheduler = None
    if sweep.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler
        scheduler = ASHAScheduler(time_attr="step", max_t=base.train.steps,
                                  grace_period=max(1, sweep.scheduler.grace_period * max(base.probe.every_steps, 1)),
                                  reduction_factor=sweep.scheduler.reduction_factor)
    trainable = tune.with_resources(  # the trial driver only waits on Train
        tune.with_parameters(run_trial, base=base.to_dict(), sweep_name=sweep.name, parent_run_id=parent,
                             exclusive=concurrent == 1),
        {"CPU": 0.01})
    path = f"{storage.rstrip('/')}/{sweep.name}"
    run_config = tune.RunConfig(name=sweep.name, storage_path=storage, storage_filesystem=storage_fs,
                                failure_config=tune.FailureConfig(max_failures=0),
                                callbacks=[CloseStoppedTrialRuns(base, sweep.name)])
    if tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
        progress(f"resuming sweep {sweep.name} from {path} (finished trials are not re-run)")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=space, storage_filesystem=storage_fs)
    else:
        progress(f"sweep {sweep.name}: {sweep.search.algorithm} search, up to {concurrent} trial(s) at a time")
        tuner = tune.Tuner(trainable, param_space=space, run_config=run_config,
                           tune_config=tune.TuneConfig(metric="probe_score", mode="max", scheduler=scheduler,
                                                       search_alg=search_alg, num_samples=sweep.search.num_samples,
                                                       max_concurrent_trials=concurrent))
    results = tuner.fit()
    rows = trial_rows(results, sweep, base)
    summary = {"status": "succeeded", "sweep": sweep.name, "mlflow_run_id": parent, "trials": rows,
               "storage": uri_for(path, base.checkpoint.storage_path)}
    best = max((r for r in rows if r["status"] in ("finished", "early_stopped") and not math.isnan(r["probe_score"])),
               key=lambda r: r["probe_score"], default=None)
    summary["best"] = best
    if uri and parent:
        log_sweep_report(uri, parent, rows, sweep.name)
        for r in rows:
            if r["status"] in ("finished", "early_stopped", "collapsed") and r["mlflow_run_id"]:
                tracking.client(uri).set_tag(r["mlflow_run_id"], "audio_jepa.trial_status", r["status"])
        if best and best["checkpoint"] and base.mlflow.registered_model:
            from service.registry import register_run
            best_cfg = trial_config(base, best["params"], best["run_name"])
            summary["registered_model"] = register_run(best_cfg, best["mlflow_run_id"], best["checkpoint"],
                                                       alias=sweep.register_alias)
        tracking.finish(uri, parent)
    return summary


def _tune_storage(base: Config):
    """(path, filesystem) of the sweep's Tune state: beside the checkpoints, on the same S3 endpoint."""
    from service.storage import join, ray_storage
    return ray_storage(join(base.checkpoint.storage_path, "sweeps"), base.storage.s3_endpoint, base.storage.s3_region)


def trial_status(last_result: dict, errored: bool, steps: int) -> str:
    step = int(last_result.get("final_step") or last_result.get("step") or 0)
    if errored or last_result.get("status") == "failed":  # raised, or run_pretraining reported failure
        return "failed"
    if last_result.get("collapsed"):
        return "collapsed"
    return "early_stopped" if step < steps else "finished"


class CloseStoppedTrialRuns(Callback):
    """Closes the MLflow run of a trial that Tune stopped (ASHA, or its `max_t` at the last step).

    A stopped trial's process is killed mid-run, before `run_pretraining` can tag, log artifacts and
    terminate its run, which would otherwise show as RUNNING for ever.
    """

    def __init__(self, base: Config, sweep_name: str):
        self.base, self.sweep_name = base, sweep_name

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, errored=True)

    def _close(self, trial, errored: bool) -> None:
        from service.checkpoint import latest_checkpoint
        result = trial.last_result or {}
        if "final_step" in result or not tracking.tracking_uri(self.base):
            return  # the trial returned: run_pretraining closed its run
        try:
            cfg = trial_config(self.base, trial.config, f"{self.sweep_name}-{trial.trial_id}")
            run_id = tracking.find_run(cfg)
            if run_id and tracking.client(tracking.tracking_uri(cfg)).get_run(run_id).info.status == "RUNNING":
                status = trial_status(result, errored, cfg.train.steps)
                # in run_pretraining's words: a trial stopped at its last step did succeed
                tracking.close_run(cfg, run_id, "succeeded" if status == "finished" else status,
                                   checkpoint=latest_checkpoint(cfg))
        except Exception as e:  # never fail the sweep over bookkeeping
            print(f"could not close the MLflow run of trial {trial.trial_id}: {e}", flush=True)


def trial_rows(results, sweep: SweepConfig, base: Config) -> list[dict]:
    from service.checkpoint import latest_checkpoint
    uri = tracking.tracking_uri(base)
    rows = []
    for r in results:
        params = dict(r.config or {})
        m = r.metrics or {}
        cfg = trial_config(base, params, f"{sweep.name}-{m.get('trial_id', '')}")
        step = int(m.get("final_step") or m.get("step") or 0)
        status = trial_status(m, r.error is not None, base.train.steps)
        hist = r.metrics_dataframe
        best = float(hist["probe_score"].max()) if hist is not None and "probe_score" in hist else float("nan")
        run_id = m.get("mlflow_run_id") or (tracking.find_run(cfg) if uri else None)
        rows.append({"run_name": cfg.run_name, "params": params, "status": status, "step": step,
                     "probe_score": float(m.get("probe_score", float("nan"))), "best_probe_score": best,
                     "mlflow_run_id": run_id, "checkpoint": m.get("checkpoint") or latest_checkpoint(cfg),
                     "error": str(r.error)[:300] if r.error else None})
    return rows

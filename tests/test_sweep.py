"""Ray Tune sweep: a grid of full pretraining trials scored by a probe, interrupted and resumed, with its
state and checkpoints on S3, nested MLflow runs, table + plot artifacts, a registered sweep-best, and
collapsed trials reported as collapsed (not as failures)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.procs import kill_tree
from test_evaluate import make_task

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_grid_sweep_interrupted_resumed_nested_runs_and_best(clean_corpus_dir, tmp_path, mlflow_server, s3_server):
    import boto3
    from mlflow import MlflowClient
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="sweeps")
    task = make_task(tmp_path / "task", per_split=(6, 4, 2))
    sweep = {
        "name": "grid2x2", "base_config": "tiny",
        "set": {"model.width": 64, "model.depth": 2, "model.heads": 2, "model.pred_width": 32,
                "model.pred_depth": 1, "model.pred_heads": 2, "train.batch_size": 8, "train.steps": 20,
                "train.log_every": 10, "checkpoint.every_steps": 10, "probe.every_steps": 10,
                "storage.s3_endpoint": s3_server,
                "optim.warmup_steps": 5, "mlflow.experiment": "sweep-tests", "mlflow.registered_model": "jepa-sweep"},
        "search": {"algorithm": "grid", "params": {"train.min_erank": {"grid": [0.0, 1000.0]}}},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    }
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(sweep))
    storage = "s3://sweeps/runs"
    # probe.task relative to the caller's directory: trials run elsewhere and must still find it
    cmd = [sys.executable, "-m", "jobs.sweep", "--config", str(cfg_path), "--set", f"data.source={clean_corpus_dir}",
           "--set", f"probe.task={os.path.relpath(task, ROOT)}", "--set", f"checkpoint.storage_path={storage}",
           "--set", f"mlflow.tracking_uri={mlflow_server}", "--summary-json", str(tmp_path / "summary.json")]
    # the endpoint only in the config: Tune's state must not go to AWS (pyarrow ignores AWS_ENDPOINT_URL)
    env = {**{k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI")},
           "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_ADDRESS": ""}
    c = MlflowClient(mlflow_server)

    def finished_trials():
        exp = c.get_experiment_by_name("sweep-tests")
        if exp is None:
            return []
        return [r for r in c.search_runs([exp.experiment_id], filter_string="tags.`mlflow.parentRunId` != ''")
                if r.info.status != "RUNNING"]

    # first attempt: interrupted (killed) once a trial has finished
    first = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=open(tmp_path / "first.log", "w"),
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 420
        while time.time() < deadline and len(finished_trials()) < 1 and first.poll() is None:
            time.sleep(1)
        assert first.poll() is None, "the sweep finished before it could be interrupted"
        assert len(finished_trials()) >= 1, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(4)  # let Tune persist the experiment state
        done_before = {r.data.tags["mlflow.runName"] for r in finished_trials()}
    finally:  # the sweep and the private Ray it started (its session), by process id
        kill_tree(first.pid)
        first.wait()

    # second attempt: resumes, runs only the rest
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming sweep" in out.stdout + out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["storage"] == "s3://sweeps/runs/sweeps/grid2x2"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="sweeps", Prefix="runs/")["Contents"]]
    assert any(k.startswith("runs/sweeps/grid2x2/") and (k.endswith(".pkl") or "experiment_state" in k)
               for k in keys), keys
    statuses = sorted(t["status"] for t in summary["trials"])
    assert len(statuses) == 2
    assert statuses.count("collapsed") == 1, statuses            # min_erank=1000: collapse at the first check
    assert set(statuses) <= {"collapsed", "finished", "early_stopped"}, statuses
    for t in summary["trials"]:
        assert (t["status"] == "collapsed") == (t["params"]["train.min_erank"] == 1000.0)
    # finished trials were not run again: no resume records in their run directories
    for name in done_before:
        assert not any(k.startswith(f"runs/{name}/resumes/") for k in keys), f"{name} was re-run after the interruption"
    # MLflow: one parent, exactly 4 nested trial runs, table + plot, registered best
    exp = c.get_experiment_by_name("sweep-tests")
    parent = summary["mlflow_run_id"]
    nested = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(nested) == 2, [r.data.tags.get("mlflow.runName") for r in nested]
    # every trial's run is closed however it ended (a stopped trial's process is killed mid-run)
    trial_status = {t["run_name"]: t["status"] for t in summary["trials"]}
    for r in nested:
        name = r.data.tags["mlflow.runName"]
        assert r.info.status == "FINISHED", (name, r.info.status)
        assert r.data.tags.get("audio_jepa.trial_status") == trial_status[name]
        assert r.data.tags.get("audio_jepa.status") in ("succeeded", "collapsed", "early_stopped"), r.data.tags
        assert "config.yaml" in {a.path for a in c.list_artifacts(r.info.run_id)}
    # each trial's decode tasks are bounded (else one trial's Ray Data takes every CPU of the cluster)
    assert {r.data.params["data.concurrency"] for r in nested} == {"1"}
    arts = {a.path for a in c.list_artifacts(parent)}
    assert {"results.csv", "probe_vs_mask_ratio.png"} <= arts
    best = summary["best"]
    assert best["status"] in ("finished", "early_stopped") and best["params"]["train.min_erank"] == 0.0
    mv = c.get_model_version_by_alias("jepa-sweep", "sweep-best")
    assert mv.run_id == best["mlflow_run_id"]


def test_trial_status_classification():
    from types import SimpleNamespace

    from service.config import load_config
    from service.sweep import SweepConfig, trial_rows
    base = load_config("tiny", ["train.steps=100", "mlflow.tracking_uri=", "checkpoint.storage_path=/nonexistent"])
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    def result(step, collapsed=0.0, error=None, **returned):
        return SimpleNamespace(config={"masking.ratio": 0.5}, error=error, metrics_dataframe=None,
                               metrics={"step": step, "collapsed": collapsed, "probe_score": 0.5, "trial_id": "t",
                                        **returned})
    rows = trial_rows([result(100), result(40), result(30, collapsed=1.0), result(10, error=RuntimeError("x")),
                       result(100, final_step=100, status="failed")], SweepConfig(), base)
    assert [r["status"] for r in rows] == ["finished", "early_stopped", "collapsed", "failed", "failed"]


@pytest.mark.usefixtures("ray_local")
def test_placement_group_clean_up_touches_only_its_own_job():
    """Another job's placement group, created while our trial ran, survives our clean-up; ours does not."""
    import ray
    from ray.util import placement_group, placement_group_table

    from service.sweep import _job_placement_groups, _release_placement_groups
    before = set(_job_placement_groups())
    code = ("import ray, sys, time\nfrom ray.util import placement_group\n"
            f"ray.init(address={ray.get_runtime_context().gcs_address!r}, log_to_driver=False)\n"
            "pg = placement_group([{'CPU': 0.01}]); ray.get(pg.ready())\n"
            "print(pg.id.hex(), flush=True); time.sleep(600)\n")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        other_id = other.stdout.readline().strip()
        assert other_id, "the other job did not create its placement group"
        ours = placement_group([{"CPU": 0.01}])
        ray.get(ours.ready())
        _release_placement_groups(before, exclusive=True, wait_s=0)
        table = placement_group_table()
        assert table[ours.id.hex()]["state"] == "REMOVED"
        assert table[other_id]["state"] == "CREATED"
    finally:
        kill_tree(other.pid)
        other.wait()

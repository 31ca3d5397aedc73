"""Several Ray nodes on this machine, one lost mid-run: local paths are refused naming their key, and a run
whose worker node is killed after a checkpoint finishes as the uninterrupted run of the same config does (same
data digest, same losses at the final steps, bit-identical final weights), with one MLflow run and one resume
record.  The cluster lives in a subprocess (tests/node_loss.py): its own Ray, never this process's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import upload_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def node_loss(s3_server, mlflow_server, clean_corpus_dir, tmp_path_factory):
    raw = upload_dir(s3_server, clean_corpus_dir, "nodes", "raw")
    out = tmp_path_factory.mktemp("nodes") / "result.json"
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "node_loss.py"), raw, str(out)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert out.exists(), f"exit {r.returncode}: " + r.stdout[-3000:] + r.stderr[-5000:]
    result = json.loads(out.read_text())
    assert "error" not in result, result["error"] + r.stderr[-3000:]
    return result


def test_local_paths_are_refused_on_a_cluster_of_several_nodes_naming_the_key(node_loss):
    assert node_loss["nodes"] == 3
    for key, said in node_loss["refusals"].items():
        assert said.startswith(f"{key}=") and "3 nodes" in said and "object storage" in said, (key, said)


def test_a_lost_worker_node_resumes_to_the_uninterrupted_runs_result(node_loss, mlflow_server, s3_server):
    import boto3
    from mlflow import MlflowClient
    steady, lost = node_loss["steady"], node_loss["lost"]
    assert steady["status"] == "succeeded" and lost["status"] == "succeeded", (steady["error"], lost["error"])
    killed = node_loss["killer"]
    assert "killed" in killed and killed["killed"]["worker_nodes_before"] == 2, killed  # a DDP worker per node
    assert node_loss["nodes_after"] == 3  # the replacement joined, the lost node is gone
    # one resume record, at the checkpoint that was on S3 when the node died
    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="nodes", Prefix="runs/lost/resumes/").get("Contents", [])]
    assert len(keys) == 1, keys
    resume = json.loads(s3.get_object(Bucket="nodes", Key=keys[0])["Body"].read())
    assert resume["step"] in (4, 8)
    # the same data, the same losses at the final steps, the same final weights as the uninterrupted run
    assert lost["final_step"] == steady["final_step"] == 12
    assert lost["metrics"]["data_digest"] == steady["metrics"]["data_digest"]
    assert lost["metrics"]["data_position"] == steady["metrics"]["data_position"]
    assert node_loss["lost_weights"] == node_loss["steady_weights"]
    c = MlflowClient(mlflow_server)
    runs = c.search_runs([c.get_experiment_by_name("nodes").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["lost", "steady"]  # one MLflow run each, the lost one too

    def final_losses(run_id):
        history = {m.step: m.value for m in c.get_metric_history(run_id, "loss")}  # a step logged twice: its last
        return [history[s] for s in range(resume["step"] + 1, 13)]
    assert final_losses(lost["mlflow_run_id"]) == final_losses(steady["mlflow_run_id"])

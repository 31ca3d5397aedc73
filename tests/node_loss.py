"""A Ray cluster of several nodes on this machine, one of them lost mid-run (run by tests/test_nodes.py).

    python tests/node_loss.py RAW_URI OUT_JSON      (AWS_ENDPOINT_URL, AWS keys and MLFLOW_TRACKING_URI set)

A head that runs no training (0 CPUs) and two worker nodes, each its own raylet with its own ports
(`ray.cluster_utils.Cluster`), sized so that the two DDP workers land on different nodes.  Everything the
workers read or write is on S3: the raw audio, the prepared corpus, the checkpoints.  In order:
1. local paths are refused before any work, each naming its key;
2. the raw audio is prepared into a corpus on S3 by the cluster;
3. an uninterrupted run ("steady");
4. the same config under another name ("lost"): once its first checkpoint is on S3, the node of one
   worker is killed (its raylet and every process on it, not the Python worker alone) and a replacement
   node joins; the run must finish from that checkpoint.
What the test compares is written to OUT_JSON.  Every process is the Cluster's own, stopped by PID.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cluster.procs import RAY_LOOPBACK_ENV  # noqa: E402

WORKER_NODE = {"num_cpus": 3, "object_store_memory": 200 * 2**20}  # one DDP worker (2 CPUs) + a data task
TRAIN = ["model.width=64", "model.depth=2", "model.heads=2", "model.pred_width=32", "model.pred_depth=1",
         "model.pred_heads=2", "train.batch_size=8", "optim.warmup_steps=5", "train.workers=2",
         "train.cpus_per_worker=2", "train.threads_per_worker=1", "train.steps=12", "train.log_every=1",
         "checkpoint.every_steps=4", "checkpoint.keep=10", "failure.max_failures=2", "data.shuffle_blocks=2",
         "mlflow.experiment=nodes"]


def kill_a_worker_node_after_the_first_checkpoint(cluster, run_dir: str, said: dict) -> None:
    """Wait for the run's first complete checkpoint on S3, then kill the node of a training worker and add
    a replacement node."""
    import ray
    from service import checkpoint as ckpt
    from service.storage import resolve
    fs, path = resolve(run_dir)
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [i.path for i in fs.get_file_info([f"{path}/checkpoint_{s:08d}/{ckpt.MARKER}" for s in (4, 8)])
                if i.is_file]
        if done:
            break
        time.sleep(0.1)
    else:
        said["killer"] = "no checkpoint within 300 s"
        return
    hosts = [node for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"
             for node in pg["bundles_to_node_id"].values()]  # the worker group's one placement group
    nodes = {n.address_info["raylet_socket_name"]: n for n in cluster.worker_nodes}
    by_id = {n["NodeID"]: n["RayletSocketName"] for n in ray.nodes() if n["Alive"]}
    victim = nodes[by_id[hosts[0]]]
    said["killed"] = {"after": done, "node_id": hosts[0], "worker_nodes_before": len(set(hosts)), "at": time.time()}
    cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: its raylet, object store, agents, workers
    cluster.add_node(**WORKER_NODE)
    said["replacement_at"] = time.time()


def weights_digest(state: dict) -> dict[str, str]:
    """sha256 of every tensor's bytes, by part (weights, EMA target, optimiser): equal only when bit-identical."""
    import hashlib

    import torch
    out = {}
    for part in ("encoder", "predictor", "target_encoder", "optimizer"):
        h = hashlib.sha256()
        flat = state[part]["state"] if part == "optimizer" else state[part]
        for k in sorted(flat, key=str):
            values = flat[k].values() if isinstance(flat[k], dict) else [flat[k]]
            for v in values:
                if torch.is_tensor(v):
                    h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out[part] = h.hexdigest()
    return out


def refusals() -> dict[str, str]:
    """What each local path (with everything else on S3) is refused with, by key."""
    from service.config import ConfigError, load_config
    from service.train import run_pretraining
    s3 = {"data.source": "s3://nodes/corpus", "probe.task": "", "checkpoint.storage_path": "s3://nodes/runs"}
    local = {"data.source": str(ROOT), "probe.task": str(ROOT), "checkpoint.storage_path": str(ROOT / "var" / "runs")}
    out = {}
    for key, path in local.items():
        sets = {**s3, key: path, "run_name": "refused"}
        try:
            run_pretraining(load_config("tiny", TRAIN + [f"{k}={v}" for k, v in sets.items()]))
            out[key] = "accepted"
        except ConfigError as e:
            out[key] = str(e)
    return out


def main(raw: str, out_json: str) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from service import checkpoint as ckpt
    from service.config import load_config
    from service.prepare import PrepareOptions, prepare
    from service.train import run_pretraining
    result: dict = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                           "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(**WORKER_NODE)
        ray.init(address=cluster.address, log_to_driver=False)
        result["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        result["refusals"] = refusals()
        corpus = "s3://nodes/corpus"
        prepare(load_config("tiny", [f"data.source={raw}"]), corpus,
                PrepareOptions(segment_seconds=1.0, row_group=2, task_files=2))
        base = TRAIN + [f"data.source={corpus}", "checkpoint.storage_path=s3://nodes/runs"]
        t0 = time.time()
        result["steady"] = run_pretraining(load_config("tiny", base + ["run_name=steady"]))
        result["steady_s"] = time.time() - t0
        said: dict = {}
        lost = load_config("tiny", base + ["run_name=lost"])
        t0 = time.time()
        # the run in a thread, the node killed and replaced from the main thread (Ray starts nodes only there)
        training = threading.Thread(target=lambda: result.update(lost=run_pretraining(lost)), daemon=True)
        training.start()
        kill_a_worker_node_after_the_first_checkpoint(cluster, lost.run_dir, said)
        training.join(timeout=600)
        result["lost_s"] = time.time() - t0
        result["killer"] = said
        result["nodes_after"] = len([n for n in ray.nodes() if n["Alive"]])
        for name in ("steady", "lost"):
            result[f"{name}_weights"] = weights_digest(ckpt.load_uri(result[name]["checkpoint"]))
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        Path(out_json).write_text(json.dumps(result, default=str))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    os.environ.update(RAY_LOOPBACK_ENV)  # before `import ray`: every node listens on 127.0.0.1
    main(sys.argv[1], sys.argv[2])

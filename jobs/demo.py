"""The end-to-end demo behind `make demo`, on one machine:

  1. starts the local cluster (Ray head with token auth, MLflow, S3) on 127.0.0.1,
  2. builds the real-audio demo corpus and uploads it to the local S3 (s3://demo/corpus),
  3. prepares the pretraining audio once into Parquet shards (jobs.prepare via `ray job submit`;
     a finished corpus is reused), then submits pretraining from the shards (tiny config,
     checkpoints to s3://demo/runs, the model registered in MLflow as audio-jepa@current),
  4. submits evaluation of the registered model on the dev tasks, beside the baselines,
  5. prints the results table and where to look.  The cluster stays up: `cluster/local down`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "s3://demo"
DEV_TASKS = ("instrument_family", "spoken_digit", "spoken_language", "spoken_digit_noisy", "spoken_language_noisy",
             "instrument_family_noisy")  # built by jobs.make_demo_corpus (the last one last)


def step(msg: str) -> None:
    print(f"\n=== {time.strftime('%H:%M:%S')} {msg}", flush=True)


def submit(env: dict, entrypoint: list[str], name: str) -> None:
    """`ray job submit` (token from the env file), streaming the job's output; fails if the job fails."""
    sub_id = f"{name}-{int(time.time())}"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", env["RAY_ADDRESS"],
           "--submission-id", sub_id, "--", *entrypoint]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    r = subprocess.run(cmd, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"job {sub_id} failed (exit {r.returncode}); logs: ray job logs {sub_id}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=int(os.environ.get("DEMO_STEPS", 600)),
                   help="pretraining steps (default 600: ~17 min on 2 cores at ~19 clips/s)")
    p.add_argument("--model-name", default="audio-jepa")
    args = p.parse_args(argv)
    t0 = time.time()
    from cluster.local import read_env, up
    step("1/5 local cluster (Ray head + MLflow + S3 on 127.0.0.1)")
    up()
    env = {**os.environ, **read_env(), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    os.environ.update(read_env())
    out = ROOT / "var" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("pretrain.json", "evaluate.json", "results.md"):
        (out / stale).unlink(missing_ok=True)

    step("2/5 real-audio demo corpus -> s3://demo/corpus")
    from jobs.make_demo_corpus import main as make_corpus
    make_corpus(["--out", f"{BUCKET}/corpus", "--cache", str(ROOT / "var" / "demo-cache")])

    from jobs.make_demo_corpus import CORPUS_VERSION
    shards = f"{BUCKET}/shards/pretrain-v{CORPUS_VERSION}"
    step(f"3/5 prepare the pretraining audio once ({shards}), then pretrain from it ({args.steps} steps)")
    submit(env, ["python", "-m", "jobs.prepare", "--config", "tiny", "--source", f"{BUCKET}/corpus/pretrain",
                 "--out", shards], "demo-prepare")
    tasks = [f"{BUCKET}/corpus/tasks/{t}" for t in DEV_TASKS]
    submit(env, ["python", "-m", "jobs.pretrain", "--config", "tiny",
                 "--set", f"data.source={shards}", "--set", f"train.steps={args.steps}", "--set", f"train.threads_per_worker={os.cpu_count() or 1}",
                 "--set", f"checkpoint.storage_path={BUCKET}/runs", "--set", f"run_name=demo-tiny-{args.steps}",
                 "--set", f"mlflow.registered_model={args.model_name}", "--set", "mlflow.experiment=audio-jepa-demo",
                 "--set", f"probe.task={tasks[0]}", "--set", f"probe.every_steps={max(args.steps // 4, 1)}",
                 "--summary-json", str(out / "pretrain.json")], "demo-pretrain")
    if not (out / "pretrain.json").exists():
        raise SystemExit("the pretraining job ended without a summary (stopped?): see `ray job logs` above")
    pre = json.loads((out / "pretrain.json").read_text())
    reg = pre.get("registered_model") or {}

    step("4/5 evaluation: JEPA vs random-init vs log-mel, linear + kNN")
    submit(env, ["python", "-m", "jobs.evaluate", "--model-uri", f"models:/{args.model_name}@current",
                 *[a for t in tasks for a in ("--task", t)], "--markdown", str(out / "results.md"),
                 "--summary-json", str(out / "evaluate.json")], "demo-evaluate")

    step("5/5 results")
    print((out / "results.md").read_text())
    print(f"model: models:/{reg.get('name', args.model_name)}@current (version {reg.get('version')}), "
          f"final step {pre.get('final_step')}, checkpoint {pre.get('checkpoint')}")
    print(f"Ray dashboard: {env['RAY_ADDRESS']}    MLflow UI: {env['MLFLOW_TRACKING_URI']}")
    print(f"results: {out / 'results.md'}    stop everything: cluster/local down")
    print(f"demo finished in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

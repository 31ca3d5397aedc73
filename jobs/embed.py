"""Embed a corpus with a model: `python -m jobs.embed --model-uri URI --source SRC --out OUT [--frames] [--set …]`.

    URI   models:/NAME@ALIAS, models:/NAME/VERSION, runs:/…, a checkpoint dir (local or s3://) or an encoder.pt
    SRC   raw audio (s3://bucket/prefix, a directory or a manifest .csv/.parquet) or a corpus prepared by
          jobs.prepare: the same listing and skip rules as training
    OUT   a directory or s3:// prefix: Parquet shards (key, duration, embedding; with --frames also frame_ms
          and frames), skipped.csv, and embeddings.json (model version, weights digest, readout, files, skips
          by reason, seconds of audio, throughput), written last

Each file is embedded whole, any length, by the model's own readout (AudioEncoder.embed / embed_frames); the
model is loaded once per Ray actor, one actor per CPU (or per GPU, bf16).  Re-running the same command after a
kill finishes the job: finished shards are verified and kept, no file is embedded twice.  A model URI that
cannot be read, a source without audio or an OUT that holds another model's embeddings stop the job before
any work, naming the culprit (exit 1).  `--set` takes data.* and storage.* keys (skip limits, manifest
rules, S3 endpoint); the model's own settings come with the model.  Runs the same under `ray job submit`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from jobs.common import die, init_ray, setup_logging

# a SIGTERM shuts Ray down while the driver iterates the dataset: its clean-up must not start a new local Ray
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
ALLOWED_SETS = ("data.", "storage.")


def job_config(source: str, overrides: list[str]):
    """The job's data and storage settings: the shipped defaults (tiny), `--set data.*|storage.*`, the source."""
    from service.config import ConfigError, load_config
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if not key.startswith(ALLOWED_SETS) or key == "data.source":
            raise ConfigError(f"--set {key}: jobs.embed takes data.* and storage.* keys (the source is --source; "
                              "the model's settings come with the model)")
    return load_config("tiny", [*overrides, f"data.source={source}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint dir, "
                   "encoder.pt")
    p.add_argument("--source", required=True, help="raw audio (s3://, dir, manifest) or a prepared corpus")
    p.add_argument("--out", required=True, help="output directory or s3:// prefix")
    p.add_argument("--frames", action="store_true", help="also write frame embeddings and their centre times (ms)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="data.*/storage.* override, e.g. --set data.max_skip_fraction=0.9 (repeatable)")
    p.add_argument("--files-per-part", type=int, default=1000, help="files per output shard at most (default 1000)")
    p.add_argument("--part-mb", type=float, default=256.0, help="source MB per output shard at most (default 256)")
    p.add_argument("--actors", type=int, default=0, help="actors (default 0: one per CPU, or one per GPU)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on GPUs, fp32 on CPUs")
    p.add_argument("--batch-chunks", type=int, default=0, help="model clips per forward pass (default 0: 16 on a "
                   "CPU, 256 on a GPU)")
    p.add_argument("--summary-json", type=Path, help="also write the summary (embeddings.json) here")
    args = p.parse_args(argv)
    setup_logging()
    from service.config import ConfigError
    from service.embed import EmbedError, EmbedOptions, prepare_job, run_job

    def fail(msg: str) -> None:
        if args.summary_json:
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps({"status": "failed", "error": msg}, indent=2))
        die(msg, 1)

    try:
        cfg = job_config(args.source, args.overrides)
    except ConfigError as e:
        die(str(e))
    opts = EmbedOptions(frames=args.frames, files_per_part=args.files_per_part, part_mb=args.part_mb,
                        actors=args.actors, precision=args.precision, batch_chunks=args.batch_chunks)
    try:
        job = prepare_job(args.model_uri, cfg, args.out, opts)  # model, source, output: before any work
        init_ray(min_cpus=os.cpu_count() or 1)
        summary = run_job(job)
    except EmbedError as e:
        fail(str(e))
    except Exception as e:  # a part failed (storage, a damaged corpus block): the finished shards are kept
        if args.summary_json:
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps({"status": "failed", "error": f"{type(e).__name__}: {e}"}))
        print(f"error: the job stopped ({type(e).__name__}); the shards it finished are kept: re-run the same "
              "command to finish it", file=sys.stderr, flush=True)
        raise
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2))
    print("summary: " + json.dumps({k: summary.get(k) for k in ("status", "out", "resolved_model_uri", "embedded",
                                                                  "files", "skipped", "hours")}), flush=True)
    return 0


# --- jobs.benchmark embed ------------------------------------------------------------------------
def _naive_loop(uri: str, files, storage, seconds: float) -> dict:
    """The baseline: one process, one thread, file by file: read, decode, `load_encoder(uri).embed`; for
    `seconds` (or until the files end).  Returns the files it visited and its rates."""
    import torch

    from service.audio import Skip, decode
    from service.encoder import load_encoder
    from service.storage import read_bytes
    torch.set_num_threads(1)
    enc = load_encoder(uri, "cpu")
    visited, embedded, audio = [], 0, 0.0
    t0 = time.perf_counter()
    for f in files:
        visited.append(f)
        try:
            wav = decode(read_bytes(f.uri, storage.s3_endpoint, storage.s3_region), enc.sample_rate)
        except Skip:
            continue
        enc.embed(torch.from_numpy(wav)[None])
        embedded, audio = embedded + 1, audio + len(wav) / enc.sample_rate
        if time.perf_counter() - t0 > seconds:
            break
    wall = time.perf_counter() - t0
    return {"visited": visited, "files": embedded, "audio_s": audio, "wall_s": wall,
            "clips_per_s": embedded / wall, "audio_hours_per_hour": audio / wall}


def bench_embed(args) -> None:
    """`python -m jobs.benchmark embed [--model-uri URI] [--source SRC] [--seconds S] [--json PATH]`: clips (files)
    per second per CPU of the embed job against a naive single-process loop over the same files, in one run,
    and hours of audio per hour per CPU.  Default data: the demo corpus; default model: --model-uri, else a
    random-init model of --config (throughput does not depend on the weights)."""
    import numpy as np
    import ray
    import torch

    from jobs.benchmark import _demo_source, emit
    from service.config import load_config
    from service.data import list_source, measure_stats
    from service.embed import EmbedOptions, run_embed
    from service.encoder import random_encoder

    source = args.source or _demo_source()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        uri = getattr(args, "model_uri", None)
        model_desc = uri
        if not uri:
            cfg = load_config(args.config, args.overrides + [f"data.source={source}"])
            if cfg.features.mean is None:
                cfg = cfg.with_overrides(measure_stats(cfg, list_source(cfg)))
            uri = str(random_encoder(cfg, cfg.seed, "cpu").save(Path(tmp) / "encoder.pt"))
            model_desc = f"random-init {args.config}"
        jcfg = job_config(source, [o for o in args.overrides if o.startswith(ALLOWED_SETS)])
        listing = list_source(jcfg)
        files = [listing.files[i] for i in np.random.default_rng(0).permutation(len(listing.files))]
        print(f"embed benchmark: naive loop for {args.seconds:.0f} s over {len(files)} files of {source}", flush=True)
        naive = _naive_loop(uri, files, jcfg.storage, args.seconds)
        torch.set_num_threads(threads)
        subset = naive["visited"]  # the same files for the job
        manifest = Path(tmp) / "subset.csv"
        manifest.write_text("path\n" + "".join(f"{f.uri}\n" for f in subset))
        init_ray(min_cpus=os.cpu_count() or 1)
        cpus = min(int(ray.cluster_resources().get("CPU", 1)), os.cpu_count() or 1)
        per_part = max(1, len(subset) // (8 * cpus))  # 8 parts per actor: a short tail when the last ones end
        summary = run_embed(uri, job_config(str(manifest), ["data.allow_outside_paths=true"]), str(Path(tmp) / "out"),
                            EmbedOptions(files_per_part=per_part, actors=cpus))
    tp = summary["throughput"]
    job_cpus = tp["cpus"]
    res = {"source": source, "model": model_desc, "files": naive["files"], "visited": len(subset),
           "audio_hours": round(naive["audio_s"] / 3600, 4), "cpus": job_cpus, "actors": tp["actors"],
           "naive_clips_per_s_per_cpu": naive["clips_per_s"],
           "naive_audio_hours_per_hour_per_cpu": naive["audio_hours_per_hour"],
           "job_clips_per_s_per_cpu": tp["files_per_s_per_cpu"],
           "job_audio_hours_per_hour_per_cpu": tp["audio_hours_per_hour_per_cpu"],
           "job_vs_naive": tp["files_per_s_per_cpu"] / naive["clips_per_s"],
           "job_first_part_s": tp["first_part_s"], "job_wall_s": tp["wall_s"],
           "job_actor_clips_per_s_per_cpu": tp["actor_files_per_s_per_cpu"],
           "job_actor_audio_hours_per_hour_per_cpu": tp["actor_audio_hours_per_hour_per_cpu"],
           "job_actor_vs_naive": tp["actor_files_per_s_per_cpu"] / naive["clips_per_s"]}
    rows = [("data, model", f"{len(subset)} files ({res['audio_hours'] * 60:.1f} min of audio) of {source}; "
                            f"{model_desc}"),
            ("naive loop (1 process, 1 thread): clips/s per CPU", f"{naive['clips_per_s']:.2f} "
                                                                  f"({naive['audio_hours_per_hour']:.0f} h of audio "
                                                                  "per hour)"),
            (f"embed job ({tp['actors']} actors, {job_cpus} CPUs): clips/s per CPU",
             f"{tp['files_per_s_per_cpu']:.2f} ({tp['audio_hours_per_hour_per_cpu']:.0f} h/h per CPU; "
             f"{tp['wall_s']:.1f} s end to end, first part after {tp['first_part_s']:.1f} s)"),
            ("job / naive (per CPU, end to end)", f"{res['job_vs_naive']:.2f}x"),
            ("inside the actors: clips/s per CPU", f"{res['job_actor_clips_per_s_per_cpu']:.2f} "
                                                   f"({res['job_actor_audio_hours_per_hour_per_cpu']:.0f} h/h per CPU; "
                                                   f"{res['job_actor_vs_naive']:.2f}x naive)")]
    emit(res, rows, args.json)


if __name__ == "__main__":
    sys.exit(main())

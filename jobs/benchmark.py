"""Benchmarks: ours against a baseline measured in the same run, printed as a table and saved as JSON.

    python -m jobs.benchmark model --config tiny [--json PATH]
        train-step clips/s and model FLOP rate as a fraction of this machine's fp32 matmul rate;
        baseline: the same model built the hand-rolled way (explicit softmax attention, per-tensor
        EMA loop, for-loop AdamW).
    python -m jobs.benchmark data [--source DIR_OR_S3] [--shards DIR_OR_S3] [--seconds S] [--json PATH]
        steady-state clips/s per CPU of a naive per-file loop, the raw-source Ray Data stream and the
        prepared shards (prepared first if missing), first-batch times, and the driver's memory for the
        shard plan of a 100k-step x 256 run against a 100-step one (default data: the demo corpus).
    python -m jobs.benchmark train --config tiny --source DIR_OR_S3_OR_CORPUS [--json PATH]
        steady-state clips/s with 1 and 2 workers, and recovery time (worker kill -> first step).
    python -m jobs.benchmark features [--config base] [--seconds S] [--json PATH]
        the trainer's Kaldi fbank (features_in: trainer) on its device, clips/s, against torchaudio's
        per-clip fbank loop it replaced (filterbanks rebuilt per clip), on one worker's batch.
    python -m jobs.benchmark gpu [--config base] [--steps N] [--json PATH]
        the one prepared GPU check (jobs/benchmark_gpu.py): matmul rate, the worker's train step eager and
        compiled (clips/s, MFU), log-mel on the device, a checkpoint restored on the device, NCCL bus
        bandwidth; on a CPU the same measurements in fp32 and CPU bf16.
    python -m jobs.benchmark embed [--model-uri URI] [--source DIR_OR_S3] [--seconds S] [--json PATH]
        the embed job (jobs/embed.py) against a naive single-process `load_encoder(uri).embed` loop over the
        same files: clips/s and hours of audio per hour, per CPU (default: the demo corpus, a random-init
        model of --config).
    python -m jobs.benchmark quality [--config tiny] [--steps 200,400] [--seeds 3] [--ablate all] [--json PATH]
                                     [--against BASE_JSON]
        pretraining vs the same-seed random init (same readout, same probes) on the dev tasks' test
        splits, beside log-mel: mean ± standard error over seeds, a Markdown table and a plot
        (default data: the demo corpus in var/demo-corpus, built if missing).  With --against, this
        study minus a base study's, paired by seed, and the adoption verdict.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jobs.common import init_ray, setup_logging

DEMO_DIR = Path("var/demo-corpus")


def table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def emit(result: dict, rows: list[tuple[str, str]], path: str | None) -> None:
    print(table(rows), flush=True)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")


# --- model -----------------------------------------------------------------------------------
def matmul_gflops(seconds: float = 2.0, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def _naive_attention(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
    x = att.softmax(-1) @ v
    return self.proj(x.transpose(1, 2).reshape(b, n, d))


def time_steps(cfg, naive: bool, steps: int, warmup: int = 3) -> float:
    """Seconds per train step (fwd target + fwd/bwd context and predictor + AdamW + EMA)."""
    from service.masks import MaskGenerator
    from service.model import Attention, AudioJEPA
    from service.optim import build_optimizer

    torch.manual_seed(0)
    model = AudioJEPA(cfg)
    opt = build_optimizer(model, cfg.optim)
    if naive:
        for g in opt.param_groups:
            g["foreach"] = False
    orig = Attention.forward
    Attention.forward = _naive_attention if naive else orig
    fc = cfg.features
    gen = MaskGenerator(cfg.masking, fc.grid)
    b = cfg.train.batch_size
    patches = torch.randn(b, fc.grid[0] * fc.grid[1], fc.patch_freq * fc.patch_time)
    try:
        times = []
        for i in range(warmup + steps):
            m = gen(b, np.random.default_rng(i))
            t0 = time.perf_counter()
            loss, *_ = model(patches, m.context, m.target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if naive:
                with torch.no_grad():
                    for t, o in zip(model.target_encoder.parameters(), model.encoder.parameters()):
                        t.mul_(0.996).add_(o.detach(), alpha=0.004)
            else:
                model.ema_update(0.996)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return float(np.median(times))
    finally:
        Attention.forward = orig


def bench_model(args) -> None:
    from service.config import load_config
    from service.model import model_flops_per_clip

    cfg = load_config(args.config, args.overrides + ["masking.ratio=0.5"])
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    b = cfg.train.batch_size
    n = cfg.features.grid[0] * cfg.features.grid[1]
    n_tgt = round(0.5 * n)
    flops = model_flops_per_clip(cfg, n - n_tgt, n_tgt)
    mm = matmul_gflops()
    ours = time_steps(cfg, naive=False, steps=args.steps)
    base = time_steps(cfg, naive=True, steps=args.steps)
    mm2 = matmul_gflops()
    mm = max(mm, mm2)
    res = {"config": args.config, "batch_size": b, "tokens": n, "threads": torch.get_num_threads(),
           "device": "cpu", "model_gflop_per_clip": flops / 1e9, "matmul_gflops_per_s": mm,
           "clips_per_s": b / ours, "model_gflops_per_s": flops * b / ours / 1e9,
           "flop_fraction": flops * b / ours / 1e9 / mm,
           "baseline_clips_per_s": b / base, "baseline_flop_fraction": flops * b / base / 1e9 / mm,
           "speedup_vs_baseline": base / ours}
    emit(res, [("config", f"{args.config} (batch {b}, {n} tokens, {res['threads']} threads, fp32 CPU)"),
               ("matmul fp32 GFLOP/s", f"{mm:.1f}"),
               ("model GFLOP per clip (train step)", f"{res['model_gflop_per_clip']:.3f}"),
               ("ours: clips/s", f"{res['clips_per_s']:.1f}"),
               ("ours: model GFLOP/s (fraction of matmul)", f"{res['model_gflops_per_s']:.1f} ({res['flop_fraction']:.2f})"),
               ("baseline (naive attn/EMA/AdamW): clips/s", f"{res['baseline_clips_per_s']:.1f} "
                                                            f"({res['baseline_flop_fraction']:.2f} of matmul)"),
               ("speedup vs baseline", f"{res['speedup_vs_baseline']:.2f}x")], args.json)


# --- data ------------------------------------------------------------------------------------
def _steady(batches, seconds: float, warmup: int = 3) -> tuple[float, float, int]:
    """(first-batch seconds, steady clips/s after `warmup` batches, clips) of a batch iterator, for
    `seconds` of steady state or until it ends."""
    t0 = time.perf_counter()
    first, t_w, clips, n = None, None, 0, 0
    for b in batches:
        n += 1
        if first is None:
            first = time.perf_counter() - t0
        if n == warmup:
            t_w = time.perf_counter()
        elif n > warmup:
            clips += len(b["x"])
            if time.perf_counter() - t_w > seconds:
                break
    return first or 0.0, clips / max(time.perf_counter() - (t_w or t0), 1e-9), clips


def _naive_batches(cfg, files, batch: int = 64):
    """The baseline: one process, one thread, file by file: read, decode, resample, crops, log-mel (the
    waveform crops when data.features_in=trainer: log-mel is then the trainer's, on its GPU)."""
    from service.audio import Skip, crop_rng, crops, decode
    from service.features import LogMel
    from service.storage import read_bytes
    torch.set_num_threads(1)
    fe, out = LogMel(cfg.features), []
    for f in files:
        try:
            wav = decode(read_bytes(f.uri, cfg.storage.s3_endpoint), cfg.features.sample_rate, cfg.data.max_channels,
                         cfg.data.min_seconds, cfg.data.trim_silence)
        except Skip:
            continue
        for c in crops(wav, cfg.features.clip_samples, cfg.data.crops_per_file, crop_rng(cfg.seed, 0, f.key),
                       cfg.data.short_audio):
            out.append(fe(torch.from_numpy(c)[None])[0] if cfg.data.features_in == "pipeline" else c)
            if len(out) == batch:
                yield {"x": out}
                out = []


_PLAN_SCRIPT = """
import json, sys
import ray
from service.config import load_config
from service.corpus import load_corpus, rank_dataset
address, source, steps, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
cfg = load_config("base", [f"data.source={source}", f"train.steps={steps}", "train.batch_size=256", "train.workers=1",
                           f"features.sample_rate={rate}"])
corpus = load_corpus(source, cfg)
ds = rank_dataset(cfg, corpus, ray.put(corpus["blocks"]), 0, 1, 0, steps * 256)  # built, not executed
# VmHWM: this process's peak (getrusage's ru_maxrss survives exec and would report the parent's)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"rss_mb": hwm / 1024}))
"""


def _driver_rss_mb(address: str, source: str, steps: int, sample_rate: int) -> float:
    """Peak RSS of a fresh driver process that builds (does not run) the shard stream of a `steps` x 256 run."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT, address, source, str(steps), str(sample_rate)],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mb"]


def bench_data(args) -> None:
    import ray

    from service.config import load_config
    from service.corpus import is_corpus, load_corpus, rank_dataset
    from service.data import build_dataset, list_source
    from service.ledger import DataLedger
    from service.prepare import PrepareOptions, prepare

    source = args.source or _demo_source()
    cfg = load_config(args.config, args.overrides + [f"data.source={source}"])
    listing = list_source(cfg)
    init_ray(min_cpus=os.cpu_count() or 1)
    cpus = min(int(ray.cluster_resources().get("CPU", 1)), os.cpu_count() or 1)
    shards = args.shards or source.rstrip("/") + "-shards"
    t0 = time.perf_counter()
    corpus = (load_corpus(shards, cfg) if is_corpus(shards, cfg.storage) else prepare(cfg, shards, PrepareOptions()))
    prepare_s = time.perf_counter() - t0
    cfg = cfg.with_overrides(corpus["stats"])
    print(f"data benchmark: {len(listing.files)} files, {cpus} CPUs, {args.seconds:.0f} s of steady state each",
          flush=True)
    files = [listing.files[i] for i in np.random.default_rng(0).permutation(len(listing.files))]
    _, naive, _ = _steady(_naive_batches(cfg, files), args.seconds)
    raw_first, raw, raw_clips = _steady(build_dataset(cfg, listing, DataLedger.remote(len(listing.files), []))
                                        .iter_batches(batch_size=64, batch_format="numpy"), args.seconds)
    scfg = cfg.with_overrides({"data.source": shards})
    ds = rank_dataset(scfg, corpus, ray.put(corpus["blocks"]), 0, 1, 0, 10 ** 7)
    first, sh, sh_clips = _steady(ds.iter_batches(batch_size=64, batch_format="numpy"), args.seconds)
    address = ray.get_runtime_context().gcs_address
    res = {"files": len(listing.files), "cpus": cpus, "segments": corpus["segments"], "prepare_s": prepare_s,
           "naive_clips_per_s_per_cpu": naive, "raw_clips_per_s_per_cpu": raw / cpus,
           "shards_clips_per_s_per_cpu": sh / cpus, "shards_vs_naive": sh / cpus / naive,
           "raw_vs_naive": raw / cpus / naive, "first_batch_s": first, "raw_first_batch_s": raw_first,
           "driver_rss_mb": _driver_rss_mb(address, shards, 100_000, cfg.features.sample_rate),
           "driver_rss_mb_small": _driver_rss_mb(address, shards, 100, cfg.features.sample_rate)}
    rows = [("corpus", f"{res['files']} files -> {res['segments']} segments "
                       f"({'prepared' if prepare_s > 5 else 'already prepared'} in {prepare_s:.0f} s)"),
            ("naive per-file loop: clips/s per CPU", f"{naive:.1f}"),
            ("raw source, Ray Data: clips/s per CPU", f"{raw / cpus:.1f} ({raw_clips} clips; first batch "
                                                      f"{raw_first:.1f} s)"),
            ("prepared shards: clips/s per CPU", f"{sh / cpus:.1f} ({sh_clips} clips; first batch {first:.1f} s)"),
            ("shards / naive (per CPU)", f"{res['shards_vs_naive']:.2f}x (raw / naive {res['raw_vs_naive']:.2f}x)"),
            ("driver RSS: 100k-step x 256 plan vs 100-step", f"{res['driver_rss_mb']:.0f} MB vs "
                                                              f"{res['driver_rss_mb_small']:.0f} MB")]
    emit(res, rows, args.json)


def _demo_shards(config: str, overrides: list[str]) -> str:
    """The demo corpus prepared into shards at the config's sample rate (prepared if missing): decoded
    once, so no training step waits on decoding (the quality study's default data)."""
    from service.config import load_config
    from service.corpus import is_corpus
    from service.prepare import PrepareOptions, prepare
    raw = _demo_source()
    cfg = load_config(config, overrides + [f"data.source={raw}"])
    rate = cfg.features.sample_rate
    shards = raw + ("-shards" if rate == 16000 else f"-shards-{rate // 1000}k")
    init_ray(min_cpus=cfg.train.workers * cfg.train.cpus_per_worker + 1)
    if not is_corpus(shards, cfg.storage):
        prepare(cfg, shards, PrepareOptions())
    return shards


def _demo_source() -> str:
    """The demo corpus's pretraining audio (built if missing)."""
    from jobs.demo import DEV_TASKS
    from jobs.make_demo_corpus import main as make_corpus
    if not (DEMO_DIR / "tasks" / DEV_TASKS[-1] / "manifest.csv").exists():
        make_corpus(["--out", str(DEMO_DIR)])
    return str(DEMO_DIR / "pretrain")


# --- features --------------------------------------------------------------------------------
def _clips_per_s(fn, wav: torch.Tensor, seconds: float) -> float:
    fn(wav)  # warm-up
    reps, t0 = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - t0 < seconds:
        fn(wav)
        if wav.is_cuda:
            torch.cuda.synchronize()
        reps += 1
    return reps * wav.shape[0] / (time.perf_counter() - t0)


def bench_features(args) -> None:
    import torchaudio

    from service.config import load_config
    from service.features import LogMel
    cfg = load_config(args.config, args.overrides + ["features.frontend=kaldi", "features.mean=0.0",
                                                     "features.std=1.0"])
    fc, device = cfg.features, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    batch = cfg.train.batch_size // cfg.train.workers
    wav = torch.randn(batch, fc.clip_samples, generator=torch.Generator().manual_seed(0)).mul_(0.1).to(device)
    fe = LogMel(fc).to(device)

    def per_clip(w):  # what the trainer ran before: torchaudio's fbank clip by clip, banks built each call
        return torch.stack([torchaudio.compliance.kaldi.fbank(
            c[None] - c.mean(), htk_compat=True, sample_frequency=fc.sample_rate, use_energy=False,
            window_type="hanning", num_mel_bins=fc.n_mels, dither=0.0, frame_length=fc.win_ms,
            frame_shift=fc.hop_ms, energy_floor=0.0).T for c in w])

    seconds = min(args.seconds, 20.0)
    base, ours = _clips_per_s(per_clip, wav, seconds), _clips_per_s(fe, wav, seconds)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "config": args.config,
           "batch": batch, "clip_samples": fc.clip_samples, "per_clip_clips_per_s": base,
           "batched_clips_per_s": ours, "speedup": ours / base}
    emit(res, [("device, batch", f"{res['device']}, {batch} clips of {fc.clip_samples} samples"),
               ("torchaudio fbank per clip: clips/s", f"{base:.1f}"),
               ("LogMel (banks built once): clips/s", f"{ours:.1f}"),
               ("speed-up", f"{ours / base:.2f}x")], args.json)


def bench_embed(args) -> None:
    from jobs.embed import bench_embed as run
    run(args)


def bench_gpu(args) -> None:
    from jobs.benchmark_gpu import bench_gpu as run
    run(args, emit)


# --- train -----------------------------------------------------------------------------------
def bench_train(args) -> None:
    from service.config import load_config
    from service.train import run_pretraining

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    init_ray(min_cpus=(os.cpu_count() or 1) + 2)
    res, rows = {"clips_per_s": {}}, []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.overrides + [f"data.source={args.source}", f"checkpoint.storage_path={tmp}",
                                 "mlflow.tracking_uri=", "train.log_every=10"]
        for workers in (1, 2):
            cfg = load_config(args.config, base + [f"train.workers={workers}", f"train.steps={args.steps}",
                                                   f"checkpoint.every_steps={args.steps}", f"run_name=w{workers}"])
            s = run_pretraining(cfg)
            res["clips_per_s"][workers] = s["metrics"].get("clips_per_s")
            res.setdefault("data_wait_fraction", {})[workers] = s["metrics"].get("data_wait_fraction")
            rows.append((f"{workers} worker(s): steady clips/s (data wait)",
                         f"{res['clips_per_s'][workers]:.1f} ({100 * res['data_wait_fraction'][workers]:.0f} % of "
                         "step time, last window)"))
        kill = args.steps // 2
        cfg = load_config(args.config, base + ["train.workers=2", f"train.steps={args.steps}", "run_name=recover",
                                               f"checkpoint.every_steps={max(kill - 5, 1)}",
                                               f"failure.inject_kill_at_step={kill}", "failure.inject_kill_rank=1"])
        run_pretraining(cfg)
        killed = json.loads((Path(tmp) / "recover" / f"fault_injected_at_step_{kill}").read_text())
        resume = json.loads(sorted((Path(tmp) / "recover" / "resumes").glob("*.json"))[0].read_text())
        res["recovery_s"] = resume["first_step_time"] - killed["time"]
        res["recovery_restored_s"] = resume["restored_time"] - killed["time"]
        rows.append(("recovery: kill -> first step after resume", f"{res['recovery_s']:.1f} s "
                     f"(state restored after {res['recovery_restored_s']:.1f} s; resumed at step {resume['step']})"))
    res["scaling_2_over_1"] = res["clips_per_s"][2] / res["clips_per_s"][1]
    rows.append(("2-worker / 1-worker throughput", f"{res['scaling_2_over_1']:.2f}x on {os.cpu_count()} cores"))
    emit(res, rows, args.json)


# --- quality ---------------------------------------------------------------------------------


def bench_quality(args) -> None:
    from service.config import load_config
    from jobs.study import ABLATIONS, compare, compare_table, plot, run_study, table

    if not args.source:
        from jobs.demo import DEV_TASKS
        args.source = _demo_shards(args.config, args.overrides)
        args.task = args.task or [str(DEMO_DIR / "tasks" / t) for t in DEV_TASKS]
    if not args.task:
        raise SystemExit("quality needs --task (one or more labeled tasks) when --source is given")
    ablate = list(ABLATIONS) if args.ablate == "all" else [a for a in (args.ablate or "").split(",") if a]
    unknown = sorted(set(ablate) - set(ABLATIONS))
    if unknown:
        raise SystemExit(f"--ablate {','.join(unknown)}: unknown (choose from {', '.join(ABLATIONS)} or all)")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    base = load_config(args.config, args.overrides + [f"data.source={args.source}", "mlflow.tracking_uri="])
    budgets = [int(x) for x in str(args.steps or "200,400").split(",")]
    out = Path(args.json or "var/quality/quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tasks = [str(Path(t).resolve()) if "://" not in t else t for t in args.task]
    # runs already done with the same config and tasks are kept: an interrupted study's (PATH.partial.json,
    # refused if its settings differ) or a finished one's (PATH), so a study resumes or grows by seeds
    partial = out.with_suffix(".partial.json")
    study = json.loads(json.dumps({"config": base.to_dict(), "tasks": tasks}))
    saved = json.loads(partial.read_text()) if partial.exists() else None
    if saved is not None and (not isinstance(saved, dict) or saved.get("study") != study):
        raise SystemExit(f"{partial}: runs of a study with other settings (config or tasks differ); "
                         f"remove it or choose another --json")
    if saved is None and out.exists():
        saved = json.loads(out.read_text())
        saved = saved if saved.get("study") == study else None
    done = saved["rows"] if saved else []
    if done:
        print(f"resuming: {len(done)} rows of earlier runs with the same settings are kept", flush=True)
    init_ray(min_cpus=base.train.workers * base.train.cpus_per_worker + 1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_study(base, tasks, budgets, args.seeds, tmp, str(out.parent / "cache"), ablate,
                         args.ablation_steps, args.ablation_seeds, done=done,
                         on_rows=lambda r: partial.write_text(json.dumps({"study": study, "rows": r}, indent=1)))
    partial.unlink(missing_ok=True)
    md = table(rows)
    against = None
    if args.against:  # the adoption rule against a base study, paired by seed
        against = compare(json.loads(Path(args.against).read_text())["rows"], rows)
        md += f"\n\nAgainst {args.against}:\n\n" + compare_table(against)
    png = plot(rows, str(out.with_suffix(".png")))
    out.with_suffix(".md").write_text(md + "\n")
    print(md, flush=True)
    emit({"study": study, "config": args.config, "budgets": budgets, "seeds": args.seeds, "ablations": ablate,
          "rows": rows, "markdown": md, "plot": png, "against": against},
         [("table", str(out.with_suffix(".md"))), ("plot", png)], str(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["model", "data", "train", "features", "gpu", "embed", "quality"])
    p.add_argument("--model-uri", help="embed: the model (default: a random-init model of --config)")
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--source", help="data for `data` and `train`")
    p.add_argument("--shards", help="data: prepared corpus of --source (default: <source>-shards, prepared if missing)")
    p.add_argument("--seconds", type=float, default=60.0, help="data: steady-state seconds per method")
    p.add_argument("--steps", default=None, help="model: timed steps (20); train: steps per run (20); "
                   "quality: pretraining budgets, comma-separated (200,400)")
    p.add_argument("--seeds", type=int, default=3, help="quality: seeds per budget")
    p.add_argument("--task", action="append", default=[], help="quality: labeled task (repeatable)")
    p.add_argument("--ablate", default="", help="quality: recipe changes to switch back one at a time "
                   "(padding,stats,ema,readout,ratio or all)")
    p.add_argument("--ablation-steps", type=int, default=0, help="quality: budget of the ablations (default: the last)")
    p.add_argument("--ablation-seeds", type=int, default=2)
    p.add_argument("--against", help="quality: a base study's JSON; prints this study minus it, paired by seed, "
                   "and the adoption verdict (mean up by > 2 s.e., no task down by > 2 s.e., 3 seeds)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    setup_logging()
    if args.what == "train" and not args.source:
        p.error(f"{args.what} needs --source")
    if args.what != "quality":
        args.steps = int(args.steps or 20)
    {"model": bench_model, "data": bench_data, "train": bench_train, "features": bench_features,
     "gpu": bench_gpu, "embed": bench_embed, "quality": bench_quality}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The JEPA core: config, front end, masks, model, loss, EMA and schedules."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from service.config import ConfigError, load_config
from service.features import LogMel, patchify, unpatchify
from service.masks import GEOMETRIES, MaskGenerator, render_masks
from service.model import AudioJEPA, Encoder, gather_tokens, sincos_2d, variance_covariance
from service.optim import apply_schedules, build_optimizer, lr_at, tau_at

torch.set_num_threads(2)
STATS = ["features.mean=-5.0", "features.std=5.0"]  # the normalisation a run measures from its data


def small_cfg(**over):
    sets = ["model.width=64", "model.depth=2", "model.heads=2", "model.pred_width=32",
            "model.pred_depth=1", "model.pred_heads=2", "features.mean=-5.0", "features.std=5.0"] + \
        [f"{k}={v}" for k, v in over.items()]
    return load_config("tiny", sets)


# --- config -------------------------------------------------------------------------
def test_config_rejects_unknown_and_bad_keys():
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config("tiny", ["train.stepz=3"])
    with pytest.raises(ConfigError, match="masking.geometry"):
        load_config("tiny", ["masking.geometry=spiral"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_config("tiny", ["train.steps=many"])
    with pytest.raises(ConfigError, match="features.n_frames"):
        load_config("tiny", ["features.n_frames=200"])
    assert load_config("tiny", ["masking.ratio=0.7"]).masking.ratio_range() == (0.7, 0.7)
    assert load_config("base").features.grid == (6, 32)


def test_config_overrides_api_moved_keys_and_ratio_type():
    cfg = load_config("tiny")
    new = cfg.with_overrides({"masking.ratio": 0.7, "run_name": "x"})
    assert new.masking.ratio == 0.7 and new.run_name == "x" and cfg.masking.ratio != 0.7  # a copy
    assert cfg.with_overrides({"masking.ratio": [0.6, 0.8]}).masking.ratio_range() == (0.6, 0.8)
    for bad in ("many", [0.1, 0.2, 0.3], [0.8, 0.6]):
        with pytest.raises(ConfigError, match="masking.ratio"):
            cfg.with_overrides({"masking.ratio": bad})
    with pytest.raises(ConfigError, match="masking.nosuch"):
        cfg.with_overrides({"masking.nosuch": 1})
    for old, new_key in (("data.s3_endpoint", "storage.s3_endpoint"), ("data.s3_region", "storage.s3_region")):
        with pytest.raises(ConfigError, match=new_key.replace(".", r"\.")):
            load_config("tiny", [f"{old}=http://127.0.0.1:9"])
    assert load_config("tiny", ["storage.s3_endpoint=http://127.0.0.1:9"]).storage.s3_endpoint == "http://127.0.0.1:9"


def test_config_hash_covers_what_a_run_learns_only():
    cfg = load_config("tiny")
    same = cfg.with_overrides({"run_name": "other", "data.source": "/elsewhere", "checkpoint.storage_path": "/x",
                               "storage.s3_endpoint": "http://127.0.0.1:9", "train.workers": 2,
                               "mlflow.registered_model": "m"})
    assert same.hash() == cfg.hash()
    for key, value in (("model.width", 96), ("masking.ratio", 0.8), ("ema.tau_start", 0.95), ("seed", 1),
                       ("train.steps", 7), ("features.hop_ms", 12.5)):
        assert cfg.with_overrides({key: value}).hash() != cfg.hash(), key


def test_frames_for_samples_is_one_rule():
    fc = load_config("tiny").features
    assert fc.frames_for(fc.clip_samples) == fc.n_frames
    assert fc.frames_for(10) == 1 and fc.columns_for(10) == 1
    assert fc.columns_for(fc.clip_samples) == fc.grid[1]
    assert fc.frames_for(fc.clip_samples + fc.hop_length) == fc.n_frames + 1


def test_config_makes_local_paths_absolute(tmp_path, monkeypatch):
    # trials and Ray workers run in other directories: a relative path must mean the caller's
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["data.source=corpus/pretrain", "probe.task=tasks/t1",
                               "checkpoint.storage_path=s3://bucket/runs"])
    assert cfg.data.source == str(tmp_path / "corpus" / "pretrain")
    assert cfg.probe.task == str(tmp_path / "tasks" / "t1")
    assert cfg.checkpoint.storage_path == "s3://bucket/runs"
    assert load_config("tiny").probe.task == ""


# --- front end ----------------------------------------------------------------------
@pytest.mark.parametrize("frontend", ["mel", "kaldi"])
def test_logmel_shapes_and_silence_is_finite(frontend):
    cfg = load_config("tiny", [f"features.frontend={frontend}", *STATS]).features
    fe = LogMel(cfg)
    silent = torch.zeros(2, cfg.clip_samples)
    constant = torch.full((1, cfg.clip_samples), 0.5)
    odd = torch.randn(1, cfg.clip_samples - 777) * 0.1  # odd length -> padded to n_frames
    for wav in (silent, constant, odd):
        x = fe(wav)
        assert x.shape == (wav.shape[0], cfg.n_mels, cfg.n_frames)
        assert torch.isfinite(x).all()


def test_logmel_equals_torchaudio_melspectrogram():
    """The front end's |STFT|^2 as re^2 + im^2 computes exactly torchaudio's power-2 mel spectrogram."""
    import torchaudio
    cfg = load_config("tiny", ["features.mean=0.0", "features.std=1.0"]).features
    ref = torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
        n_mels=cfg.n_mels, center=False, power=2.0, f_min=20.0, f_max=cfg.sample_rate / 2, mel_scale="htk")
    wav = torch.randn(3, cfg.clip_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    extra = cfg.n_fft - cfg.win_length
    want = torch.log(ref(torch.nn.functional.pad(wav, (extra // 2, extra - extra // 2))).clamp_min(1e-10))
    assert torch.allclose(LogMel(cfg)(wav), want, atol=1e-4)


def test_kaldi_front_end_is_torchaudios_fbank_batched_from_banks_built_once(monkeypatch):
    """`base`'s Kaldi fbank: torchaudio's per-clip output (what the trainer computed before), from filterbanks
    built when the module is and moved with it, never rebuilt per clip or per step."""
    import torchaudio.compliance.kaldi as kaldi
    cfg = load_config("base", ["features.mean=0.0", "features.std=1.0"]).features
    wav = torch.randn(3, cfg.clip_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    want = torch.stack([kaldi.fbank(w[None] - w.mean(), htk_compat=True, sample_frequency=cfg.sample_rate,
                                    use_energy=False, window_type="hanning", num_mel_bins=cfg.n_mels, dither=0.0,
                                    frame_length=cfg.win_ms, frame_shift=cfg.hop_ms, energy_floor=0.0).T for w in wav])
    fe = LogMel(cfg)
    assert {"kaldi_banks", "kaldi_window"} <= dict(fe.named_buffers()).keys()  # .to(device) moves them
    built = []
    monkeypatch.setattr(kaldi, "get_mel_banks", lambda *a, **k: built.append(a) or (_ for _ in ()).throw(
        AssertionError("filterbank rebuilt")))
    got = fe(wav)
    assert built == [] and got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
    assert torch.equal(fe(wav[1:2]), got[1:2]) or torch.allclose(fe(wav[1:2]), got[1:2], atol=1e-5)


def test_patchify_roundtrip_non_square():
    spec = torch.randn(3, 96, 512)
    p = patchify(spec, 16, 16)
    assert p.shape == (3, 6 * 32, 256)
    # patch index = freq_row * n_time + time_col
    assert torch.equal(p[0, 1 * 32 + 5], spec[0, 16:32, 80:96].reshape(-1))
    assert torch.equal(unpatchify(p, (6, 32), 16, 16), spec)


# --- masks --------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("grid", [(8, 13), (6, 32), (5, 7)])
def test_masks_counts_disjoint_and_cover_edges(geometry, grid):
    cfg = load_config("tiny", [f"masking.geometry={geometry}", "masking.ratio=[0.3, 0.7]"]).masking
    gen = MaskGenerator(cfg, grid)
    n = grid[0] * grid[1]
    rng = np.random.default_rng(1)
    target_hits = np.zeros(n)
    context_hits = np.zeros(n)
    ratios = []
    for _ in range(150):
        m = gen(16, rng)
        ctx, tgt = m.context.numpy(), m.target.numpy()
        assert ctx.shape[0] == tgt.shape[0] == 16
        for c, t in zip(ctx, tgt):
            assert len(set(c)) == len(c) and len(set(t)) == len(t)
            assert not set(c) & set(t), "context and target overlap"
            assert c.min() >= 0 and max(c.max(), t.max()) < n
            assert (np.diff(c) > 0).all() and (np.diff(t) > 0).all()
        assert ctx.shape[1] >= cfg.min_keep and tgt.shape[1] >= 1
        np.add.at(target_hits, tgt.ravel(), 1)
        np.add.at(context_hits, ctx.ravel(), 1)
        ratios.append(m.ratio)
    assert (target_hits > 0).all(), "some patch (edge?) is never a target"
    assert (context_hits > 0).all(), "some patch is never context"
    # coverage is close to uniform: no cell (edges, centre) is starved
    assert target_hits.min() > 0.3 * target_hits.mean()
    lines = {"time": grid[1], "freq": grid[0]}.get(geometry, n)
    assert min(ratios) >= 0.3 - 0.5 / lines - 1e-9 and max(ratios) <= 0.7 + 0.5 / lines + 1e-9
    assert max(ratios) - min(ratios) >= 0.19  # the range is actually sampled


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_masks_exact_ratio_and_seeded(geometry):
    cfg = load_config("tiny", [f"masking.geometry={geometry}", "masking.ratio=0.5"]).masking
    gen = MaskGenerator(cfg, (8, 13))
    a, b = gen(8, np.random.default_rng(7)), gen(8, np.random.default_rng(7))
    assert torch.equal(a.context, b.context) and torch.equal(a.target, b.target)
    c = gen(8, np.random.default_rng(8))
    assert not torch.equal(a.target, c.target)
    expected = {"time": round(0.5 * 13) * 8, "freq": round(0.5 * 8) * 13}.get(geometry, 52)
    assert a.target.shape[1] == expected


def test_unstructured_context_is_the_rest():
    cfg = load_config("tiny", ["masking.ratio=0.6"]).masking
    m = MaskGenerator(cfg, (8, 13))(4, np.random.default_rng(0))
    assert m.context.shape[1] + m.target.shape[1] == 104 and m.target.shape[1] == round(0.6 * 104)


def test_render_masks_png(tmp_path):
    cfg = load_config("tiny", STATS)
    spec = torch.randn(cfg.features.n_mels, cfg.features.n_frames)
    out = render_masks(spec, cfg.features.grid, (16, 16), cfg.masking, str(tmp_path / "m.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# --- model --------------------------------------------------------------------------
def test_sincos_non_square_unique_positions():
    pe = sincos_2d(64, (6, 32))
    assert pe.shape == (192, 64)
    assert torch.cdist(pe, pe).add(torch.eye(192) * 10).min() > 1e-3


def batch(cfg, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    wav = torch.randn(b, cfg.features.clip_samples, generator=g) * 0.1
    spec = LogMel(cfg.features)(wav)
    return patchify(spec, cfg.features.patch_freq, cfg.features.patch_time)


def test_target_encoder_gets_no_grad_and_ema_matches_formula():
    cfg = small_cfg()
    model = AudioJEPA(cfg)
    p = batch(cfg)
    m = MaskGenerator(cfg.masking, cfg.features.grid)(p.shape[0], np.random.default_rng(0))
    loss, *_ = model(p, m.context, m.target)
    loss.backward()
    assert all(q.grad is None for q in model.target_encoder.parameters())
    assert all(q.grad is not None for q in model.encoder.parameters())
    with torch.no_grad():
        for q in model.encoder.parameters():
            q.add_(torch.randn_like(q) * 0.01)
    before = copy.deepcopy(model.target_encoder.state_dict())
    online = copy.deepcopy(model.encoder.state_dict())
    model.ema_update(0.9)
    for k, v in model.target_encoder.state_dict().items():
        assert torch.allclose(v, 0.9 * before[k] + 0.1 * online[k], atol=1e-6), k


def test_a_bf16_step_matches_fp32_with_the_sensitive_parts_in_fp32():
    """The autocast path a GPU takes, run on the CPU: one step's loss and gradients close to fp32's from the
    same state, the loss, target normalisation, VICReg covariance and log-mel computed in fp32 inside it."""
    from service.model import autocast
    cfg = small_cfg(**{"loss.var_weight": 1.0, "loss.cov_weight": 0.04, "train.precision": "bf16"})
    torch.manual_seed(0)
    model = AudioJEPA(cfg)
    p = batch(cfg)
    m = MaskGenerator(cfg.masking, cfg.features.grid)(p.shape[0], np.random.default_rng(0))
    grads = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), precision):
            loss, h, parts = model(p, m.context, m.target)
        loss.backward()
        grads[precision] = (loss.detach(), [q.grad.clone() for q in model.encoder.parameters()])
        assert loss.dtype == h.dtype == parts["vc_loss"].dtype == torch.float32, precision
    (l32, g32), (l16, g16) = grads["fp32"], grads["bf16"]
    assert torch.isfinite(l16) and abs(l16 - l32) / l32 < 0.05
    assert all(torch.isfinite(g).all() for g in g16)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in g16]),
                                                torch.cat([g.flatten() for g in g32]), dim=0)
    assert cos > 0.9
    with autocast(torch.device("cpu"), "auto"):  # auto is fp32 off CUDA
        assert not torch.is_autocast_enabled("cpu")
    # numerically sensitive parts: the same values inside a bf16 region as outside, to fp32 rounding
    z = torch.randn(512, 64) * 3
    wav = torch.randn(2, cfg.features.clip_samples) * 0.1
    plain = (variance_covariance(z, cfg.loss), LogMel(cfg.features)(wav))
    with autocast(torch.device("cpu"), "bf16"):
        inside = (variance_covariance(z, cfg.loss), LogMel(cfg.features)(wav))
    for a, b in zip(plain, inside):
        assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["l2", "smooth_l1", "cosine"])
def test_tiny_model_overfits_one_batch(kind):
    torch.manual_seed(0)
    cfg = small_cfg(**{"loss.kind": kind, "optim.lr": 3e-3})
    model = AudioJEPA(cfg)
    opt = build_optimizer(model, cfg.optim)
    for g in opt.param_groups:
        g["lr"] = 3e-3
    p = batch(cfg, b=8)
    m = MaskGenerator(cfg.masking, cfg.features.grid)(8, np.random.default_rng(0))
    # freeze the targets (tau=1) so the objective is stationary: pure fitting capacity
    losses = []
    for _ in range(60):
        loss, *_ = model(p, m.context, m.target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


def test_silent_input_gives_finite_loss():
    cfg = small_cfg()
    model = AudioJEPA(cfg)
    spec = LogMel(cfg.features)(torch.zeros(4, cfg.features.clip_samples))
    p = patchify(spec, 16, 16)
    m = MaskGenerator(cfg.masking, cfg.features.grid)(4, np.random.default_rng(0))
    loss, h, _ = model(p, m.context, m.target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h).all()
    assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)


def test_several_masks_per_clip_share_one_target_pass():
    """k masks per clip: the loss is the mean of the k single-mask losses, with the target encoder run once."""
    torch.manual_seed(0)
    cfg = small_cfg(**{"masking.per_clip": 3})
    model = AudioJEPA(cfg)
    p = batch(cfg, b=2)
    m = MaskGenerator(cfg.masking, cfg.features.grid)(2 * 3, np.random.default_rng(0))  # clip-major rows
    calls = []
    model.target_encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    real = model.target_encoder.block_outputs
    model.target_encoder.block_outputs = lambda *a, **k: calls.append(1) or real(*a, **k)
    loss, *_ = model(p, m.context, m.target)
    assert len(calls) == 1
    singles = [model(p, m.context[j::3], m.target[j::3])[0] for j in range(3)]
    assert torch.allclose(loss, torch.stack(singles).mean(), atol=1e-6)


def test_instance_normed_multi_layer_targets():
    """data2vec targets: each of the last N blocks standardised per clip and channel over tokens, averaged."""
    torch.manual_seed(0)
    cfg = small_cfg(**{"loss.target_norm": "instancenorm", "loss.target_layers": 1})
    model = AudioJEPA(cfg)
    t, h = model.targets(batch(cfg, b=3))
    assert torch.allclose(t.mean(1), torch.zeros_like(t.mean(1)), atol=1e-4)
    assert torch.allclose(t.var(1, unbiased=False), torch.ones_like(t.mean(1)), atol=1e-2)
    model.loss_cfg = dataclasses.replace(model.loss_cfg, target_layers=2)
    t2, h2 = model.targets(batch(cfg, b=3))
    assert torch.equal(h, h2) and not torch.allclose(t, t2)  # another target, the same monitored tokens


def test_masked_target_view_sees_only_the_target_patches():
    """M2D targets: the target encoder runs on the target patches alone, so what the context shows
    cannot reach the targets; with the full view it does."""
    torch.manual_seed(0)
    cfg = small_cfg(**{"loss.target_view": "masked"})
    model = AudioJEPA(cfg)
    p = batch(cfg, b=2)
    ctx, tgt = torch.arange(0, 20).expand(2, -1), torch.arange(20, 40).expand(2, -1)
    seen = []
    real = model.target_encoder.block_outputs
    model.target_encoder.block_outputs = lambda x, keep=None, **k: seen.append(keep) or real(x, keep, **k)
    model(p, ctx, tgt)
    assert torch.equal(seen[0], tgt)
    changed = p.clone()
    changed[:, :20] = torch.randn_like(changed[:, :20])  # only context patches differ
    t_masked, _ = model.targets(p, tgt)
    assert torch.allclose(t_masked, model.targets(changed, tgt)[0])
    full = AudioJEPA(small_cfg())
    full.load_state_dict(model.state_dict())
    t_full = gather_tokens(full.targets(p)[0], tgt)
    assert not torch.allclose(t_full, gather_tokens(full.targets(changed)[0], tgt))
    with pytest.raises(ValueError, match="loss.target_view"):
        small_cfg(**{"loss.target_view": "context"})


def test_variance_covariance_penalises_collapse_only():
    """C-JEPA's terms: zero for decorrelated unit-variance channels, large for collapsed or duplicated ones."""
    cfg = small_cfg(**{"loss.var_weight": 1.0, "loss.cov_weight": 1.0}).loss
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4000, 16, generator=g)
    assert variance_covariance(spread, cfg) < 0.05
    collapsed = spread[:1].expand(4000, -1) + 1e-3 * spread  # every token the same vector
    assert variance_covariance(collapsed, cfg) > 0.9
    low_rank = spread[:, :2].repeat(1, 8)  # 16 channels carrying 2 dimensions
    assert variance_covariance(low_rank, cfg) > 5
    model = AudioJEPA(small_cfg(**{"loss.var_weight": 1.0}))
    model_off = AudioJEPA(small_cfg())
    model_off.load_state_dict(model.state_dict())
    p = batch(small_cfg(), b=2)
    ctx, tgt = torch.arange(0, 20).expand(2, -1), torch.arange(20, 40).expand(2, -1)
    loss, _, parts = model(p, ctx, tgt)
    loss_off, _, parts_off = model_off(p, ctx, tgt)
    assert loss > loss_off and parts_off == {}  # the term is part of the trained loss
    assert torch.allclose(parts["jepa_loss"], loss_off) and torch.allclose(parts["jepa_loss"] + parts["vc_loss"], loss)
    clips = AudioJEPA(small_cfg(**{"loss.var_weight": 1.0, "loss.vc_over": "clips"}))
    clips.load_state_dict(model.state_dict())
    z = model.encoder(p, ctx)
    assert torch.allclose(clips(p, ctx, tgt)[0] - model_off(p, ctx, tgt)[0],
                          variance_covariance(z.mean(1), clips.loss_cfg), atol=1e-5)  # one sample per clip


def test_encoder_handles_other_grids():
    cfg = load_config("base", ["model.width=64", "model.depth=1", "model.heads=2", *STATS])
    enc = Encoder(256, cfg.features.grid, cfg.model)
    out = enc(torch.randn(2, 192, 256))
    assert out.shape == (2, 192, 64)


# --- schedules ----------------------------------------------------------------------
def test_schedules_by_step():
    cfg = load_config("tiny", ["train.steps=500", "optim.warmup_steps=50", "ema.tau_start=0.996", "ema.tau_end=1.0",
                               "ema.schedule=cosine"])
    assert tau_at(0, 500, cfg.ema) == pytest.approx(0.996)
    assert tau_at(500, 500, cfg.ema) == pytest.approx(1.0)
    assert tau_at(250, 500, cfg.ema) == pytest.approx(0.998)
    lin = load_config("tiny", ["ema.tau_start=0.99", "ema.tau_end=0.999", "ema.schedule=linear"]).ema
    assert tau_at(0, 500, lin) == pytest.approx(lin.tau_start) and tau_at(500, 500, lin) == pytest.approx(lin.tau_end)
    assert tau_at(250, 500, lin) == pytest.approx((lin.tau_start + lin.tau_end) / 2)
    assert lr_at(49, 500, cfg.optim) == pytest.approx(cfg.optim.lr)
    assert lr_at(499, 500, cfg.optim) < 0.01 * cfg.optim.lr
    model = AudioJEPA(small_cfg())
    opt = build_optimizer(model, cfg.optim)
    vals = apply_schedules(opt, 500, cfg)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == pytest.approx(cfg.optim.weight_decay_end) == vals["wd"]
    assert no_decay["weight_decay"] == 0.0
    assert all(p.ndim <= 1 for p in no_decay["params"]) and all(p.ndim == 2 for p in decay["params"])


# --- no free lunch from padding -------------------------------------------------------
@pytest.mark.parametrize("short_audio", ["loop", "pad"])
def test_padding_never_becomes_a_target_or_context_patch(tmp_path, short_audio):
    """A 0.3 s file and a 30 s file (with leading/trailing digital silence) through the pipeline's UDF."""
    import soundfile as sf

    from service.data import clips_from_files
    from service.worker import constant_fraction
    sr = 16000
    rng = np.random.default_rng(0)
    speech_like = lambda s: (0.2 * rng.standard_normal(int(s * sr)) * np.sin(np.linspace(0, 40, int(s * sr))))
    short = np.concatenate([np.zeros(sr // 2), speech_like(0.3), np.zeros(sr // 2)]).astype(np.float32)
    for name, x in (("short.wav", short), ("long.wav", speech_like(30.0).astype(np.float32))):
        sf.write(tmp_path / name, x, sr)
    cfg = load_config("tiny", ["features.mean=-5.0", "features.std=5.0", f"data.short_audio={short_audio}"])
    uris = np.array([str(tmp_path / "short.wav"), str(tmp_path / "long.wav")])
    out = clips_from_files({"uri": uris, "key": np.array(["short.wav", "long.wav"]), "epoch": np.array([0, 0])},
                           cfg.features, cfg.data, cfg.storage, cfg.seed)
    patches = patchify(torch.from_numpy(out["x"]), cfg.features.patch_freq, cfg.features.patch_time)
    assert patches.shape[0] == 1 + cfg.data.crops_per_file
    every = torch.arange(patches.shape[1]).expand(patches.shape[0], -1)
    m = MaskGenerator(cfg.masking, cfg.features.grid)(patches.shape[0], np.random.default_rng(1))
    if short_audio == "loop":
        assert constant_fraction(patches, every) == 0.0
        assert constant_fraction(patches, m.target) == constant_fraction(patches, m.context) == 0.0
    else:  # the old way: the short clip is mostly zero padding, which the test must be able to see
        assert constant_fraction(patches[:1], every[:1]) > 0.5


def test_normalisation_stats_ignore_padding_frames():
    from service.features import logmel_stats
    fc = load_config("tiny").features
    rng = np.random.default_rng(0)
    short = (0.1 * rng.standard_normal(fc.clip_samples // 4)).astype(np.float32)
    stats = logmel_stats([short], fc)
    padded = np.zeros(fc.clip_samples, np.float32)
    padded[:len(short)] = short
    spec = LogMel(fc, normalise=False)(torch.from_numpy(padded)[None])[0]
    real = spec[:, :fc.frames_for(len(short))]
    assert stats["features.mean"] == pytest.approx(real.mean().item(), abs=1e-3)
    assert stats["features.mean"] > spec.mean().item() + 1  # padding's log floor would drag it down
    with pytest.raises(ValueError, match="features.mean"):
        LogMel(fc)  # an unset normalisation is an error, never a silent default


def test_readout_layouts_and_dimensions():
    from service.encoder import AudioEncoder, clip_readout, frame_readout
    cfg = small_cfg()
    gf, gt = cfg.features.grid
    tokens = torch.randn(2, gf * gt, cfg.model.width)
    concat = frame_readout(tokens, (gf, gt), "concat")
    assert concat.shape == (2, gt, gf * cfg.model.width)
    # column t of the concat layout is the gf tokens of that column, frequency row by row
    col = tokens.reshape(2, gf, gt, -1)[:, :, 3].reshape(2, -1)
    assert torch.equal(concat[:, 3], col)
    assert torch.allclose(frame_readout(tokens, (gf, gt), "mean"), tokens.reshape(2, gf, gt, -1).mean(1))
    frames = torch.randn(2, 5, 4)
    ms = clip_readout(frames, torch.tensor([5, 2]), "meanstd")
    assert torch.allclose(ms[1, :4], frames[1, :2].mean(0)) and torch.allclose(ms[1, 4:], frames[1, :2].std(0, unbiased=False))
    enc = AudioEncoder(cfg, device="cpu")
    assert enc.frame_dim == gf * cfg.model.width and enc.embedding_dim == 2 * enc.frame_dim
    assert enc.embed(torch.randn(3, cfg.features.clip_samples) * 0.1).shape == (3, enc.embedding_dim)


def test_stored_configs_of_older_models_still_load():
    """Checkpoints and registered models store their config: older layouts migrate, never fail to load."""
    from service.config import config_from_dict
    old = load_config("tiny", STATS).to_dict()
    old["data"].update(s3_endpoint="http://127.0.0.1:9", s3_region="eu-west-1")
    del old["storage"], old["readout"]
    cfg = config_from_dict(old)
    assert (cfg.storage.s3_endpoint, cfg.storage.s3_region) == ("http://127.0.0.1:9", "eu-west-1")
    assert (cfg.readout.frames, cfg.readout.pooling) == ("mean", "mean")  # the readout they were made with
    with pytest.raises(ConfigError, match="storage.s3_endpoint"):  # a user's config is told where the key went
        load_config(old)


def test_features_benchmark_compares_in_one_run(tmp_path):
    from jobs.benchmark import main
    out = tmp_path / "features.json"
    assert main(["features", "--config", "tiny", "--seconds", "0.05", "--set", "train.batch_size=2",
                 "--json", str(out)]) == 0
    res = __import__("json").loads(out.read_text())
    assert res["batch"] == 2 and res["per_clip_clips_per_s"] > 0 and res["batched_clips_per_s"] > 0
    assert res["speedup"] == pytest.approx(res["batched_clips_per_s"] / res["per_clip_clips_per_s"])


def test_gpu_check_runs_on_the_cpu_at_toy_size(tmp_path):
    """`jobs.benchmark gpu` on the CPU: fp32 and CPU bf16, eager and compiled, the device's log-mel and a
    checkpoint restored on the device continuing exactly; compiled blocks keep the eager checkpoint keys."""
    import json

    from jobs.benchmark import main
    from service import checkpoint as ckpt
    from service.worker import WorkerRun
    small = ["--set", "model.width=32", "--set", "model.depth=1", "--set", "model.heads=2", "--set",
             "model.pred_width=32", "--set", "model.pred_depth=1", "--set", "model.pred_heads=2", "--set",
             "train.batch_size=2"]
    out = tmp_path / "gpu.json"
    assert main(["gpu", "--config", "tiny", "--steps", "2", *small, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["nccl_busbw_gbps"] is None
    assert set(res["train"]) == {"fp32", "fp32+compile", "bf16", "bf16+compile"}
    assert all(v["clips_per_s"] > 0 and 0 < v["mfu"] for v in res["train"].values())
    assert res["train"]["fp32+compile"]["loss_max_abs_diff_vs_eager"] < 1e-3  # compiling changes no result
    r = res["resume"]
    assert r["restored_step"] == r["checkpoint_step"] and r["final_step"] == 4
    assert r["losses_equal"] and r["rng_equal"] and r["optimizer_steps_on_cpu"]
    assert res["features_clips_per_s"] > 0
    keys = {}
    for compiled in (False, True):
        cfg = small_cfg(**{"train.compile": compiled})
        run = WorkerRun(cfg, 0, 1, torch.device("cpu"))
        run.save(str(tmp_path / f"c{compiled}"), {})
        keys[compiled] = {part: list(v) for part, v in ckpt.load_state(tmp_path / f"c{compiled}").items()
                          if isinstance(v, dict)}
    assert keys[True] == keys[False]


# --- keeping the rank: SIGReg, clip-level term, context-only corruption ----------------------------
def test_sigreg_is_small_for_gaussian_embeddings_and_large_for_collapsed_ones():
    from service.model import sigreg
    torch.manual_seed(0)
    gaussian = sigreg(torch.randn(2048, 64), slices=128)
    low_rank = sigreg(torch.randn(2048, 2) @ torch.randn(2, 64), slices=128)
    shifted = sigreg(torch.randn(2048, 64) * 0.1 + 1.0, slices=128)  # a small, off-centre cloud
    assert gaussian < 1.0 < min(low_rank, shifted), (gaussian, low_rank, shifted)
    z = torch.randn(256, 32, requires_grad=True)
    sigreg(z * 0.1, slices=16).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    torch.manual_seed(1)
    a = sigreg(z.detach(), 16)
    torch.manual_seed(1)
    assert torch.equal(a, sigreg(z.detach(), 16))  # directions from torch's RNG: reproducible from a checkpoint


def test_sigreg_and_clip_terms_join_the_loss_and_train():
    cfg = small_cfg(**{"loss.sigreg_weight": 0.05, "loss.clip_weight": 1.0})
    torch.manual_seed(0)
    model = AudioJEPA(cfg)
    assert model.predictor.clip_head is not None and AudioJEPA(small_cfg()).predictor.clip_head is None
    p = batch(cfg)
    m = MaskGenerator(cfg.masking, cfg.features.grid)(p.shape[0], np.random.default_rng(0))
    loss, _, parts = model(p, m.context, m.target)
    assert set(parts) == {"jepa_loss", "sigreg_loss", "clip_loss"}
    assert torch.allclose(loss, sum(parts.values()), atol=1e-5)
    loss.backward()
    assert model.predictor.clip_head.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="loss.sigreg_over"):
        small_cfg(**{"loss.sigreg_over": "frames"})
    with pytest.raises(ConfigError, match="loss.clip_weight"):
        small_cfg(**{"loss.clip_weight": -1})


def test_context_corruption_changes_only_what_the_context_encoder_sees():
    from service.augment import corrupt_context, corrupts
    cfg = small_cfg(**{"masking.context_mix": 0.3, "masking.context_warp": 0.05})
    assert corrupts(cfg.masking) and not corrupts(small_cfg().masking)
    fc = cfg.features
    spec = LogMel(fc)(torch.randn(4, fc.clip_samples, generator=torch.Generator().manual_seed(0)) * 0.1)
    view = corrupt_context(spec, cfg.masking, fc, np.random.default_rng(5))
    assert view.shape == spec.shape and torch.isfinite(view).all() and not torch.allclose(view, spec)
    assert torch.equal(view, corrupt_context(spec, cfg.masking, fc, np.random.default_rng(5)))  # seeded
    off = small_cfg(**{"masking.context_mix": 0.0, "masking.context_warp": 0.0}).masking
    assert torch.allclose(corrupt_context(spec, off, fc, np.random.default_rng(5)), spec)
    # mixing is on power: a clip mixed with itself is itself
    same = spec[:1].repeat(2, 1, 1)
    mixed_only = small_cfg(**{"masking.context_mix": 0.5}).masking
    assert torch.allclose(corrupt_context(same, mixed_only, fc, np.random.default_rng(0)), same, atol=1e-4)
    # the targets come from the clean clip; the context encoder's input is the corrupted one
    torch.manual_seed(0)
    model = AudioJEPA(cfg)
    clean = patchify(spec, fc.patch_freq, fc.patch_time)
    seen = patchify(view, fc.patch_freq, fc.patch_time)
    m = MaskGenerator(cfg.masking, fc.grid)(4, np.random.default_rng(0))
    inputs = []
    model.encoder.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
    _, h_clean, _ = model(clean, m.context, m.target)
    _, h_seen, _ = model(clean, m.context, m.target, seen)
    assert torch.equal(h_clean, h_seen)  # the target encoder saw the clean patches both times
    assert torch.equal(inputs[0], clean) and torch.equal(inputs[1], seen)
    with pytest.raises(ConfigError, match="masking.context_mix"):
        small_cfg(**{"masking.context_mix": 1.5})

"""Audio-JEPA: ViT context encoder, EMA target encoder, narrow predictor, latent loss.

Shapes: patches [B, N, P] with N = F*T on the (freq x time) grid; masks give sorted
context indices [B, Nc] and target indices [B, Nt].
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.config import Config, LossConfig, ModelConfig


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [F*T, dim] on a non-square grid (freq, time)."""
    assert dim % 4 == 0, "embedding width must be divisible by 4 for 2-D sin-cos"
    gf, gt = grid
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def axis(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ff, tt = np.meshgrid(np.arange(gf, dtype=np.float64), np.arange(gt, dtype=np.float64), indexing="ij")
    emb = np.concatenate([axis(ff), axis(tt)], axis=1)  # [F*T, dim], row-major over (freq, time)
    return torch.from_numpy(emb).float()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def _init_weights(module: nn.Module, depth_blocks: nn.ModuleList) -> None:
    """Truncated-normal init, then I-JEPA's per-layer rescale of residual projections."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for i, blk in enumerate(depth_blocks, start=1):
        blk.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
        blk.fc2.weight.data.div_(math.sqrt(2.0 * i))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], idx [B, n] -> [B, n, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Encoder(nn.Module):
    """ViT over spectrogram patches; no CLS token. Sees only the patches in `keep` if given."""

    def __init__(self, patch_dim: int, grid: tuple[int, int], cfg: ModelConfig):
        super().__init__()
        self.grid = grid
        self.width = cfg.width
        self.patch_embed = nn.Linear(patch_dim, cfg.width)
        self.register_buffer("pos", sincos_2d(cfg.width, grid), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        _init_weights(self, self.blocks)

    def forward(self, patches: torch.Tensor, keep: torch.Tensor | None = None, layers: int = 1) -> torch.Tensor:
        """Tokens after the final norm; `layers` > 1 averages the normed outputs of the last `layers` blocks."""
        out = [self.norm(x) for x in self.block_outputs(patches, keep, layers)]
        return out[0] if len(out) == 1 else torch.stack(out).mean(0)

    def block_outputs(self, patches: torch.Tensor, keep: torch.Tensor | None = None, layers: int = 1) -> list:
        """The residual stream after each of the last `layers` blocks (before the final norm)."""
        x = self.patch_embed(patches)
        pos = self.pos.unsqueeze(0).expand(x.shape[0], -1, -1)
        if keep is not None:
            x, pos = gather_tokens(x, keep), gather_tokens(pos, keep)
        x = x + pos
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - layers:
                out.append(x)
        return out


class Predictor(nn.Module):
    """Narrow transformer: context tokens + one mask token per target position -> target latents."""

    def __init__(self, grid: tuple[int, int], cfg: ModelConfig, clip_head: bool = False):
        super().__init__()
        # loss.clip_weight: the context's mean token -> the clip's mean target (kept here, so checkpoints carry it)
        self.clip_head = nn.Linear(cfg.width, cfg.width) if clip_head else None
        self.embed = nn.Linear(cfg.width, cfg.pred_width)
        self.mask_token = nn.Parameter(torch.zeros(cfg.pred_width))
        self.register_buffer("pos", sincos_2d(cfg.pred_width, grid), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.pred_width, cfg.pred_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.pred_depth))
        self.norm = nn.LayerNorm(cfg.pred_width, eps=1e-6)
        self.proj = nn.Linear(cfg.pred_width, cfg.width)
        _init_weights(self, self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, z_ctx: torch.Tensor, ctx: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        b = z_ctx.shape[0]
        pos = self.pos.unsqueeze(0).expand(b, -1, -1)
        x = self.embed(z_ctx) + gather_tokens(pos, ctx)
        m = self.mask_token.to(x.dtype) + gather_tokens(pos, tgt)
        x = torch.cat([x, m], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x[:, ctx.shape[1]:]))


def autocast(device: torch.device, precision: str = "auto"):
    """A train step's mixed precision: bf16 autocast on `device` (`precision` bf16, or auto on CUDA), else
    off.  One code path for every device type, so the CPU runs (and tests) what a GPU runs."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def fp32(t: torch.Tensor):
    """Autocast off on `t`'s device: what is sensitive to rounding (losses, target normalisation, the
    covariance) runs in fp32 inside a bf16 step."""
    return torch.autocast(t.device.type, enabled=False)


def jepa_loss(pred: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Mean over target patches. l2 = ||p - t||^2 / D; smooth_l1 (I-JEPA); cosine = 2 - 2 cos (Audio-JEPA)."""
    with fp32(pred):
        pred, target = pred.float(), target.float()
        if cfg.kind == "l2":
            return (pred - target).pow(2).mean()
        if cfg.kind == "smooth_l1":
            return F.smooth_l1_loss(pred, target)
        return (2 - 2 * F.cosine_similarity(pred, target, dim=-1)).mean()


def sigreg(z: torch.Tensor, slices: int, knots: int = 17, t_max: float = 3.0) -> torch.Tensor:
    """SIGReg (LeJEPA, Balestriero & LeCun 2025): the Epps-Pulley statistic of `slices` random unit projections
    of z [.., D] against N(0, 1), averaged: n * integral over t of |phi_n(t) - exp(-t^2/2)|^2 exp(-t^2/2), with
    phi_n the projections' empirical characteristic function (trapezoid rule on [-t_max, t_max], symmetric).
    0 for isotropic standard Gaussian embeddings; large for collapsed or low-rank ones.  Directions come from
    torch's RNG, which checkpoints carry, so a resumed run draws the same ones."""
    with fp32(z):
        z = z.float().reshape(-1, z.shape[-1])
        directions = torch.randn(z.shape[-1], slices, device=z.device)
        x = z @ (directions / directions.norm(dim=0, keepdim=True))  # [n, slices]
        t = torch.linspace(0, t_max, knots, device=z.device)
        gauss = torch.exp(-t.pow(2) / 2)
        tx = x.unsqueeze(-1) * t  # [n, slices, knots]
        err = (torch.cos(tx).mean(0) - gauss).pow(2) + torch.sin(tx).mean(0).pow(2)
        return (z.shape[0] * 2 * torch.trapezoid(err * gauss, t, dim=-1)).mean()


def variance_covariance(z: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """VICReg's anti-collapse terms over tokens [.., D]: every channel keeps a std of 1 and channels decorrelate."""
    with fp32(z):
        z = z.float().reshape(-1, z.shape[-1])
        z = z - z.mean(0)
        std = torch.sqrt(z.var(0) + 1e-4)
        cov = (z.T @ z) / (z.shape[0] - 1)
        off = cov - torch.diag(torch.diag(cov))
        return cfg.var_weight * F.relu(1 - std).mean() + cfg.cov_weight * off.pow(2).sum() / z.shape[-1]


class AudioJEPA(nn.Module):
    """Context encoder + predictor (trained) and EMA target encoder (no gradients)."""

    def __init__(self, cfg: Config):
        super().__init__()
        fc = cfg.features
        grid, patch_dim = fc.grid, fc.patch_freq * fc.patch_time
        self.loss_cfg = cfg.loss
        self.encoder = Encoder(patch_dim, grid, cfg.model)
        self.predictor = Predictor(grid, cfg.model, clip_head=cfg.loss.clip_weight > 0)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_encoder.requires_grad_(False)

    @torch.no_grad()
    def targets(self, patches: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(regression targets [B, N, D] — [B, n, D] for the patches in `keep` — and the target-encoder tokens
        after its final norm, for collapse monitors)."""
        c, enc = self.loss_cfg, self.target_encoder
        outs = enc.block_outputs(patches, keep, layers=min(c.target_layers, len(enc.blocks)))
        with fp32(patches):  # the targets' normalisation in fp32 inside a bf16 step
            outs = [o.float() for o in outs]
            h = enc.norm(outs[-1])
            if c.target_norm == "instancenorm":  # per clip and channel over tokens, per block, then averaged
                t = torch.stack([F.instance_norm(o.transpose(1, 2)).transpose(1, 2) for o in outs]).mean(0)
            else:
                t = torch.stack([enc.norm(o) for o in outs]).mean(0) if len(outs) > 1 else h
                t = F.layer_norm(t, t.shape[-1:]) if c.target_norm == "layernorm" else t
        return t, h

    def forward(self, patches: torch.Tensor, ctx: torch.Tensor, tgt: torch.Tensor,
                context_patches: torch.Tensor | None = None):
        """Returns (loss, target-encoder tokens for collapse monitors ([B, N, D]; with `target_view: masked` only the
        target patches', [k*B, Nt, D]), the loss's parts, detached, when any term beside the JEPA loss is on:
        jepa_loss and vc_loss / sigreg_loss / clip_loss, else {}).

        `context_patches` (same shape as `patches`): what the context encoder sees instead of the clean patches
        (context-only corruption, M2D-X); the targets always come from the clean ones.

        `ctx`/`tgt` may hold k masks per clip ([k*B, …], clip-major): the target encoder runs once per clip
        and the context encoder + predictor once per mask (EAT's multi-mask). With `loss.target_view: masked`
        the target encoder sees only each mask's target patches (M2D), so it runs once per mask."""
        c, k = self.loss_cfg, ctx.shape[0] // patches.shape[0]
        seen = patches if context_patches is None else context_patches
        if k > 1:
            seen = seen.repeat_interleave(k, 0)
        if c.target_view == "masked":
            patches = patches.repeat_interleave(k, 0) if k > 1 else patches
            t, h = self.targets(patches, tgt)
        else:
            t, h = self.targets(patches)
            t = gather_tokens(t.repeat_interleave(k, 0) if k > 1 else t, tgt)
        z = self.encoder(seen, ctx)
        pred = self.predictor(z, ctx, tgt)
        loss = jepa_loss(pred, t, c)
        extra = {}
        if c.var_weight or c.cov_weight:
            extra["vc_loss"] = variance_covariance(z.mean(1) if c.vc_over == "clips" else z, c)
        if c.sigreg_weight:
            extra["sigreg_loss"] = c.sigreg_weight * sigreg(z.mean(1) if c.sigreg_over == "clips" else z,
                                                            c.sigreg_slices)
        if c.clip_weight:
            clip = self.predictor.clip_head(z.mean(1))
            extra["clip_loss"] = c.clip_weight * jepa_loss(clip.unsqueeze(1), t.mean(1, keepdim=True), c)
        if not extra:
            return loss, h.detach(), {}
        parts = {"jepa_loss": loss.detach(), **{name: v.detach() for name, v in extra.items()}}
        return loss + sum(extra.values()), h.detach(), parts

    @torch.no_grad()
    def ema_update(self, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online, for every parameter."""
        t = [p for p in self.target_encoder.parameters()]
        o = [p.detach() for p in self.encoder.parameters()]
        torch._foreach_lerp_(t, o, 1.0 - tau)


def compile_blocks(model: AudioJEPA) -> None:
    """`train.compile`: torch.compile every transformer block (encoder, target encoder, predictor) in place,
    where nearly all the FLOPs are.  In place (`nn.Module.compile`), so parameter names, checkpoints and the
    EMA are exactly the eager model's."""
    for part in (model.encoder, model.target_encoder, model.predictor):
        for block in part.blocks:
            block.compile()


@torch.no_grad()
def collapse_stats(h: torch.Tensor, max_tokens: int = 1024) -> dict[str, float]:
    """Std across tokens (mean over dims) and effective rank (exp entropy of singular values)."""
    x = h.reshape(-1, h.shape[-1]).float()
    if x.shape[0] > max_tokens:
        x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]
    std = x.std(dim=0).mean().item()
    s = torch.linalg.svdvals(x - x.mean(dim=0))
    p = s / s.sum().clamp_min(1e-12)
    erank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).item()
    return {"target_std": std, "target_erank": erank}


def model_flops_per_clip(cfg: Config, n_ctx: int, n_tgt: int) -> float:
    """Matmul FLOPs of one training step per clip (fwd target + fwd/bwd context & predictor)."""
    m, fc = cfg.model, cfg.features
    n_all = fc.grid[0] * fc.grid[1]
    pd = fc.patch_freq * fc.patch_time

    def vit(n: int, d: int, depth: int, ratio: float) -> float:
        per_layer = 2 * n * (4 * d * d + 2 * d * int(d * ratio)) + 4 * n * n * d
        return depth * per_layer

    tgt_fwd = vit(n_all, m.width, m.depth, m.mlp_ratio) + 2 * n_all * pd * m.width
    ctx_fwd = vit(n_ctx, m.width, m.depth, m.mlp_ratio) + 2 * n_ctx * pd * m.width
    n_p = n_ctx + n_tgt
    pred_fwd = vit(n_p, m.pred_width, m.pred_depth, m.mlp_ratio) + 2 * n_ctx * m.width * m.pred_width \
        + 2 * n_tgt * m.pred_width * m.width
    return tgt_fwd + 3 * (ctx_fwd + pred_fwd)

"""Controls for reading a pretraining gain honestly, beside the random init (`service.evaluate`, the study):

  blend       the online encoder mixed with its random init at the weight the EMA target still holds on
              the init, the product of every step's tau: what the target encoder would be if training had
              only moved the online weights and the EMA had blended them in.  A gain that blending alone
              explains is not learning.
  projection  no network: a fixed random projection of each normalised log-mel patch to the model width,
              read out like the encoder's tokens.  What any random feature map of the patches gives.

Both are `AudioEncoder`s, so they go through the one readout and the same probes as every model.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from service import checkpoint as ckpt
from service.config import Config
from service.encoder import AudioEncoder, random_encoder
from service.optim import tau_at


def init_weight(cfg: Config, steps: int) -> float:
    """The weight the EMA target still holds on the init after `steps` updates: the product of the taus."""
    return math.exp(sum(math.log(max(tau_at(s, cfg.train.steps, cfg.ema), 1e-300)) for s in range(1, steps + 1)))


def blend_encoder(state: dict, device=None) -> AudioEncoder:
    """A checkpoint's online encoder blended with the same-seed random init at `init_weight` (skipped steps,
    which made no EMA update, are counted as updates: a slight overestimate of the blend's init share)."""
    cfg = ckpt.config_of(state)
    p = init_weight(cfg, int(state["step"]))
    init = random_encoder(cfg, seed=cfg.seed, device="cpu").encoder.state_dict()
    mixed = {k: p * init[k] + (1 - p) * v if v.is_floating_point() else v for k, v in state["encoder"].items()}
    return AudioEncoder(cfg, mixed, device, f"blend(p_init={p:.4f})")


class PatchProjection(nn.Module):
    """Tokens = normalised patches @ a fixed random matrix (no attention, no training): the Encoder's call."""

    def __init__(self, patch_dim: int, width: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(patch_dim, width, generator=g) / math.sqrt(patch_dim))

    def forward(self, patches: torch.Tensor, keep: torch.Tensor | None = None, layers: int = 1) -> torch.Tensor:
        return patches @ self.weight


def projection_encoder(cfg: Config, seed: int = 0, device=None) -> AudioEncoder:
    """The no-network baseline as an AudioEncoder (its digest covers the projection matrix)."""
    enc = AudioEncoder(cfg, None, device, "projection")
    fc = cfg.features
    enc.encoder = PatchProjection(fc.patch_freq * fc.patch_time, cfg.model.width, seed).to(enc.device)
    return enc

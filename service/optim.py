"""AdamW with weight-decay exclusion, and the step-indexed schedules (LR, WD, EMA tau).

Every schedule is a pure function of the global step and `train.steps`, so a resumed run
continues exactly where it stopped and tau reaches tau_end at the last step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from service.config import Config, EmaConfig, OptimConfig


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup to cfg.lr, then cosine down to cfg.min_lr at `total`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total - cfg.warmup_steps, 1)
    p = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * p))


def wd_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Cosine rise from weight_decay to weight_decay_end (I-JEPA)."""
    p = min(step / max(total, 1), 1.0)
    return cfg.weight_decay_end + 0.5 * (cfg.weight_decay - cfg.weight_decay_end) * (1 + math.cos(math.pi * p))


def tau_at(step: int, total: int, cfg: EmaConfig) -> float:
    """EMA momentum by step: tau_start at step 0, tau_end at step `total`."""
    p = min(step / max(total, 1), 1.0)
    if cfg.schedule == "linear":
        return cfg.tau_start + (cfg.tau_end - cfg.tau_start) * p
    return cfg.tau_end - (cfg.tau_end - cfg.tau_start) * 0.5 * (1 + math.cos(math.pi * p))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Two groups: weights decay; biases, norms and the mask token do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "decays": True},
              {"params": no_decay, "weight_decay": 0.0, "decays": False}]
    # foreach: one multi-tensor kernel per group (PyTorch's CPU default is a Python loop over tensors)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=True)


def apply_schedules(opt: torch.optim.Optimizer, step: int, cfg: Config) -> dict[str, float]:
    lr = lr_at(step, cfg.train.steps, cfg.optim)
    wd = wd_at(step, cfg.train.steps, cfg.optim)
    for g in opt.param_groups:
        g["lr"] = lr
        g["weight_decay"] = wd if g.get("decays", True) else 0.0
    return {"lr": lr, "wd": wd}

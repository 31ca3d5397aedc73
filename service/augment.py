"""Context-only corruption (M2D-X): the context encoder sees a harder view of the clip than the one its
targets come from, so it cannot succeed by copying surface detail.

Two corruptions of the normalised log-mel, each a function of a seeded RNG (a resumed run draws the same):
a batch-mate's power spectrum mixed in at a weight drawn from U[0, masking.context_mix] (mixing is done on
power, not on log-mel), and the mel axis stretched about its centre by a factor in
[1 - masking.context_warp, 1 + masking.context_warp] (linear interpolation, edges held).
"""
from __future__ import annotations

import numpy as np
import torch

from service.config import FeaturesConfig, MaskingConfig


def corrupts(masking: MaskingConfig) -> bool:
    return masking.context_mix > 0 or masking.context_warp > 0


@torch.no_grad()
def corrupt_context(spec: torch.Tensor, masking: MaskingConfig, fc: FeaturesConfig,
                    rng: np.random.Generator) -> torch.Tensor:
    """[B, mels, frames] normalised log-mel -> the context view (a new tensor; `spec` is untouched)."""
    b, mels, _ = spec.shape
    out = spec.float()
    if masking.context_mix > 0 and b > 1:
        weight = torch.as_tensor(rng.uniform(0, masking.context_mix, b), dtype=torch.float32,
                                 device=spec.device).view(b, 1, 1)
        power = torch.exp(out * fc.std + fc.mean)
        mixed = (1 - weight) * power + weight * power.roll(1, dims=0)  # each clip with its neighbour in the batch
        out = (torch.log(mixed) - fc.mean) / fc.std
    if masking.context_warp > 0:
        factor = torch.as_tensor(1 + rng.uniform(-masking.context_warp, masking.context_warp, b),
                                 dtype=torch.float32, device=spec.device).view(b, 1)
        centre = (mels - 1) / 2
        source = ((torch.arange(mels, device=spec.device) - centre) / factor + centre).clamp(0, mels - 1)  # [B, mels]
        low = source.floor().long()
        high = (low + 1).clamp(max=mels - 1)
        frac = (source - low).unsqueeze(-1)
        pick = lambda i: torch.gather(out, 1, i.unsqueeze(-1).expand(-1, -1, out.shape[-1]))  # noqa: E731
        out = pick(low) * (1 - frac) + pick(high) * frac
    return out.to(spec.dtype)

"""Mask geometries on the (freq x time) patch grid: which patches are context, which are targets.

One interface, four geometries.  Every sample of a batch gets the same number of context and
target patches (dense batches, no truncation to the batch's smallest mask), the target count is
exactly round(ratio * N) (or whole stripes for time/freq), and context and targets never overlap.
Blocks and stripes are placed so that every cell, edges included, is equally likely to be covered:
the start is drawn from [-(size-1), grid-1] and the block is clipped to the grid (I-JEPA's
collator never reaches the last row/column and over-covers the centre).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from service.config import MaskingConfig

GEOMETRIES = ("unstructured", "multiblock", "time", "freq")


@dataclass
class Masks:
    context: torch.Tensor  # [B, Nc] long, sorted patch indices (freq_row * n_time + time_col)
    target: torch.Tensor   # [B, Nt] long, sorted
    n_patches: int

    @property
    def ratio(self) -> float:
        """Achieved target fraction of the grid."""
        return self.target.shape[1] / self.n_patches


class MaskGenerator:
    """Callable: (batch_size, numpy Generator) -> Masks for the configured geometry."""

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int]):
        self.cfg = cfg
        self.F, self.T = grid
        self.N = self.F * self.T
        if self.N - cfg.min_keep < 1:
            raise ValueError(f"grid {grid} too small for masking.min_keep={cfg.min_keep}")

    def __call__(self, batch_size: int, rng: np.random.Generator) -> Masks:
        lo, hi = self.cfg.ratio_range()
        ratio = rng.uniform(lo, hi)
        fn = {"unstructured": self._unstructured, "multiblock": self._multiblock,
              "time": self._stripes, "freq": self._stripes}[self.cfg.geometry]
        ctx, tgt = fn(batch_size, ratio, rng)
        return Masks(torch.from_numpy(ctx).long(), torch.from_numpy(tgt).long(), self.N)

    def _n_target(self, ratio: float) -> int:
        return int(min(max(round(ratio * self.N), 1), self.N - self.cfg.min_keep))

    # --- geometries -------------------------------------------------------------------
    def _unstructured(self, b: int, ratio: float, rng: np.random.Generator):
        k = self._n_target(ratio)
        order = np.argsort(rng.random((b, self.N)), axis=1)
        return np.sort(order[:, k:], axis=1), np.sort(order[:, :k], axis=1)

    def _multiblock(self, b: int, ratio: float, rng: np.random.Generator):
        c = self.cfg
        k = self._n_target(ratio)
        h, w = _block_shape(rng.uniform(*c.block_scale) * self.N, rng.uniform(*c.block_aspect), self.F, self.T)
        keep = rng.uniform(*c.context_scale)
        n_ctx = max(c.min_keep, int(round(keep * (self.N - k))))
        hc, wc = _block_shape(keep * self.N, 1.0, self.F, self.T)
        ctx_out = np.empty((b, n_ctx), dtype=np.int64)
        tgt_out = np.empty((b, k), dtype=np.int64)
        for i in range(b):
            tgt = np.zeros((self.F, self.T), dtype=bool)
            _fill_blocks(tgt, k, lambda: (h, w), rng)
            # context block (kept inside the grid), minus targets, topped up to n_ctx
            top, left = rng.integers(0, self.F - hc + 1), rng.integers(0, self.T - wc + 1)
            block = np.zeros_like(tgt)
            block[top:top + hc, left:left + wc] = True
            tgt_flat = tgt.ravel()
            inside = np.flatnonzero(block.ravel() & ~tgt_flat)
            if len(inside) >= n_ctx:
                ctx = rng.choice(inside, n_ctx, replace=False)
            else:
                outside = np.flatnonzero(~block.ravel() & ~tgt_flat)
                ctx = np.concatenate([inside, rng.choice(outside, n_ctx - len(inside), replace=False)])
            ctx_out[i] = np.sort(ctx)
            tgt_out[i] = np.flatnonzero(tgt_flat)
        return ctx_out, tgt_out

    def _stripes(self, b: int, ratio: float, rng: np.random.Generator):
        along_time = self.cfg.geometry == "time"
        length, across = (self.T, self.F) if along_time else (self.F, self.T)
        max_lines = length - math.ceil(self.cfg.min_keep / across)
        n_lines = int(min(max(round(ratio * length), 1), max_lines))
        if max_lines < 1:
            raise ValueError(f"grid {(self.F, self.T)} too small for {self.cfg.geometry} masking")
        lo, hi = self.cfg.stripe_width
        ctx_out = np.empty((b, (length - n_lines) * across), dtype=np.int64)
        tgt_out = np.empty((b, n_lines * across), dtype=np.int64)
        for i in range(b):
            line = np.zeros((1, length), dtype=bool)
            _fill_blocks(line, n_lines, lambda: (1, int(rng.integers(lo, hi + 1))), rng)
            grid = np.broadcast_to(line, (across, length))
            grid = grid if along_time else grid.T  # -> (F, T)
            flat = grid.ravel()
            tgt_out[i] = np.flatnonzero(flat)
            ctx_out[i] = np.flatnonzero(~flat)
        return ctx_out, tgt_out


def _block_shape(area: float, aspect: float, F: int, T: int) -> tuple[int, int]:
    """(height, width) in patches for an area and aspect = height/width, clipped to the grid."""
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    return min(max(h, 1), F), min(max(w, 1), T)


def _fill_blocks(mask: np.ndarray, k: int, shape, rng: np.random.Generator) -> None:
    """Place blocks (uniform cell coverage, clipped at edges) until exactly k cells are set."""
    rows, cols = mask.shape
    while True:
        h, w = shape()
        top = int(rng.integers(-(h - 1), rows))
        left = int(rng.integers(-(w - 1), cols))
        new = np.zeros_like(mask)
        new[max(top, 0):top + h, max(left, 0):left + w] = True
        new &= ~mask
        have, add = int(mask.sum()), int(new.sum())
        if have + add <= k:
            mask |= new
        else:  # the last block only partly: keep k - have of its new cells
            cells = np.flatnonzero(new.ravel())
            keep = rng.choice(cells, k - have, replace=False)
            mask.ravel()[keep] = True
        if mask.sum() >= k:
            return


def render_masks(spec: torch.Tensor, grid: tuple[int, int], patch: tuple[int, int],
                 cfg: MaskingConfig, path: str, seed: int = 0,
                 geometries: tuple[str, ...] = GEOMETRIES) -> str:
    """PNG: the spectrogram once per geometry, context patches tinted blue, targets red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dataclasses import replace

    spec = spec.detach().cpu().float().numpy()
    fig, axes = plt.subplots(len(geometries), 1, figsize=(10, 2.3 * len(geometries)), squeeze=False)
    for ax, geom in zip(axes[:, 0], geometries):
        m = MaskGenerator(replace(cfg, geometry=geom), grid)(1, np.random.default_rng(seed))
        ax.imshow(spec, origin="lower", aspect="auto", cmap="gray")
        overlay = np.zeros((*grid, 4))
        for idx, colour in ((m.context[0], (0.1, 0.4, 1.0, 0.35)), (m.target[0], (1.0, 0.15, 0.1, 0.55))):
            for j in idx.tolist():
                overlay[j // grid[1], j % grid[1]] = colour
        ax.imshow(overlay, origin="lower", aspect="auto", interpolation="nearest",
                  extent=(-0.5, grid[1] * patch[1] - 0.5, -0.5, grid[0] * patch[0] - 0.5))
        ax.set_title(f"{geom}: {m.context.shape[1]} context (blue), {m.target.shape[1]} target (red) "
                     f"of {m.n_patches}; ratio {m.ratio:.2f}", fontsize=9)
        ax.set_ylabel("mel bin")
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

"""Training checkpoints: one directory with `state.pt` (tensors and plain values only, loaded with
weights_only=True), the resolved `config.yaml`, and `COMPLETE` (sha256 of state.pt) written last.

A directory without a matching COMPLETE marker is never loaded: a crash mid-save cannot leave a
checkpoint that looks valid.  Ray Train copies the finished directory to `storage_path` and keeps
the `checkpoint.keep` most recent.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from service.config import Config, config_from_dict, to_yaml

STATE, MARKER, CONFIG = "state.pt", "COMPLETE", "config.yaml"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(directory: str | Path, cfg: Config, model, optimizer, step: int, epoch: int,
         metrics: dict | None = None) -> Path:
    """Write a complete checkpoint into `directory` (created; must be fresh or empty)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {
        "format": 1,
        "step": int(step),
        "epoch": int(epoch),
        "encoder": model.encoder.state_dict(),
        "predictor": model.predictor.state_dict(),
        "target_encoder": model.target_encoder.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "torch_rng": torch.get_rng_state(),
        "config": json.dumps(cfg.to_dict()),
    }
    tmp = d / (STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, d / STATE)
    (d / CONFIG).write_text(to_yaml(cfg))
    metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
    (d / MARKER).write_text(json.dumps({"sha256": _sha256(d / STATE), "step": int(step), "epoch": int(epoch),
                                        "metrics": metrics}))
    return d


def load_state(directory: str | Path, map_location="cpu") -> dict:
    """Verified state dict of a checkpoint directory (raises CheckpointError if incomplete/corrupt)."""
    d = Path(directory)
    marker = d / MARKER
    if not marker.exists() or not (d / STATE).exists():
        raise CheckpointError(f"{d} is not a complete checkpoint (missing {MARKER} or {STATE})")
    expected = json.loads(marker.read_text())["sha256"]
    if _sha256(d / STATE) != expected:
        raise CheckpointError(f"{d}/{STATE} does not match its {MARKER} checksum (corrupt or partial write)")
    return torch.load(d / STATE, map_location=map_location, weights_only=True)


def read_marker(checkpoint) -> dict:
    """The COMPLETE marker (step, epoch, metrics) of a ray.train.Checkpoint, without loading state.pt."""
    fs, path = checkpoint.filesystem, checkpoint.path
    with fs.open_input_stream(f"{path}/{MARKER}") as f:
        return json.loads(f.read())


def config_of(state: dict) -> Config:
    return config_from_dict(json.loads(state["config"]))


def restore(state: dict, model, optimizer=None) -> tuple[int, int]:
    """Load weights (and optimiser) into an unwrapped AudioJEPA; returns (step, epoch)."""
    model.encoder.load_state_dict(state["encoder"])
    model.predictor.load_state_dict(state["predictor"])
    model.target_encoder.load_state_dict(state["target_encoder"])
    if optimizer is not None and state["optimizer"]:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), int(state["epoch"])


def fingerprint(model, optimizer=None) -> dict[str, float]:
    """Order-sensitive checksums of weights and optimiser state (to prove a resume is exact)."""
    def tensor_sum(tensors) -> float:
        total = 0.0
        for i, t in enumerate(tensors):
            if torch.is_tensor(t) and t.is_floating_point():
                total += float(t.detach().double().sum()) * (1 + (i % 7) * 1e-3)
        return total
    out = {"encoder": tensor_sum(model.encoder.state_dict().values()),
           "predictor": tensor_sum(model.predictor.state_dict().values()),
           "target_encoder": tensor_sum(model.target_encoder.state_dict().values())}
    if optimizer is not None:
        st = optimizer.state_dict()["state"]
        out["optimizer"] = tensor_sum(v for k in sorted(st) for v in st[k].values())
    return out


def latest_checkpoint(cfg: Config) -> str | None:
    """The newest complete checkpoint directory of a run in its storage path (local or s3://)."""
    import pyarrow.fs as pafs

    from service.storage import resolve, uri_for
    fs, root = resolve(cfg.run_dir, cfg.storage.s3_endpoint, cfg.storage.s3_region)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except (FileNotFoundError, OSError):
        return None
    dirs = sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    for d in reversed(dirs):
        if fs.get_file_info(f"{d}/{MARKER}").type == pafs.FileType.File:
            return uri_for(d, cfg.checkpoint.storage_path)
    return None

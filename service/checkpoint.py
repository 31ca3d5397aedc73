"""Training checkpoints: one directory with `state.pt` (tensors and plain values only, loaded with
weights_only=True), the resolved `config.yaml`, and `COMPLETE` (sha256 of state.pt) written last.

A directory without a matching COMPLETE marker is never loaded: a crash mid-save cannot leave a
checkpoint that looks valid.  A state with a non-finite tensor is never written, and a damaged
newest checkpoint gives way to the previous one that still verifies.  Ray Train copies the finished directory to `storage_path` and keeps
the `checkpoint.keep` most recent.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

import torch

from service.config import Config, config_from_dict, to_yaml
from service.storage import read_bytes, resolve, uri_for, write_bytes

STATE, MARKER, CONFIG, DAMAGED = "state.pt", "COMPLETE", "config.yaml", "DAMAGED"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def nonfinite_tensors(model, optimizer=None) -> list[str]:
    """Names of weights / optimiser tensors holding NaN or inf (empty when the state is safe to save)."""
    named = [(f"{part}.{k}", v) for part in ("encoder", "predictor", "target_encoder")
             for k, v in getattr(model, part).state_dict().items()]
    if optimizer is not None:
        named += [(f"optimizer.{i}.{k}", v) for i, st in optimizer.state_dict()["state"].items() for k, v in st.items()]
    return [k for k, v in named if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def save(directory: str | Path, cfg: Config, model, optimizer, step: int, epoch: int,
         metrics: dict | None = None, skipped_steps: int = 0, data_position: int = 0,
         data_digests: list[int] | None = None) -> Path:
    """Write a complete checkpoint into `directory` (created; must be fresh or empty); refuses non-finite state.

    `data_position`: clips each rank has consumed (a prepared corpus resumes there exactly);
    `data_digests`: each rank's checksum of the clip ids it consumed, in order."""
    bad = nonfinite_tensors(model, optimizer)
    if bad:
        raise CheckpointError(f"refusing to checkpoint step {step}: non-finite values in {', '.join(bad[:5])}"
                              + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
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
        "skipped_steps": int(skipped_steps),
        "data_position": int(data_position),
        "data_digests": [int(d) for d in (data_digests or [])],
        "config": json.dumps(cfg.to_dict()),
    }
    tmp = d / (STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, d / STATE)
    (d / CONFIG).write_text(to_yaml(cfg))
    metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
    (d / MARKER).write_text(json.dumps({"sha256": _sha256(d / STATE), "step": int(step), "epoch": int(epoch),
                                        "data_position": int(data_position), "metrics": metrics}))
    return d


def load_state(directory: str | Path) -> dict:
    """Verified state dict of a checkpoint directory, on the CPU (raises CheckpointError if incomplete/corrupt).

    Always the CPU: `restore` lets `load_state_dict` place each tensor where the model and optimiser want
    it; loaded straight onto a GPU, the RNG state would be a CUDA tensor `torch.set_rng_state` refuses."""
    d = Path(directory)
    marker = d / MARKER
    if not marker.exists() or not (d / STATE).exists():
        raise CheckpointError(f"{d} is not a complete checkpoint (missing {MARKER} or {STATE})")
    try:
        expected = json.loads(marker.read_text())["sha256"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{marker} is unreadable ({e}): incomplete checkpoint") from e
    if _sha256(d / STATE) != expected:
        raise CheckpointError(f"{d}/{STATE} does not match its {MARKER} checksum (corrupt or partial write)")
    return torch.load(d / STATE, map_location="cpu", weights_only=True)


def load_uri(uri: str, endpoint: str | None = None, region: str | None = None) -> dict:
    """Verified state of a checkpoint directory, local or s3:// (state.pt and its marker fetched first)."""
    if not uri.startswith("s3://"):
        return load_state(uri)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (STATE, MARKER):
            try:
                Path(tmp, name).write_bytes(read_bytes(f"{uri.rstrip('/')}/{name}", endpoint, region))
            except FileNotFoundError:
                raise CheckpointError(f"{uri} is not a complete checkpoint (missing {name})") from None
        return load_state(tmp)


def read_marker(checkpoint) -> dict:
    """The COMPLETE marker (step, epoch, metrics) of a ray.train.Checkpoint, without loading state.pt."""
    fs, path = checkpoint.filesystem, checkpoint.path
    with fs.open_input_stream(f"{path}/{MARKER}") as f:
        return json.loads(f.read())


def config_of(state: dict) -> Config:
    return config_from_dict(json.loads(state["config"]))


def restore(state: dict, model, optimizer=None) -> tuple[int, int]:
    """Load weights (and optimiser) into an unwrapped AudioJEPA on any device; returns (step, epoch).

    Weights and AdamW moments go to the parameters' device; AdamW's `step` counters stay on the CPU
    (torch keeps them there unless the optimiser is fused or capturable: on a GPU they would add a host
    sync to every step); the RNG state stays a CPU ByteTensor."""
    model.encoder.load_state_dict(state["encoder"])
    model.predictor.load_state_dict(state["predictor"])
    model.target_encoder.load_state_dict(state["target_encoder"])
    if optimizer is not None and state["optimizer"]:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"].cpu())
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


def checkpoint_dirs(cfg: Config) -> list[str]:
    """A run's checkpoint directories (local or s3:// URIs), newest first, verified or not."""
    fs, root = resolve(cfg.run_dir, cfg.storage.s3_endpoint, cfg.storage.s3_region)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except (FileNotFoundError, OSError):
        return []
    dirs = sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    return [uri_for(d, cfg.checkpoint.storage_path) for d in reversed(dirs)]


def latest(cfg: Config) -> tuple[str, dict] | None:
    """(uri, marker) of the run's newest checkpoint with a readable COMPLETE marker and no DAMAGED note,
    without reading its state: the one resume point that the driver, the dataset factories and the
    workers share.  Its bytes are verified by the driver before a run starts (`verify_latest`) and
    by whoever loads it (`load_uri`)."""
    st = cfg.storage
    for d in checkpoint_dirs(cfg):
        try:
            marker = json.loads(read_bytes(f"{d.rstrip('/')}/{MARKER}", st.s3_endpoint, st.s3_region, retries=2))
        except (OSError, ValueError):  # no marker (a checkpoint being written) or an unreadable one
            continue
        try:
            note = json.loads(read_bytes(f"{d.rstrip('/')}/{DAMAGED}", st.s3_endpoint, st.s3_region, retries=1))
        except (OSError, ValueError):
            return d, marker
        if note.get("sha256") != marker.get("sha256"):  # a note about bytes since overwritten: void
            return d, marker
    return None


def verify(uri: str, marker: dict, endpoint: str | None = None, region: str | None = None) -> None:
    """Stream a checkpoint's state.pt through sha256 against its marker (no torch.load, constant memory)."""
    fs, path = resolve(f"{uri.rstrip('/')}/{STATE}", endpoint, region)
    h = hashlib.sha256()
    try:
        with fs.open_input_stream(path) as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"{uri} is not a complete checkpoint (missing {STATE})") from None
    if h.hexdigest() != marker.get("sha256"):
        raise CheckpointError(f"{uri}/{STATE} does not match its {MARKER} checksum (corrupt or partial write)")


def mark_damaged(cfg: Config, uri: str, reason: str) -> None:
    """A DAMAGED note in the checkpoint directory, naming the marker it judged: every later lookup passes
    over the checkpoint until a new one is written under the same name."""
    st = cfg.storage
    try:
        sha = json.loads(read_bytes(f"{uri.rstrip('/')}/{MARKER}", st.s3_endpoint, st.s3_region))["sha256"]
    except (OSError, ValueError, KeyError):
        sha = None
    write_bytes(f"{uri.rstrip('/')}/{DAMAGED}", json.dumps({"sha256": sha, "reason": reason}).encode(),
                st.s3_endpoint, st.s3_region)


def verify_latest(cfg: Config, log=print) -> tuple[str, dict] | None:
    """(uri, marker) of the newest checkpoint whose bytes match its marker; each newer one that does not is
    noted DAMAGED and logged.  None when the run has none; CheckpointError when it has checkpoints and
    none verifies (starting afresh would silently lose them)."""
    problems = []
    while (found := latest(cfg)) is not None:
        uri, marker = found
        try:
            verify(uri, marker, cfg.storage.s3_endpoint, cfg.storage.s3_region)
            return found
        except CheckpointError as e:
            problems.append(str(e))
            log(f"checkpoint {uri} is damaged ({e}); passing over it to the previous one")
            mark_damaged(cfg, uri, str(e))
    if problems:
        raise CheckpointError(f"run {cfg.run_name}: no checkpoint verifies ({'; '.join(problems)})")
    return None


def latest_checkpoint(cfg: Config) -> str | None:
    """The run's newest checkpoint directory (local or s3://) by its marker, else None."""
    found = latest(cfg)
    return found[0] if found else None

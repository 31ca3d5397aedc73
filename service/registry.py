"""Model registry and the embedding API.

A registered model is an MLflow pyfunc whose artifact `encoder.pt` holds the target encoder's
weights and the resolved config (tensors and strings only: loads with weights_only=True and
needs no training class).  `load_encoder` accepts `models:/NAME@ALIAS`, `models:/NAME/VERSION`,
`runs:/…`, or a checkpoint directory (local or s3://), in any process, without Ray.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from service import checkpoint as ckpt
from service.config import Config, config_from_dict
from service.features import LogMel, patchify
from service.model import Encoder

ENCODER_FILE = "encoder.pt"


class AudioEncoder(torch.nn.Module):
    """Frozen target encoder + front end: waveforms of any length -> clip or frame embeddings."""

    def __init__(self, cfg: Config, encoder_state: dict | None = None, device: str | torch.device | None = None,
                 source: str = ""):
        super().__init__()
        fc = cfg.features
        self.cfg, self.source = cfg, source
        self.frontend = LogMel(fc)
        self.encoder = Encoder(fc.patch_freq * fc.patch_time, fc.grid, cfg.model)
        if encoder_state is not None:
            self.encoder.load_state_dict(encoder_state)
        self.eval().requires_grad_(False)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.to(self.device)

    @property
    def sample_rate(self) -> int:
        return self.cfg.features.sample_rate

    @property
    def embedding_dim(self) -> int:
        return self.cfg.model.width

    @property
    def hop_ms(self) -> float:
        """Time between frame embeddings (one per patch column)."""
        return self.cfg.features.patch_time * self.cfg.features.hop_ms

    @torch.no_grad()
    def embed_frames(self, wav, batch_chunks: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, samples] at sample_rate -> ([B, T', D] frame embeddings, [B, T'] centre times in ms).

        Long audio is cut into consecutive clips of the training length; the last clip (or short
        audio) is zero-padded and frames that lie wholly in the padding are dropped.
        """
        wav = torch.as_tensor(wav, dtype=torch.float32)
        if wav.dim() == 1:
            wav = wav[None]
        fc = self.cfg.features
        b, n = wav.shape
        clip, step = fc.clip_samples, fc.n_frames * fc.hop_length  # consecutive, non-overlapping frames
        n_audio_frames = 1 + (n - fc.win_length) // fc.hop_length if n >= fc.win_length else 1
        n_chunks = -(-n_audio_frames // fc.n_frames)
        padded = torch.zeros(b, (n_chunks - 1) * step + clip)
        padded[:, :n] = wav
        chunks = padded.unfold(1, clip, step).reshape(b * n_chunks, clip)
        outs = []
        for i in range(0, chunks.shape[0], batch_chunks):
            x = chunks[i:i + batch_chunks].to(self.device)
            spec = self.frontend(x)
            tokens = self.encoder(patchify(spec, fc.patch_freq, fc.patch_time))  # [c, F*T, D]
            gf, gt = fc.grid
            outs.append(tokens.reshape(-1, gf, gt, tokens.shape[-1]).mean(dim=1).float().cpu())  # [c, T, D]
        frames = torch.cat(outs).reshape(b, n_chunks * fc.grid[1], -1)
        # keep the patch columns that start inside the real audio (at least one)
        keep = max(1, min(frames.shape[1], -(-n_audio_frames // fc.patch_time)))
        frames = frames[:, :keep]
        col = torch.arange(keep, dtype=torch.float64)
        centre_frame = col * fc.patch_time + fc.patch_time / 2
        t_ms = (centre_frame * fc.hop_ms + fc.win_ms / 2).float().expand(b, keep).clone()
        return frames, t_ms

    @torch.no_grad()
    def embed(self, wav) -> torch.Tensor:
        """[B, samples] -> [B, D]: time-mean of the frame embeddings."""
        frames, _ = self.embed_frames(wav)
        return frames.mean(dim=1)

    def forward(self, wav):
        return self.embed(wav)


def encoder_artifact(state: dict, path: str | Path) -> Path:
    """Write encoder.pt (target encoder weights + config JSON) from a checkpoint state."""
    torch.save({"config": state["config"], "target_encoder": state["target_encoder"], "step": state["step"]}, path)
    return Path(path)


def _load_encoder_file(path: str | Path, device=None, source: str = "") -> AudioEncoder:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return AudioEncoder(config_from_dict(json.loads(blob["config"])), blob["target_encoder"], device, source)


def checkpoint_state(uri: str) -> dict:
    """Verified state of a checkpoint directory, local or s3:// (state.pt and its marker are fetched)."""
    if not uri.startswith("s3://"):
        return ckpt.load_state(uri)
    from service.storage import read_bytes
    with tempfile.TemporaryDirectory() as tmp:
        for name in (ckpt.STATE, ckpt.MARKER):
            Path(tmp, name).write_bytes(read_bytes(uri.rstrip("/") + "/" + name))
        return ckpt.load_state(tmp)


def load_encoder(uri: str, device: str | torch.device | None = None) -> AudioEncoder:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/encoder` or a checkpoint dir -> AudioEncoder."""
    if uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        found = list(local.rglob(ENCODER_FILE))
        if not found:
            raise FileNotFoundError(f"{uri} has no {ENCODER_FILE}: not an Audio-JEPA model")
        return _load_encoder_file(found[0], device, uri)
    p = Path(uri)
    if p.is_file() and p.name == ENCODER_FILE:
        return _load_encoder_file(p, device, uri)
    state = checkpoint_state(uri)
    return AudioEncoder(ckpt.config_of(state), state["target_encoder"], device, uri)


def random_encoder(cfg: Config, seed: int = 0, device=None) -> AudioEncoder:
    """Random-init encoder of the same architecture: the floor a pretrained model must beat."""
    torch.manual_seed(seed)
    enc = AudioEncoder(cfg, None, device, "random")
    return enc


# --- MLflow pyfunc -----------------------------------------------------------------------------
def _pyfunc_class():
    import mlflow.pyfunc

    class AudioJEPAEmbedder(mlflow.pyfunc.PythonModel):
        """pyfunc: waveforms [B, samples] (float32, at the model's rate) -> clip embeddings [B, D]."""

        def load_context(self, context):
            self.encoder = _load_encoder_file(context.artifacts["encoder"], "cpu")

        def predict(self, context, model_input, params=None):
            if isinstance(model_input, dict):  # named tensor input {"waveform": [B, samples]}
                model_input = model_input.get("waveform", next(iter(model_input.values())))
            x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
            return self.encoder.embed(torch.as_tensor(np.asarray(x, dtype=np.float32))).numpy()

    return AudioJEPAEmbedder


def log_encoder_model(state: dict, run_id: str, tracking_uri: str, registered_name: str | None = None):
    """Log encoder.pt as a pyfunc model in `run_id` (optionally registering it); returns ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    cfg = config_from_dict(json.loads(state["config"]))
    mlflow.set_tracking_uri(tracking_uri)
    sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1), "waveform")]),
                         outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.model.width), "embedding")]))
    with tempfile.TemporaryDirectory() as tmp:
        path = encoder_artifact(state, Path(tmp) / ENCODER_FILE)
        with mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name="encoder", python_model=_pyfunc_class()(), artifacts={"encoder": str(path)},
                signature=sig, code_paths=[str(Path(__file__).parent)],
                registered_model_name=registered_name or None,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "torchaudio", "numpy", "pyyaml",
                                  "mlflow"])


def register_run(cfg: Config, run_id: str, checkpoint_uri: str, name: str | None = None,
                 alias: str | None = None) -> dict:
    """Register the checkpoint's target encoder as a new version of `name`, tagged, with `alias`."""
    from mlflow import MlflowClient

    from service.tracking import tracking_uri
    uri = tracking_uri(cfg)
    name = name or cfg.mlflow.registered_model
    alias = alias or cfg.mlflow.alias
    state = checkpoint_state(checkpoint_uri)
    info = log_encoder_model(state, run_id, uri, registered_name=name)
    version = str(info.registered_model_version)
    c = MlflowClient(tracking_uri=uri)
    tags = {"run_id": run_id, "data_source": cfg.data.source, "steps": str(state["step"]),
            "config_hash": cfg.hash(), "checkpoint": checkpoint_uri}
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)
    c.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "alias": alias, "uri": f"models:/{name}@{alias}"}


def promote(name: str, version: str, alias: str, tracking: str | None = None) -> None:
    from mlflow import MlflowClient
    c = MlflowClient(tracking_uri=tracking or os.environ.get("MLFLOW_TRACKING_URI"))
    c.get_model_version(name, version)  # raises a clear error if it does not exist
    c.set_registered_model_alias(name, alias, version)

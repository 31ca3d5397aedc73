"""Model registry: MLflow registration, aliases and the pyfunc wrapper.

A registered model is an MLflow pyfunc whose artifact `encoder.pt` holds the target encoder's
weights and the resolved config (tensors and strings only: loads with weights_only=True and
needs no training class).  Loading is `service.encoder.load_encoder` (re-exported here for old code).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from service import tracking
from service.config import Config, config_from_dict
from service.encoder import (ENCODER_FILE, AudioEncoder, checkpoint_state, encoder_artifact,  # noqa: F401
                             load_encoder, load_encoder_file, random_encoder)

_load_encoder_file = load_encoder_file  # named by the pickled pyfunc of models registered before service.encoder

# --- MLflow pyfunc -----------------------------------------------------------------------------
def _pyfunc_class():
    import mlflow.pyfunc

    class AudioJEPAEmbedder(mlflow.pyfunc.PythonModel):
        """pyfunc: waveforms [B, samples] (float32, at the model's rate) -> clip embeddings [B, D]."""

        def load_context(self, context):
            self.encoder = load_encoder_file(context.artifacts["encoder"], "cpu")

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

    dim = AudioEncoder(config_from_dict(json.loads(state["config"])), device="cpu").embedding_dim
    mlflow.set_tracking_uri(tracking_uri)
    sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1), "waveform")]),
                         outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim), "embedding")]))
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
    uri = tracking.tracking_uri(cfg)
    name = name or cfg.mlflow.registered_model
    alias = alias or cfg.mlflow.alias
    state = checkpoint_state(checkpoint_uri, cfg.storage.s3_endpoint)
    info = log_encoder_model(state, run_id, uri, registered_name=name)
    version = str(info.registered_model_version)
    c = tracking.client(uri)
    tags = {"run_id": run_id, "data_source": cfg.data.source, "steps": str(state["step"]),
            "config_hash": config_from_dict(json.loads(state["config"])).hash(),  # as trained (stats measured)
            "checkpoint": checkpoint_uri}
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)
    c.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "alias": alias, "uri": f"models:/{name}@{alias}"}


def registered_version(cfg: Config, run_id: str, checkpoint_uri: str, name: str | None = None) -> dict | None:
    """The version of `name` already registered from this run's checkpoint, None when there is none (a
    resubmitted finished run reports it instead of registering the same weights again)."""
    uri, name = tracking.tracking_uri(cfg), name or cfg.mlflow.registered_model
    found = [v for v in tracking.client(uri).search_model_versions(f"name='{name}' and run_id='{run_id}'")
             if v.tags.get("checkpoint") == checkpoint_uri]
    if not found:
        return None
    v = max(found, key=lambda v: int(v.version))
    return {"name": name, "version": str(v.version), "alias": None, "uri": f"models:/{name}/{v.version}"}


def promote(name: str, version: str, alias: str, tracking_uri: str) -> None:
    c = tracking.client(tracking_uri)
    c.get_model_version(name, version)  # raises a clear error if it does not exist
    c.set_registered_model_alias(name, alias, version)

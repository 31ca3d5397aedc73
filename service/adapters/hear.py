"""HEAR API (Turian et al. 2022) over a registered Audio-JEPA model.

    from service.adapters import hear
    model = hear.load_model("models:/audio-jepa@champion")   # or a checkpoint dir
    scene = hear.get_scene_embeddings(audio, model)          # [n, D]
    emb, ts = hear.get_timestamp_embeddings(audio, model)    # [n, T, D], [n, T] (ms)
"""
from __future__ import annotations

import os

import torch

from service.encoder import AudioEncoder, load_encoder


def load_model(model_file_path: str = "", device: str | None = None) -> AudioEncoder:
    uri = model_file_path or os.environ.get("AUDIO_JEPA_MODEL_URI", "")
    if not uri:
        raise ValueError("load_model needs a model URI (models:/NAME@ALIAS or a checkpoint dir) "
                         "or AUDIO_JEPA_MODEL_URI")
    model = load_encoder(uri, device)
    model.scene_embedding_size = model.embedding_dim
    model.timestamp_embedding_size = model.frame_dim
    return model


def get_timestamp_embeddings(audio: torch.Tensor, model: AudioEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """audio [n, samples] at model.sample_rate -> ([n, T, frame_dim], [n, T] centre times in ms)."""
    return model.embed_frames(audio)


def get_scene_embeddings(audio: torch.Tensor, model: AudioEncoder) -> torch.Tensor:
    """audio [n, samples] -> [n, embedding_dim]."""
    return model.embed(audio)

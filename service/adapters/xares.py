"""X-ARES encoder wrapper: passes `xares.audio_encoder_checker.check_audio_encoder`.

    from service.adapters.xares import AudioJEPAEncoder
    encoder = AudioJEPAEncoder("models:/audio-jepa@champion")
"""
from __future__ import annotations

import os

import torch

from service.encoder import load_encoder


class AudioJEPAEncoder(torch.nn.Module):
    def __init__(self, model_uri: str | None = None, device: str | None = None):
        super().__init__()
        uri = model_uri or os.environ.get("AUDIO_JEPA_MODEL_URI", "")
        if not uri:
            raise ValueError("AudioJEPAEncoder needs a model URI or AUDIO_JEPA_MODEL_URI")
        self.model = load_encoder(uri, device)
        self.output_dim = self.model.frame_dim
        self.sampling_rate = self.model.sample_rate
        self.hop_size_in_ms = self.model.hop_ms

    @torch.no_grad()
    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> [B, T', frame_dim] frame embeddings."""
        frames, _ = self.model.embed_frames(audio)
        return frames

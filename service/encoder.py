"""The embedding API: a frozen encoder that turns waveforms of any length into frame and clip vectors.

`load_encoder` accepts `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/…`, an `encoder.pt`, or a
checkpoint directory (local or s3://), in any process, without Ray.  The readout (patch tokens ->
frame vectors -> clip vector) is written once, here: `embed`, the adapters, the training probe,
`jobs.evaluate` and the random-init baseline all go through it, so comparisons are like for like.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from service import checkpoint as ckpt
from service.audio import fill
from service.config import Config, config_from_dict
from service.features import LogMel, patchify
from service.model import Encoder

ENCODER_FILE = "encoder.pt"


def frame_readout(tokens: torch.Tensor, grid: tuple[int, int], frames: str = "concat") -> torch.Tensor:
    """Patch tokens [c, F*T, D] -> one vector per patch column: [c, T, F*D] (concat) or [c, T, D] (mean).

    Concatenating the frequency rows (M2D) keeps what each band holds; averaging them throws it away.
    """
    gf, gt = grid
    x = tokens.reshape(-1, gf, gt, tokens.shape[-1])
    if frames == "mean":
        return x.mean(dim=1)
    return x.permute(0, 2, 1, 3).reshape(x.shape[0], gt, gf * x.shape[-1])


def clip_readout(frames: torch.Tensor, n_valid: torch.Tensor, pooling: str = "meanstd") -> torch.Tensor:
    """Frame vectors [B, T, d] -> clip vectors over each clip's first n_valid frames:
    [B, d] (mean) or [B, 2d] (meanstd: mean and std over time; meanmax: mean and max)."""
    valid = torch.arange(frames.shape[1])[None, :] < n_valid[:, None]  # [B, T]
    w = valid.unsqueeze(-1).to(frames.dtype)
    count = w.sum(1).clamp_min(1)
    mean = (frames * w).sum(1) / count
    if pooling == "mean":
        return mean
    if pooling == "meanstd":
        var = (((frames - mean[:, None]) ** 2) * w).sum(1) / count
        return torch.cat([mean, var.sqrt()], dim=-1)
    if pooling == "meanmax":
        return torch.cat([mean, frames.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(1)], dim=-1)
    raise ValueError(f"pooling {pooling!r}: expected mean, meanstd or meanmax")


class AudioEncoder(torch.nn.Module):
    """Frozen target encoder + front end: waveforms of any length -> clip or frame embeddings."""

    def __init__(self, cfg: Config, encoder_state: dict | None = None, device: str | torch.device | None = None,
                 source: str = ""):
        super().__init__()
        fc = cfg.features
        self.cfg, self.source, self.resolved = cfg, source, source
        self.frontend = LogMel(fc)
        self.encoder = Encoder(fc.patch_freq * fc.patch_time, fc.grid, cfg.model)
        if encoder_state is not None:
            self.encoder.load_state_dict(encoder_state)
        self.eval().requires_grad_(False)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.to(self.device)

    def digest(self) -> str:
        """sha256 of the encoder's weights and the settings that shape its embeddings: what caches key on
        (a URI or an alias may point at other weights tomorrow)."""
        import hashlib
        d = self.cfg.to_dict()
        h = hashlib.sha256(json.dumps({"features": d["features"], "model": d["model"]}, sort_keys=True).encode())
        for k, v in sorted(self.encoder.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def sample_rate(self) -> int:
        return self.cfg.features.sample_rate

    @property
    def frame_dim(self) -> int:
        """Size of a frame vector (embed_frames)."""
        return self.cfg.model.width * (self.cfg.features.grid[0] if self.cfg.readout.frames == "concat" else 1)

    @property
    def embedding_dim(self) -> int:
        """Size of a clip vector (embed): the frame size, twice with meanstd/meanmax pooling."""
        return self.frame_dim * (1 if self.cfg.readout.pooling == "mean" else 2)

    @property
    def hop_ms(self) -> float:
        """Time between frame embeddings (one per patch column)."""
        return self.cfg.features.patch_time * self.cfg.features.hop_ms

    @torch.no_grad()
    def embed_frames(self, wav, lengths=None, batch_chunks: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, samples] at sample_rate -> ([B, T', frame_dim] frame embeddings, [B, T'] centre times in ms).

        Long audio is cut into consecutive clips of the training length; the last clip (or short
        audio) is filled the way training fills short audio (`data.short_audio`: looped, or zero-padded),
        and frames that start after the audio's end are dropped.  `lengths`: real samples per row.
        """
        wav = torch.as_tensor(wav, dtype=torch.float32).detach().cpu()  # filled on the CPU, encoded on self.device
        if wav.dim() == 1:
            wav = wav[None]
        fc = self.cfg.features
        b, n = wav.shape
        clip, step = fc.clip_samples, fc.n_frames * fc.hop_length  # consecutive, non-overlapping frames
        n_chunks = -(-fc.frames_for(n) // fc.n_frames)
        total = (n_chunks - 1) * step + clip
        lengths = [n] * b if lengths is None else [int(x) for x in lengths]
        padded = torch.zeros(b, total)
        for i, m in enumerate(lengths):
            if m > 0:
                padded[i] = torch.from_numpy(fill(wav[i, :m].numpy(), total, self.cfg.data.short_audio))
        chunks = padded.unfold(1, clip, step).reshape(b * n_chunks, clip)
        outs = []
        for i in range(0, chunks.shape[0], batch_chunks):
            spec = self.frontend(chunks[i:i + batch_chunks].to(self.device))
            tokens = self.encoder(patchify(spec, fc.patch_freq, fc.patch_time),
                                  layers=min(self.cfg.readout.layers, self.cfg.model.depth))
            outs.append(frame_readout(tokens, fc.grid, self.cfg.readout.frames).float().cpu())
        frames = torch.cat(outs).reshape(b, n_chunks * fc.grid[1], -1)
        keep = max(1, min(frames.shape[1], fc.columns_for(n)))  # columns that start inside the audio
        frames = frames[:, :keep]
        centre_frame = torch.arange(keep, dtype=torch.float64) * fc.patch_time + fc.patch_time / 2
        t_ms = (centre_frame * fc.hop_ms + fc.win_ms / 2).float().expand(b, keep).clone()
        return frames, t_ms

    def frame_count(self, n_samples: int) -> int:
        """Frame embeddings that `n_samples` of audio has: the patch columns that start inside it (at least 1)."""
        return max(1, self.cfg.features.columns_for(int(n_samples)))

    @torch.no_grad()
    def embed(self, wav, lengths=None, pooling: str | None = None) -> torch.Tensor:
        """[B, samples] -> [B, embedding_dim]: frame embeddings pooled over time (readout.pooling).

        `lengths` (samples of real audio per row, when rows of different lengths were zero-padded to
        one batch) keeps each clip's pooling to its own frames.
        """
        return self.embed_with_frames(wav, lengths, pooling)[0]

    @torch.no_grad()
    def embed_with_frames(self, wav, lengths=None, pooling: str | None = None, batch_chunks: int = 64):
        """`embed` and `embed_frames` from one pass of the encoder: ([B, embedding_dim], [B, T', frame_dim],
        [B, T'] ms); row i's own frames are its first `frame_count(lengths[i])`."""
        wav = torch.as_tensor(wav, dtype=torch.float32)
        if wav.dim() == 1:
            wav = wav[None]
        lengths = [wav.shape[1]] * wav.shape[0] if lengths is None else lengths
        frames, t_ms = self.embed_frames(wav, lengths, batch_chunks)
        n_valid = torch.tensor([self.frame_count(n) for n in lengths])
        return clip_readout(frames, n_valid, pooling or self.cfg.readout.pooling), frames, t_ms

    def save(self, path: str | Path) -> Path:
        """encoder.pt of these weights and settings: what `load_encoder(path)` reads (e.g. a random-init model)."""
        weights = self.encoder.state_dict()
        return encoder_artifact({"config": json.dumps(self.cfg.to_dict()), "encoder": weights,
                                 "target_encoder": weights, "step": 0}, path)

    def forward(self, wav):
        return self.embed(wav)


def exported_weights(state: dict) -> dict:
    """The encoder a checkpoint exports (`ema.export`): the EMA target encoder, or the online one."""
    return state["encoder"] if ckpt.config_of(state).ema.export == "online" else state["target_encoder"]


def encoder_artifact(state: dict, path: str | Path) -> Path:
    """Write encoder.pt (the exported encoder's weights + config JSON) from a checkpoint state."""
    torch.save({"config": state["config"], "target_encoder": exported_weights(state), "step": state["step"]}, path)
    return Path(path)


def load_encoder_file(path: str | Path, device=None, source: str = "") -> AudioEncoder:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return AudioEncoder(config_from_dict(json.loads(blob["config"])), blob["target_encoder"], device, source)


def checkpoint_state(uri: str, endpoint: str | None = None) -> dict:
    """Verified state of a checkpoint directory, local or s3://."""
    return ckpt.load_uri(uri, endpoint)


def resolve_model_uri(uri: str) -> str:
    """`models:/NAME@ALIAS` -> `models:/NAME/VERSION` it points at now (other URIs unchanged), so one job
    reads, caches and logs to a single version even if the alias is moved meanwhile."""
    if not (uri.startswith("models:/") and "@" in uri):
        return uri
    from mlflow import MlflowClient
    name, alias = uri[len("models:/"):].split("@", 1)
    return f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"


def load_encoder(uri: str, device: str | torch.device | None = None) -> AudioEncoder:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/encoder` or a checkpoint dir -> AudioEncoder.

    `.resolved` is the exact source read (an alias resolved to its version)."""
    if uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a log line per file in job logs
        resolved = resolve_model_uri(uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=resolved))
        found = list(local.rglob(ENCODER_FILE))
        if not found:
            raise FileNotFoundError(f"{uri} has no {ENCODER_FILE}: not an Audio-JEPA model")
        enc = load_encoder_file(found[0], device, uri)
        enc.resolved = resolved
        return enc
    p = Path(uri)
    if p.is_file() and p.name == ENCODER_FILE:
        return load_encoder_file(p, device, uri)
    from service.storage import s3_endpoint
    state = checkpoint_state(uri, s3_endpoint())
    return AudioEncoder(ckpt.config_of(state), exported_weights(state), device, uri)


def random_encoder(cfg: Config, seed: int = 0, device=None) -> AudioEncoder:
    """Random-init encoder of the same architecture: the floor a pretrained model must beat."""
    torch.manual_seed(seed)
    return AudioEncoder(cfg, None, device, "random")

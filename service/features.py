"""Log-mel front end and patchify: waveform [B, samples] -> log-mel [B, mels, frames] -> patches.

The front end is an nn.Module so it runs batched on whatever device the batch is on
(CPU in the Ray Data pipeline, GPU in the train step when `data.features_in: trainer`).
"""
from __future__ import annotations

import torch
import torchaudio
from torch import nn

from service.config import FeaturesConfig

LOG_FLOOR = 1e-10  # silent input -> log(1e-10), finite
FEATURES_VERSION = 2  # bumped when the same config computes different features (2: aligned STFT framing)


class LogMel(nn.Module):
    """Batched log-mel with fixed normalisation; exactly `n_frames` frames for `clip_samples`.

    `normalise=False` gives the raw log-mel (to measure the normalisation statistics).
    """

    def __init__(self, cfg: FeaturesConfig, normalise: bool = True):
        super().__init__()
        if normalise and cfg.mean is None:
            raise ValueError("features.mean/std are not set: a run measures them from its data at start "
                             "(service.data.measure_stats), or set them in the config")
        self.cfg, self.normalise = cfg, normalise
        n_fft = cfg.n_fft
        # complex STFT, then |z|^2 as re^2 + im^2: torchaudio's power=2 takes abs() (a sqrt) and squares it
        # again, which was a third of the front end's time
        self.stft = torchaudio.transforms.Spectrogram(n_fft=n_fft, win_length=cfg.win_length,
                                                      hop_length=cfg.hop_length, center=False, power=None)
        self.mel = torchaudio.transforms.MelScale(n_mels=cfg.n_mels, sample_rate=cfg.sample_rate, f_min=20.0,
                                                  f_max=cfg.sample_rate / 2, n_stft=n_fft // 2 + 1, mel_scale="htk")
        if cfg.frontend == "kaldi":  # built once, moved with the module: never rebuilt per clip or per step
            self.kaldi_size = int(cfg.sample_rate * cfg.win_ms * 0.001)
            self.kaldi_shift = int(cfg.sample_rate * cfg.hop_ms * 0.001)
            self.kaldi_fft = 1 << (self.kaldi_size - 1).bit_length()
            banks, _ = torchaudio.compliance.kaldi.get_mel_banks(cfg.n_mels, self.kaldi_fft, float(cfg.sample_rate),
                                                                 20.0, 0.0, 100.0, -500.0, 1.0)
            self.register_buffer("kaldi_banks", torch.nn.functional.pad(banks.float(), (0, 1)), persistent=False)
            self.register_buffer("kaldi_window", torch.hann_window(self.kaldi_size, periodic=False),
                                 persistent=False)

    def _kaldi(self, wav: torch.Tensor) -> torch.Tensor:
        """Kaldi fbank (torchaudio.compliance.kaldi.fbank with the Audio-JEPA settings: Hanning window,
        pre-emphasis 0.97, per-frame DC removal, power spectrum, log floor at fp32 eps) on the batch's
        device, from filterbanks built once.  A GPU takes the whole batch at once; a CPU goes clip by clip,
        which keeps a clip's frames in cache (a whole `base` batch at once ran at half the speed there)."""
        per_call = wav.shape[0] if wav.device.type != "cpu" else 1
        return torch.cat([self._kaldi_batch(w) for w in wav.split(per_call)])

    def _kaldi_batch(self, wav: torch.Tensor) -> torch.Tensor:
        wav = wav - wav.mean(-1, keepdim=True)
        frames = wav.unfold(-1, self.kaldi_size, self.kaldi_shift)  # [B, frames, size]: snip_edges
        frames = frames - frames.mean(-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], -1)
        frames = (frames - 0.97 * previous) * self.kaldi_window
        power = torch.fft.rfft(frames, n=self.kaldi_fft).abs().pow(2)
        mel = power @ self.kaldi_banks.T
        return mel.clamp_min(torch.finfo(torch.float32).eps).log().transpose(1, 2)

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """[B, samples] float -> normalised log-mel [B, n_mels, n_frames] (cropped/padded in time), in fp32
        even inside a bf16 autocast region."""
        with torch.autocast(wav.device.type, enabled=False):
            return self._forward(wav)

    def _forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() == 1:
            wav = wav[None]
        wav = wav.float()
        if wav.shape[-1] < self.cfg.win_length:  # one frame at least
            wav = torch.nn.functional.pad(wav, (0, self.cfg.win_length - wav.shape[-1]))
        if self.cfg.frontend == "kaldi":
            x = self._kaldi(wav)
        else:
            # the window sits centred in n_fft: pad so that frame i covers samples [i*hop, i*hop + win)
            # exactly, giving frames_for(samples) frames (without it the last 4 frames of a clip were filler)
            extra = self.stft.n_fft - self.cfg.win_length
            wav = torch.nn.functional.pad(wav, (extra // 2, extra - extra // 2))
            power = torch.view_as_real(self.stft(wav)).pow(2).sum(-1)
            x = torch.log(self.mel(power).clamp_min(LOG_FLOOR))
        x = fit_frames(x, self.cfg.n_frames)
        return (x - self.cfg.mean) / self.cfg.std if self.normalise else x


@torch.no_grad()
def logmel_sums(wav, cfg: FeaturesConfig) -> tuple[float, float, int]:
    """(sum, sum of squares, count) of the raw log-mel over the real frames (never padding) of at most one
    clip of `wav`: partial sums that add up across files, tasks and machines."""
    wav = wav[:cfg.clip_samples]
    fe = frontend(cfg, normalise=False)
    x = fe(torch.as_tensor(wav, dtype=torch.float32)[None])[0, :, :min(cfg.frames_for(len(wav)), cfg.n_frames)]
    x = x.double()
    return x.sum().item(), x.pow(2).sum().item(), x.numel()


def stats_from_sums(total: float, total_sq: float, count: int) -> dict[str, float] | None:
    """`features.mean`/`std` from summed partials; None when there were no frames."""
    if count == 0:
        return None
    mean = total / count
    return {"features.mean": round(mean, 4), "features.std": round(max(total_sq / count - mean ** 2, 1e-12) ** 0.5, 4)}


def logmel_stats(wavs, cfg: FeaturesConfig) -> dict[str, float] | None:
    """`features.mean`/`std` of the raw log-mel over the real frames of at most one clip of each waveform
    (None when there are none).  The log floor of zero padding would inflate both."""
    sums = [0.0, 0.0, 0]
    for wav in wavs:
        sums = [a + b for a, b in zip(sums, logmel_sums(wav, cfg))]
    return stats_from_sums(*sums)


_FRONTENDS: dict[tuple[str, bool], "LogMel"] = {}


def frontend(cfg: FeaturesConfig, normalise: bool = True) -> "LogMel":
    """One LogMel per process, feature config and normalisation (building one costs more than a batch)."""
    key = (repr(cfg), normalise)
    if key not in _FRONTENDS:
        _FRONTENDS[key] = LogMel(cfg, normalise=normalise)
    return _FRONTENDS[key]


def fit_frames(x: torch.Tensor, n_frames: int) -> torch.Tensor:
    """Crop or pad (with the per-item minimum, i.e. silence) the time axis to n_frames."""
    t = x.shape[-1]
    if t == n_frames:
        return x
    if t > n_frames:
        return x[..., :n_frames]
    pad = x.amin(dim=(-2, -1), keepdim=True).expand(*x.shape[:-1], n_frames - t)
    return torch.cat([x, pad], dim=-1)


def patchify(spec: torch.Tensor, patch_freq: int, patch_time: int) -> torch.Tensor:
    """[B, F, T] -> [B, (F/pf)*(T/pt), pf*pt]; patch index = freq_row * n_time + time_col."""
    b, f, t = spec.shape
    gf, gt = f // patch_freq, t // patch_time
    x = spec[:, : gf * patch_freq, : gt * patch_time]
    x = x.reshape(b, gf, patch_freq, gt, patch_time).permute(0, 1, 3, 2, 4)
    return x.reshape(b, gf * gt, patch_freq * patch_time)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch_freq: int, patch_time: int) -> torch.Tensor:
    """Inverse of patchify (for plots)."""
    b = patches.shape[0]
    gf, gt = grid
    x = patches.reshape(b, gf, gt, patch_freq, patch_time).permute(0, 1, 3, 2, 4)
    return x.reshape(b, gf * patch_freq, gt * patch_time)

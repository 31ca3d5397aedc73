"""Audio bytes -> validated mono waveform at the model's rate -> fixed-length crops.

Every way a file can be bad raises `Skip(reason, detail)`; the pipeline counts reasons and
logs the object key, and the run goes on.
"""
from __future__ import annotations

import io
import math
import zlib
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch
import torchaudio

MIN_RATE, MAX_RATE = 1000, 384_000
SILENCE_PEAK = 1e-4  # -80 dBFS: a file that never exceeds this is "silent"

SKIP_REASONS = ("empty", "too_large", "too_long", "undecodable", "bad_sample_rate", "too_many_channels",
                "too_short", "non_finite", "silent", "missing", "read_error")


class Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@lru_cache(maxsize=32)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(orig, new)


def check_format(sr: int, channels: int, max_channels: int) -> None:
    """A header's sample rate and channel count, refused (Skip) when absurd or over the limit."""
    if not MIN_RATE <= sr <= MAX_RATE:
        raise Skip("bad_sample_rate", f"{sr} Hz")
    if not 1 <= channels <= max_channels:
        raise Skip("too_many_channels", f"{channels} channels")


def decode(data: bytes, sample_rate: int, max_channels: int = 16, min_seconds: float = 0.25,
           trim: bool = False, max_decoded_mb: float = 1024.0) -> np.ndarray:
    """Bytes of any soundfile-supported format -> mono float32 at `sample_rate`, validated.

    `trim` drops leading/trailing digital silence (training data: silence is not a thing to predict).
    A file whose header promises more than `max_decoded_mb` of float32 samples is skipped before
    anything is decoded (compressed audio can be tiny on disk and hours long).
    """
    if not data:
        raise Skip("empty")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, ch, frames = f.samplerate, f.channels, f.frames
            check_format(sr, ch, max_channels)
            if frames * ch * 4 > max_decoded_mb * 2 ** 20:
                raise Skip("too_long", f"{frames / sr:.0f} s x {ch} ch = {frames * ch * 4 / 2 ** 20:.0f} MB decoded "
                                       f"> data.max_decoded_mb={max_decoded_mb:g}")
            wav = f.read(dtype="float32", always_2d=True)
    except Skip:
        raise
    except Exception as e:  # libsndfile: not audio, truncated header, unsupported codec
        raise Skip("undecodable", f"{type(e).__name__}: {str(e)[:120]}") from None
    if wav.shape[0] == 0:
        raise Skip("too_short", "0 samples")
    if not np.isfinite(wav).all():
        raise Skip("non_finite", f"{int((~np.isfinite(wav)).sum())} NaN/inf samples")
    mono = wav.mean(axis=1)
    if mono.shape[0] < min_seconds * sr:
        raise Skip("too_short", f"{mono.shape[0] / sr:.3f} s")
    if np.abs(mono).max() <= SILENCE_PEAK:
        raise Skip("silent", f"peak {np.abs(mono).max():.2e}")
    if trim:
        mono = trim_silence(mono)
        if mono.shape[0] < min_seconds * sr:
            raise Skip("too_short", f"{mono.shape[0] / sr:.3f} s without leading/trailing silence")
    if sr != sample_rate:
        with torch.no_grad():
            mono = _resampler(sr, sample_rate)(torch.from_numpy(mono)).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


def crop_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Crops depend on (seed, epoch, file key) only: the same file gives the same crops anywhere."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def trim_silence(wav: np.ndarray, threshold: float = SILENCE_PEAK) -> np.ndarray:
    """Drop leading and trailing digital silence (|x| <= threshold): it carries nothing to learn."""
    loud = np.flatnonzero(np.abs(wav) > threshold)
    return wav[loud[0]:loud[-1] + 1] if len(loud) else wav


def fill(wav: np.ndarray, n: int, short_audio: str = "loop") -> np.ndarray:
    """Exactly n samples (of wav's dtype) from audio that may be shorter: repeated end to end (loop) or
    zero-padded (pad)."""
    if wav.shape[0] >= n:
        return wav[:n]
    if short_audio == "loop":
        return np.tile(wav, -(-n // wav.shape[0]))[:n]
    out = np.zeros(n, dtype=wav.dtype)
    out[:wav.shape[0]] = wav
    return out


def crops(wav: np.ndarray, clip_samples: int, max_crops: int, rng: np.random.Generator,
          short_audio: str = "loop") -> list[np.ndarray]:
    """Random crops spread over a long file; a short file gives one clip, looped (or zero-padded) to length.

    Looping keeps every patch real audio: zero padding makes constant "silence" patches that position
    alone predicts, a free lunch for the JEPA loss that teaches nothing.
    """
    n = wav.shape[0]
    if n <= clip_samples:
        return [fill(wav, clip_samples, short_audio)]
    k = int(min(max_crops, n // clip_samples)) or 1
    # split the file into k equal segments and crop randomly inside each: spread, no duplicates
    seg = n // k
    starts = [i * seg + int(rng.integers(0, max(seg - clip_samples, 0) + 1)) for i in range(k)]
    return [wav[s:s + clip_samples].copy() for s in starts]


class ReadAhead:
    """A seekable file over a random-access object (a pyarrow NativeFile: on S3 each read is a ranged GET)
    that fetches at least `block` bytes at a time, so libsndfile's many small reads cost few requests."""

    def __init__(self, f, size: int, block: int = 1 << 20):
        self.f, self.size, self.block = f, size, block
        self.pos, self.start, self.buf = 0, 0, b""

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else n
        out = bytearray()
        while n > 0 and self.pos < self.size:
            if not self.start <= self.pos < self.start + len(self.buf):
                self.start, self.buf = self.pos, self.f.read_at(min(max(self.block, n), self.size - self.pos), self.pos)
            chunk = self.buf[self.pos - self.start:self.pos - self.start + n]
            out += chunk
            self.pos, n = self.pos + len(chunk), n - len(chunk)
        return bytes(out)


def read_crops(f, sample_rate: int, clip_samples: int, max_crops: int, rng: np.random.Generator,
               max_channels: int = 16, short_audio: str = "loop") -> list[np.ndarray]:
    """Crops of a long file read around their windows only (seek + read), never decoding the whole file.

    The windows are placed as `crops` places them (k segments, a random start in each), in the file's
    own rate; each is downmixed, checked and resampled alone.  A file of the model's rate gives exactly
    the crops the whole-file path gives (without silence trimming, which needs the whole file)."""
    try:
        with sf.SoundFile(f) as s:
            sr, ch, frames = s.samplerate, s.channels, s.frames
            check_format(sr, ch, max_channels)
            need = clip_samples if sr == sample_rate else math.ceil(clip_samples * sr / sample_rate) + 64
            if frames <= need:
                raise Skip("too_short", f"{frames} frames: too short to read by windows")
            k = int(min(max_crops, frames // need)) or 1
            seg = frames // k
            starts = [i * seg + int(rng.integers(0, max(seg - need, 0) + 1)) for i in range(k)]
            windows = []
            for start in starts:
                s.seek(start)
                windows.append(s.read(need, dtype="float32", always_2d=True))
    except Skip:
        raise
    except Exception as e:  # libsndfile: not audio, truncated, unsupported codec or seek
        raise Skip("undecodable", f"{type(e).__name__}: {str(e)[:120]}") from None
    out = []
    for w in windows:
        if not np.isfinite(w).all():
            raise Skip("non_finite", f"{int((~np.isfinite(w)).sum())} NaN/inf samples in a crop window")
        mono = w.mean(axis=1)
        if sr != sample_rate:
            with torch.no_grad():
                mono = _resampler(sr, sample_rate)(torch.from_numpy(np.ascontiguousarray(mono))).numpy()
        out.append(fill(np.ascontiguousarray(mono, dtype=np.float32), clip_samples, short_audio))
    return out

"""Fixtures: generated audio (good and every kind of bad), a moto S3 server, an in-process Ray.

Every service a test needs is started here on 127.0.0.1 with a free port and stopped by its
process group id afterwards (never by name).
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cluster.procs import free_port, start_group, stop_group, wait_http

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

# `make test` runs files in 2 processes (pytest-xdist, --dist loadfile --no-loadscope-reorder), handed out
# in collection order: the slowest files go first (measured with --durations), so the two processes
# start on them together instead of finishing with them one after the other.
SLOWEST_FIRST = ("test_train.py", "test_cluster.py", "test_nodes.py", "test_mlflow.py", "test_sweep.py", "test_study.py",
                 "test_corpus.py", "test_security.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order


def tone(freq: float, seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(t.shape)
    x = x.astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def encode(x: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


# good files: (name, freq, seconds, rate, channels, format)
GOOD = [
    ("a/tone_440.wav", 440, 3.0, 16000, 1, "WAV"),
    ("a/tone_880_stereo.flac", 880, 2.5, 44100, 2, "FLAC"),
    ("b/tone_220.ogg", 220, 4.0, 22050, 1, "OGG"),
    ("b/long_330.wav", 330, 9.0, 8000, 1, "WAV"),
    ("c/short_550.wav", 550, 0.8, 16000, 1, "WAV"),
    ("c/tone_660.flac", 660, 2.2, 48000, 1, "FLAC"),
]


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected skip reason)."""
    good = encode(tone(440, 2.0, 16000), 16000, "WAV")
    nan = tone(440, 2.0, 16000)
    nan[100:200] = np.nan
    many = np.zeros((4000, 40), np.float32) + 0.1
    return {
        "bad/empty.wav": (b"", "empty"),
        "bad/not_audio.flac": (b"this is not audio at all " * 50, "undecodable"),
        "bad/truncated.ogg": (encode(tone(440, 2.0, 16000), 16000, "OGG")[:120], "undecodable"),
        "bad/midi_as.mp3": (b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x00\x60" + b"\x00" * 64, "undecodable"),
        "bad/silent.wav": (encode(np.zeros(32000, np.float32), 16000, "WAV"), "silent"),
        "bad/nan.wav": (encode(nan, 16000, "WAV", "FLOAT"), "non_finite"),
        "bad/zero_length.wav": (encode(np.zeros(0, np.float32), 16000, "WAV"), "too_short"),
        "bad/rate_absurd.wav": (good[:24] + (7).to_bytes(4, "little") + (14).to_bytes(4, "little") + good[32:],
                                "bad_sample_rate"),
        "bad/channels_40.wav": (encode(many, 16000, "WAV"), "too_many_channels"),
        "bad/huge.wav": (encode(tone(440, 40.0, 16000), 16000, "WAV", "FLOAT"), "too_large"),
    }


def write_corpus(root: Path, with_bad: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, f, s, sr, ch, fmt) in enumerate(GOOD):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(encode(tone(f, s, sr, ch, seed=i), sr, fmt))
    (root / "README.txt").write_text("not audio, ignored by extension")
    if with_bad:
        for name, (data, _) in bad_files().items():
            p = root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def clean_corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("clean_corpus"), with_bad=False)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto S3 on 127.0.0.1:<free port>; yields the endpoint URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = start_group([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint, timeout=60, proc=proc)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        yield endpoint
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)
        stop_group(proc)


def upload_dir(endpoint: str, local: Path, bucket: str, prefix: str, env: dict | None = None) -> str:
    """Upload a directory; `env` holds the store's AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (default: the process's)."""
    import boto3
    keys = {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]} \
        if env else {}
    s3 = boto3.client("s3", endpoint_url=endpoint, **keys)
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(local).as_posix()}", Body=p.read_bytes())
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def ray_local():
    """An in-process Ray (address='local', never a cluster recorded on this machine)."""
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in
                                           ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}})
    yield ray
    ray.shutdown()



@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite registry) on 127.0.0.1:<free port>; sets MLFLOW_TRACKING_URI."""
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = start_group([mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
                        "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1",
                        "--port", str(port), "--workers", "1"], d / "server.log")
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", timeout=300, proc=proc)  # ~16 s idle; minutes on a loaded 2-core machine
        os.environ["MLFLOW_TRACKING_URI"] = uri
        yield uri
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        stop_group(proc)

"""Object storage: one pyarrow filesystem for local paths and s3:// URIs (any S3-compatible endpoint).

pyarrow ignores AWS_ENDPOINT_URL, so the endpoint is always passed explicitly: from config
(`storage.s3_endpoint`) or from the AWS_ENDPOINT_URL(_S3) environment variables.
Credentials come from the usual AWS environment variables / files.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


def s3_endpoint(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(endpoint: str | None = None, region: str | None = None, retries: int = 5) -> pafs.S3FileSystem:
    endpoint = s3_endpoint(endpoint)
    kwargs = dict(region=region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=retries),
                  connect_timeout=10, request_timeout=60)
    if endpoint:
        u = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs.update(endpoint_override=u.netloc, scheme=u.scheme)
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, endpoint: str | None = None, region: str | None = None) -> tuple[pafs.FileSystem, str]:
    """URI or local path -> (filesystem, path inside it)."""
    if uri.startswith("s3://"):
        return s3_filesystem(endpoint, region), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def uri_for(path: str, like: str) -> str:
    """A path inside the filesystem of `like` as a URI of the same kind (bucket/key -> s3://bucket/key)."""
    return f"s3://{path}" if is_remote(like) else path


def join(base: str, rel: str) -> str:
    if is_remote(base):
        return base.rstrip("/") + "/" + rel.lstrip("/")
    return os.path.join(base, rel)


@dataclass(frozen=True)
class FileEntry:
    uri: str     # s3://bucket/key or absolute local path
    key: str     # path relative to the source root (stable across local/S3 copies of a corpus)
    size: int


def list_files(root: str, extensions: list[str] | None = None, endpoint: str | None = None,
               region: str | None = None) -> tuple[list[FileEntry], int]:
    """Recursive listing sorted by key; returns (matching files, number ignored by extension)."""
    fs, path = resolve(root, endpoint, region)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"source not found: {root}")
    if info.type == pafs.FileType.File:
        infos = [info]
        base = os.path.dirname(path)
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        base = path
    exts = {e.lower().lstrip(".") for e in extensions} if extensions else None
    out, ignored = [], 0
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        if exts is not None and i.extension.lower() not in exts:
            ignored += 1
            continue
        rel = os.path.relpath(i.path, base)
        out.append(FileEntry(uri_for(i.path, root), rel, i.size))
    out.sort(key=lambda e: e.key)
    return out, ignored


def with_retries(fn, retries: int = 5):
    """fn() retrying transient storage errors (OSError) with backoff; a missing object is not retried."""
    for attempt in range(retries):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == retries - 1:
                raise
            time.sleep(min(0.2 * 2 ** attempt, 5.0))
    raise AssertionError("unreachable")


def read_bytes(uri: str, endpoint: str | None = None, region: str | None = None, retries: int = 5,
               fs: pafs.FileSystem | None = None) -> bytes:
    """Whole object, retrying transient errors with backoff (missing objects are not retried)."""
    if fs is None:
        fs, path = resolve(uri, endpoint, region)
    else:
        path = uri[len("s3://"):] if uri.startswith("s3://") else uri

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()
    return with_retries(read, retries)


def write_bytes(uri: str, data: bytes, endpoint: str | None = None, region: str | None = None) -> None:
    """Whole object, all or nothing: an S3 upload appears when complete; a local file is renamed into place."""
    fs, path = resolve(uri, endpoint, region)
    if is_remote(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ray_storage(uri: str, endpoint: str | None = None, region: str | None = None) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for ray.train.RunConfig: local dirs absolute, S3 with our endpoint."""
    if is_remote(uri):
        fs, path = resolve(uri, endpoint, region)
        return path, fs
    return os.path.abspath(os.path.expanduser(uri)), None

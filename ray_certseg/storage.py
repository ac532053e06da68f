"""Filesystem helpers: one code path for local folders and object stores (``s3://``) via fsspec / s3fs.

Credentials and the endpoint come from the usual AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ...) or from
``storage_options`` (passed to ``s3fs.S3FileSystem``: ``endpoint_url``, ``key``, ``secret``, ``token``,
``client_kwargs``, ``config_kwargs``...). They never enter an error message: object-store failures are turned
into :class:`StorageError` naming the bucket and the fix, with any secret value redacted.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

LOCAL_PROTOCOLS = (None, "file", "local")
SECRET_KEY_PATTERN = re.compile(r"key|secret|token|passw|credential|session", re.IGNORECASE)
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
REDACTED = "***"


class StorageError(RuntimeError):
    """The object store cannot be used at all (missing bucket, access denied, endpoint unreachable, no
    credentials). A job-level problem, unlike a single missing file."""


# ----------------------------------------------------------------------------------------------------- paths
def split_protocol(path: str) -> tuple[str | None, str]:
    """``"s3://b/k"`` -> ``("s3", "b/k")``; ``"/x"`` -> ``(None, "/x")``."""
    protocol, rest = fsspec.core.split_protocol(str(path))
    return protocol, rest


def is_local(path: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return split_protocol(path)[0] in LOCAL_PROTOCOLS


def strip_protocol(path: str) -> str:
    """The path as the filesystem of :func:`get_filesystem` expects it: absolute for local paths,
    ``bucket/key`` (no trailing slash) for object stores."""
    protocol, rest = split_protocol(path)
    if protocol in LOCAL_PROTOCOLS:
        return os.path.abspath(os.path.expanduser(rest))
    return rest.rstrip("/")


def canonical(path: str) -> str:
    """A stable spelling of ``path``: absolute for local paths (without ``file://``), unchanged URLs
    without a trailing slash. Paths built with :func:`join` from it compare equal to :func:`glob` results."""
    protocol, rest = split_protocol(path)
    return strip_protocol(path) if protocol in LOCAL_PROTOCOLS else f"{protocol}://{rest.rstrip('/')}"


def join(base: str, *parts: str) -> str:
    """Join path parts, keeping ``base``'s protocol; ``..`` and ``.`` are normalised. A part that is
    absolute or has a protocol replaces what came before it."""
    out = str(base)
    for part in parts:
        part = str(part)
        if split_protocol(part)[0] is not None or part.startswith("/"):
            out = part
            continue
        protocol, rest = split_protocol(out)
        rest = posixpath.normpath(posixpath.join(rest, part))
        out = f"{protocol}://{rest}" if protocol else rest
    return out


def bucket_of(path: str) -> str:
    """The bucket (first path segment) of an object-store URL."""
    return split_protocol(path)[1].lstrip("/").split("/", 1)[0]


# ----------------------------------------------------------------------------------------------- filesystems
def get_filesystem(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path without protocol. ``storage_options`` are used for
    object stores only (a local path ignores them).

    fsspec hands out one cached instance per set of options, and that instance caches listings. Ray's
    workers write and move objects through their own clients, so a cached listing would miss new vote files
    or list moved ones: the listings cache is emptied each time a filesystem is handed out."""
    if is_local(path):
        return LocalFileSystem(), strip_protocol(path)
    fs, stripped = fsspec.core.url_to_fs(str(path), **dict(storage_options or {}))
    fs.invalidate_cache()
    return fs, stripped.rstrip("/")


def pyarrow_filesystem(path: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """A ``pyarrow.fs.FileSystem`` for Ray Data's ``filesystem=`` argument and the path without protocol:
    the native local filesystem, or ``PyFileSystem(FSSpecHandler(fs))`` around the fsspec one."""
    import pyarrow.fs as pafs

    fs, stripped = get_filesystem(path, storage_options)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), stripped
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), stripped


# ---------------------------------------------------------------------------------------------------- errors
def redact_options(options: Any) -> Any:
    """A copy of ``storage_options`` with every secret-looking value (keys matching key/secret/token/
    password/credential/session) replaced by ``***``; nested mappings are redacted too."""
    if isinstance(options, Mapping):
        return {
            k: (REDACTED if SECRET_KEY_PATTERN.search(str(k)) and v not in (None, "") else redact_options(v))
            for k, v in options.items()
        }
    if isinstance(options, list):
        return [redact_options(v) for v in options]
    return options


def _secret_values(options: Any) -> Iterator[str]:
    if isinstance(options, Mapping):
        for k, v in options.items():
            if SECRET_KEY_PATTERN.search(str(k)) and isinstance(v, str):
                yield v
            else:
                yield from _secret_values(v)
    elif isinstance(options, list):
        for v in options:
            yield from _secret_values(v)


def redact(text: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """``text`` with every credential it may contain replaced by ``***``: secret values of
    ``storage_options``, the AWS credential environment variables, and ``user:password@`` in URLs."""
    secrets = set(_secret_values(storage_options or {}))
    secrets.update(os.environ[name] for name in SECRET_ENV_VARS if os.environ.get(name))
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return re.sub(r"(\w+://)[^/@\s]+@", rf"\1{REDACTED}@", text)


def _bucket_exists(fs: fsspec.AbstractFileSystem, bucket: str) -> bool:
    try:
        fs.info(bucket)
    except FileNotFoundError:
        return False
    return True


@contextmanager
def translate_errors(path: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Turn object-store failures inside the block into clear errors naming the bucket, never a credential:
    missing bucket, access denied, unreachable endpoint and missing credentials become :class:`StorageError`;
    a missing object in an existing bucket stays a ``FileNotFoundError``. Local paths pass through."""
    if is_local(path):
        yield
        return
    from botocore import exceptions as boto

    bucket = bucket_of(path)
    endpoint_hint = "the endpoint (storage_options endpoint_url or AWS_ENDPOINT_URL)"
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        fs, _ = get_filesystem(path, storage_options)
        try:
            bucket_there = _bucket_exists(fs, bucket)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            bucket_there = True
        if not bucket_there:
            raise StorageError(
                f"bucket {bucket!r} does not exist (while accessing {path}): check the path and "
                f"{endpoint_hint}, or create the bucket"
            ) from None
        raise FileNotFoundError(f"no such file: {path}") from None
    except PermissionError:
        raise StorageError(
            f"access denied to bucket {bucket!r} (while accessing {path}): check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or storage_options key and "
            "secret) and the bucket policy"
        ) from None
    except boto.NoCredentialsError:
        raise StorageError(
            f"no credentials found for bucket {bucket!r}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or storage_options key and secret, "
            "or storage_options anon: true for a public bucket"
        ) from None
    except (boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ReadTimeoutError) as exc:
        detail = redact(str(exc), storage_options)
        raise StorageError(
            f"cannot reach the object store for bucket {bucket!r} ({detail}): check "
            f"{endpoint_hint} and the network"
        ) from None


# ------------------------------------------------------------------------------------------------ operations
def check_bucket(path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`StorageError` if ``path`` is in an object store whose bucket is missing or unusable."""
    if is_local(path):
        return
    fs, _ = get_filesystem(path, storage_options)
    with translate_errors(path, storage_options):
        if not _bucket_exists(fs, bucket_of(path)):
            raise FileNotFoundError(path)


def exists(path: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether a file or folder exists at ``path`` (False as well when its bucket does not exist)."""
    fs, stripped = get_filesystem(path, storage_options)
    with translate_errors(path, storage_options):
        return bool(fs.exists(stripped))


def read_bytes(path: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole content of the file at ``path``."""
    fs, stripped = get_filesystem(path, storage_options)
    with translate_errors(path, storage_options):
        return fs.cat_file(stripped)


def write_bytes(path: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to ``path``, creating local parent folders."""
    fs, stripped = get_filesystem(path, storage_options)
    with translate_errors(path, storage_options):
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(posixpath.dirname(stripped), exist_ok=True)
        fs.pipe_file(stripped, data)


def glob(pattern: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Sorted paths matching ``pattern`` (``*``, ``?``, ``[..]``), with the pattern's protocol kept.
    For an object store, a missing bucket is a :class:`StorageError`, not an empty list."""
    protocol, _ = split_protocol(pattern)
    fs, stripped = get_filesystem(pattern, storage_options)
    check_bucket(pattern, storage_options)
    with translate_errors(pattern, storage_options):
        found = fs.glob(stripped)
    if protocol in LOCAL_PROTOCOLS:
        return sorted(found)
    return sorted(f"{protocol}://{p}" for p in found)

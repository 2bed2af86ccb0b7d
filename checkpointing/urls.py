"""Which storage URLs ``checkpoint.root``, ``checkpoint.upload_root`` and ``checkpoint.resume`` take.

Checked when the config is validated, before anything is built: an unknown scheme used to get as
far as fsspec, which for ``ftp://host/...`` tried to connect and crashed with ``socket.gaierror``.
"""

from __future__ import annotations

from typing import Optional

from checkpointing.errors import ConfigError

# scheme -> what it is. memory:// is fsspec's in-process store: the tests' stand-in for S3.
SCHEMES = {"file": "a local path", "s3": "Amazon S3", "memory": "fsspec's in-memory store"}
SUPPORTED = "a local path (or an FSx/POSIX mount), file://, s3:// or memory://"


def scheme(url: str) -> Optional[str]:
    """The scheme of ``url`` (lower case), or None for a plain path."""
    head, sep, _ = (url or "").partition("://")
    return head.lower() if sep else None


def check_url(key: str, url: str, remote_only: bool = False) -> None:
    """ConfigError naming ``key`` and the supported schemes when ``url`` has another scheme."""
    found = scheme(url)
    if found is None or found in SCHEMES:
        if remote_only and found in (None, "file"):
            raise ConfigError(f"{key}={url!r} must be a URL such as s3://bucket/prefix (or empty for one tier)")
        return
    supported = "s3:// or memory://" if remote_only else SUPPORTED
    raise ConfigError(f"{key}={url!r}: the {found}:// scheme is not supported; use {supported}")

"""Small fsspec helpers so one code path serves local disks, FSx mounts and object stores (s3://).

Object stores have no rename and no directories; what they do have is an atomic single PUT. So a
small file is written atomically (``checkpointing.atomic``): temp + fsync + rename + fsync(dir)
locally, one PUT elsewhere. Listings are read fresh (fsspec caches them per filesystem instance).
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar

from fsspec.core import url_to_fs

from checkpointing.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

_LOCAL_PROTOCOLS = {"file", "local"}
_T = TypeVar("_T")

# Our short names for the S3 settings users set in ``checkpoint.storage_options``; anything else is
# passed to the fsspec filesystem as is (s3fs: key, secret, client_kwargs, config_kwargs, ...).
_S3_SHORT_KEYS = ("endpoint_url", "region", "profile")
# Retry knobs read from storage_options (and removed before fsspec sees them).
_RETRY_KEYS = ("retries", "retry_backoff_s")


def fsspec_options(url: str, storage_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``storage_options`` as the fsspec filesystem of ``url`` takes them.

    For s3://: ``endpoint_url`` (else ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` from the
    environment), ``region`` → ``client_kwargs.region_name``, ``profile`` → s3fs ``profile``.
    Our retry knobs are dropped (the ``Storage`` applies them itself)."""
    opts = {k: v for k, v in dict(storage_options or {}).items() if k not in _RETRY_KEYS}
    if "://" not in str(url) or str(url).startswith("file://"):
        return {}  # a local path: the options are for the object store (two tiers share them)
    if not str(url).startswith(("s3://", "s3a://")):
        return opts
    endpoint = opts.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = opts.pop("region", None)
    if region:
        client_kwargs = dict(opts.get("client_kwargs") or {})
        client_kwargs.setdefault("region_name", region)
        opts["client_kwargs"] = client_kwargs
    return opts


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: connection failures, timeouts, throttling and 5xx from an object store. A
    missing object or a denied request is an answer, not a glitch."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError, ValueError, TypeError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    if any(k in name for k in ("EndpointConnection", "ConnectTimeout", "ReadTimeout", "ConnectionClosed",
                               "ClientConnector", "ServerDisconnected", "ClientOSError", "Throttl",
                               "ServiceUnavailable", "SlowDown", "IncompleteRead", "ProxyConnection")):
        return True
    return isinstance(exc, OSError)  # s3fs maps most transport failures to OSError


def retry(fn: Callable[[], _T], what: str, retries: int, backoff_s: float) -> _T:
    """Call ``fn``; on a transient error retry up to ``retries`` times, sleeping
    ``backoff_s * 2**i`` (+ jitter) between attempts. The last error propagates."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - filtered by is_transient, re-raised when not
            if attempt >= retries or not is_transient(e):
                raise
            delay = backoff_s * (2 ** attempt) * (1 + 0.25 * random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.2f s", what, type(e).__name__, e,
                        attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Storage:
    """The filesystem behind one checkpoint root, with ``storage_options`` (e.g. ``endpoint_url``,
    ``key``/``secret``, ``client_kwargs`` for s3fs) applied to every call."""

    def __init__(self, url: str, storage_options: Optional[Mapping[str, Any]] = None):
        raw = dict(storage_options or {})
        self.storage_options: Dict[str, Any] = fsspec_options(url, raw)  # what fsspec/DCP get
        self.retries = int(raw.get("retries", 3))
        self.retry_backoff_s = float(raw.get("retry_backoff_s", 0.5))
        self.fs, _ = url_to_fs(url, **self.storage_options)
        protocol = self.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        self.is_local = any(p in _LOCAL_PROTOCOLS for p in protocols)

    def _retry(self, fn: Callable[[], _T], what: str) -> _T:
        """Small-file ops (marker, meta, listings) on object stores retry transient errors; local
        disks fail at once (an OSError there is not a network glitch)."""
        if self.is_local:
            return fn()
        return retry(fn, what, self.retries, self.retry_backoff_s)

    # -- paths -------------------------------------------------------------------------------
    def _p(self, url: str) -> str:
        """The filesystem-internal path of a URL (strips ``s3://``, ``file://`` and the like;
        local paths come back absolute)."""
        return self.fs._strip_protocol(url)

    def native(self, url: str) -> str:
        """What DCP's writer/reader take: a plain path locally, the URL itself elsewhere."""
        return self._p(url) if self.is_local else url

    # -- queries -----------------------------------------------------------------------------
    def exists(self, url: str) -> bool:
        def go() -> bool:
            self.invalidate(url)
            if self.is_local:
                return self.fs.exists(self._p(url))
            # s3fs.exists swallows transport errors into False: that would read "no marker" for
            # "server down". info() raises them, so they are retried and then reported.
            try:
                self.fs.info(self._p(url))
                return True
            except FileNotFoundError:
                return False
        return self._retry(go, f"exists({url})")

    def invalidate(self, url: Optional[str] = None) -> None:
        try:
            self.fs.invalidate_cache(self._p(url) if url else None)
        except Exception:  # filesystems without a cache raise nothing useful here
            pass

    def list_dir(self, url: str) -> List[Tuple[str, str, int]]:
        """``(name, type, size)`` of the entries directly under ``url``; [] if it does not exist."""
        path = self._p(url)

        def go():
            self.invalidate(url)
            try:
                return self.fs.ls(path, detail=True)
            except FileNotFoundError:
                return []
        entries = self._retry(go, f"list({url})")
        out = []
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e["name"].rstrip("/") == path.rstrip("/"):
                continue  # some stores list the prefix itself
            out.append((name, e.get("type", "file"), int(e.get("size") or 0)))
        return sorted(out)

    def list_subdirs(self, url: str) -> List[str]:
        return [n for n, t, _ in self.list_dir(url) if t == "directory"]

    def tree_size(self, url: str) -> int:
        def go() -> int:
            self.invalidate(url)
            try:
                return int(self.fs.du(self._p(url), total=True))
            except FileNotFoundError:
                return 0
        return self._retry(go, f"du({url})")

    def size(self, url: str) -> int:
        def go() -> int:
            self.invalidate(url)
            return int(self.fs.size(self._p(url)))
        return self._retry(go, f"size({url})")

    def files(self, url: str) -> List[str]:
        """Relative paths of every file under ``url`` (recursive), sorted."""
        base = self._p(url).rstrip("/")

        def go() -> List[str]:
            self.invalidate(url)
            try:
                found = self.fs.find(base)
            except FileNotFoundError:
                return []
            return sorted(p[len(base) + 1:] for p in found if p.startswith(base + "/"))
        return self._retry(go, f"find({url})")

    # -- reads / writes ----------------------------------------------------------------------
    def read_bytes(self, url: str) -> bytes:
        return self._retry(lambda: self.fs.cat_file(self._p(url)), f"read({url})")

    def read_text(self, url: str) -> str:
        return self.read_bytes(url).decode("utf-8")

    def makedirs(self, url: str) -> None:
        if self.is_local:
            os.makedirs(self._p(url), exist_ok=True)
        # object stores have no directories; memory:// creates pseudo-dirs on write

    def write_atomic(self, url: str, data: bytes) -> None:
        """Readers see the old content or the whole new content, never a prefix; durable on return."""
        if self.is_local:
            atomic_write_bytes(self._p(url), data)
            return
        # one PUT: the object appears whole or not at all, so a retry is safe
        self._retry(lambda: atomic_write_bytes(url, data, fs=self.fs), f"write({url})")
        self.invalidate(url)

    def rm_tree(self, url: str) -> None:
        if self.exists(url):
            self._retry(lambda: self.fs.rm(self._p(url), recursive=True), f"rm -r {url}")
        self.invalidate(url)

    def rm_file(self, url: str) -> None:
        self._retry(lambda: self.fs.rm(self._p(url)), f"rm {url}")
        self.invalidate(url)

    def put_file(self, local_path: str, url: str) -> None:
        """Upload one local file (an object store PUT; retried as a whole on transient errors)."""
        self._retry(lambda: self.fs.put_file(local_path, self._p(url)), f"upload {url}")
        self.invalidate(url)

    def get_file(self, url: str, local_path: str) -> None:
        os.makedirs(os.path.dirname(local_path), exist_ok=True)
        self._retry(lambda: self.fs.get_file(self._p(url), local_path), f"download {url}")


def open_storage(url: str, storage_options: Optional[Mapping[str, Any]] = None) -> Storage:
    return Storage(url, storage_options)

__all__ = ["Storage", "open_storage", "fsspec_options", "is_transient", "retry"]

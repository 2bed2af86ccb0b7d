"""Small fsspec helpers so one code path serves local disks, FSx mounts and object stores (s3://).

Object stores have no rename and no directories; what they do have is an atomic single PUT. So a
small file is written atomically as temp + fsync + rename + fsync(dir) locally, and as one PUT
elsewhere. Listings are read fresh (fsspec caches them per filesystem instance).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

from fsspec.core import url_to_fs

_LOCAL_PROTOCOLS = {"file", "local"}


class Storage:
    """The filesystem behind one checkpoint root, with ``storage_options`` (e.g. ``endpoint_url``,
    ``key``/``secret``, ``client_kwargs`` for s3fs) applied to every call."""

    def __init__(self, url: str, storage_options: Optional[Mapping[str, Any]] = None):
        self.storage_options: Dict[str, Any] = dict(storage_options or {})
        self.fs, _ = url_to_fs(url, **self.storage_options)
        protocol = self.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        self.is_local = any(p in _LOCAL_PROTOCOLS for p in protocols)

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
        self.invalidate(url)
        return self.fs.exists(self._p(url))

    def invalidate(self, url: Optional[str] = None) -> None:
        try:
            self.fs.invalidate_cache(self._p(url) if url else None)
        except Exception:  # filesystems without a cache raise nothing useful here
            pass

    def list_dir(self, url: str) -> List[Tuple[str, str, int]]:
        """``(name, type, size)`` of the entries directly under ``url``; [] if it does not exist."""
        self.invalidate(url)
        path = self._p(url)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
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
        self.invalidate(url)
        try:
            return int(self.fs.du(self._p(url), total=True))
        except FileNotFoundError:
            return 0

    def size(self, url: str) -> int:
        self.invalidate(url)
        return int(self.fs.size(self._p(url)))

    # -- reads / writes ----------------------------------------------------------------------
    def read_bytes(self, url: str) -> bytes:
        return self.fs.cat_file(self._p(url))

    def read_text(self, url: str) -> str:
        return self.read_bytes(url).decode("utf-8")

    def makedirs(self, url: str) -> None:
        if self.is_local:
            os.makedirs(self._p(url), exist_ok=True)
        # object stores have no directories; memory:// creates pseudo-dirs on write

    def write_atomic(self, url: str, data: bytes) -> None:
        """Readers see the old content or the whole new content, never a prefix; durable on return."""
        if not self.is_local:
            self.fs.pipe_file(self._p(url), data)  # one PUT: the object appears whole or not at all
            return
        url = self._p(url)
        directory = os.path.dirname(url)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, url)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(directory)

    def rm_tree(self, url: str) -> None:
        if self.exists(url):
            self.fs.rm(self._p(url), recursive=True)
        self.invalidate(url)

    def rm_file(self, url: str) -> None:
        self.fs.rm(self._p(url))
        self.invalidate(url)


def _fsync_dir(directory: str) -> None:
    """Make a rename durable: the directory entry lives in the directory's own inode."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and FSx for Lustre clients) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def open_storage(url: str, storage_options: Optional[Mapping[str, Any]] = None) -> Storage:
    return Storage(url, storage_options)

__all__ = ["Storage", "open_storage"]

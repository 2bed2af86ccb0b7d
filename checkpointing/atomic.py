"""Write-then-rename, the one implementation: a reader sees the old content or the whole new
content, never a prefix, and the new content is durable when the call returns.

- Local paths (and ``file://``): a temp file in the target's directory (same filesystem, so the
  rename is atomic), written, fsynced, ``os.replace``d over the target, then the directory is
  fsynced (the new entry lives in the directory's inode). On any failure the temp file is removed
  and the target is untouched.
- Other fsspec URLs (``s3://``, ``memory://``, ...): object stores have no rename; one PUT
  (``pipe_file``) makes the object appear whole or not at all.

Used for checkpoint markers and metadata, exit records, the heartbeat, the resolved config, shard
indexes and rendered launch scripts. ``publish_dir`` is the same idea for a whole directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

__all__ = ["atomic_write_bytes", "atomic_write_text", "publish_dir"]


def _local_path(path_or_url: str) -> Optional[str]:
    """The local path of ``path_or_url``, or None for a URL of another filesystem."""
    s = os.fspath(path_or_url)
    if s.startswith("file://"):
        return s[len("file://"):]
    return None if "://" in s else s


def atomic_write_bytes(path_or_url: str, data: bytes, storage_options: Optional[Mapping[str, Any]] = None,
                       *, mode: Optional[int] = None, fs: Optional[AbstractFileSystem] = None) -> None:
    """Replace ``path_or_url`` with ``data`` atomically (see the module docstring).

    ``storage_options`` go to the fsspec filesystem of a URL (``checkpointing.storage.fsspec_options``
    maps our short S3 keys); ``fs`` is an already-open fsspec filesystem to use instead. ``mode``
    (local only) is applied to the file before it appears, e.g. 0o755 for a script."""
    local = None if fs is not None and not _is_local_fs(fs) else _local_path(path_or_url)
    if local is None:
        if fs is None:
            from fsspec.core import url_to_fs

            from checkpointing.storage import fsspec_options

            fs, path = url_to_fs(path_or_url, **fsspec_options(path_or_url, storage_options))
        else:
            path = fs._strip_protocol(path_or_url)
        fs.pipe_file(path, data)
        return
    if fs is not None:
        local = fs._strip_protocol(path_or_url)
    directory = os.path.dirname(os.path.abspath(local))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(local)}.tmp.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, local)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def atomic_write_text(path_or_url: str, text: str, storage_options: Optional[Mapping[str, Any]] = None,
                      *, mode: Optional[int] = None, fs: Optional[AbstractFileSystem] = None) -> None:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path_or_url, text.encode("utf-8"), storage_options, mode=mode, fs=fs)


def publish_dir(tmp_dir: str, final_dir: str, marker: str = "") -> bool:
    """Rename a finished local ``tmp_dir`` to ``final_dir``. True when this call put it there;
    False when another writer got there first (a non-empty target makes the rename fail): then
    ``tmp_dir`` is removed and theirs is kept, provided it is complete (holds ``marker``, when
    given). Other failures raise."""
    try:
        os.rename(tmp_dir, final_dir)
    except OSError:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if not os.path.exists(os.path.join(final_dir, marker) if marker else final_dir):
            raise
        return False
    _fsync_dir(os.path.dirname(os.path.abspath(final_dir)))
    return True


def _is_local_fs(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol
    return any(p in ("file", "local") for p in ((protocol,) if isinstance(protocol, str) else protocol))


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

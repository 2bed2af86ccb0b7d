"""Tokenized shard format: flat token files plus one `index.json`, read through fsspec.

Layout of a shard directory (local path, FSx path, `s3://bucket/prefix`, any fsspec URL):

    index.json             written last: its presence means every shard it lists is complete
    train_00000.bin ...    raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    val_00000.bin ...
    tokenizer.json         (BPE only) the tokenizer, so samples can be decoded

`index.json`:

    {"format": "moeforge-shards", "version": 1, "dtype": "uint16", "vocab_size": 256,
     "eos_id": 0, "tokenizer": {"name": "byte", ...},
     "splits": {"train": {"tokens": N, "documents": D, "files": [{"file": ..., "tokens": n}]},
                "val": {...}},
     "meta": {...free-form provenance...}}

A split's token stream is its files concatenated in index order; every document ends with
`eos_id`. Local files are memory-mapped; remote files are read with ranged GETs
(`cat_ranges`, concurrent on async filesystems such as s3fs), so nothing is downloaded whole.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Dict, List, Optional, Sequence, Tuple

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from checkpointing.atomic import atomic_write_bytes

FORMAT_NAME = "moeforge-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 64 * 2**20


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _fs_and_root(path: str, storage_options: Optional[Dict[str, Any]] = None):
    fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    return fs, root.rstrip("/") if root not in ("/", "") else root


# ---------------------------------------------------------------- token sources


class ArraySource:
    """Tokens held in a numpy array (in memory or memory-mapped)."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def read_many(self, ranges: Sequence[Tuple[int, int]]) -> List[np.ndarray]:
        return [np.asarray(self.tokens[a:b]) for a, b in ranges]


class RemoteSource:
    """Tokens [start, start + n_tokens) of a file on a remote filesystem, read by byte ranges (a
    whole shard, or a slice of a Megatron `.bin`)."""

    def __init__(self, fs, path: str, dtype, n_tokens: int, start: int = 0) -> None:
        self.fs, self.path, self.dtype, self.n = fs, path, np.dtype(dtype), int(n_tokens)
        self.start = int(start)

    def __len__(self) -> int:
        return self.n

    def read_many(self, ranges: Sequence[Tuple[int, int]]) -> List[np.ndarray]:
        w = self.dtype.itemsize
        starts = [(self.start + a) * w for a, _ in ranges]
        ends = [(self.start + b) * w for _, b in ranges]
        if hasattr(self.fs, "cat_ranges"):
            blobs = self.fs.cat_ranges([self.path] * len(ranges), starts, ends)
        else:  # pragma: no cover - every current fsspec filesystem has cat_ranges
            blobs = [self.fs.cat_file(self.path, s, e) for s, e in zip(starts, ends)]
        out = []
        for blob, (a, b) in zip(blobs, ranges):
            if isinstance(blob, Exception):
                raise blob
            if len(blob) != (b - a) * w:
                raise IOError(f"short read from {self.path}: wanted {(b - a) * w} bytes "
                              f"at token {self.start + a}, got {len(blob)}")
            out.append(np.frombuffer(blob, dtype=self.dtype))
        return out


# ---------------------------------------------------------------- writer


class ShardWriter:
    """Streams documents into fixed-size shard files; `close()` writes index.json last."""

    def __init__(self, output: str, vocab_size: int, eos_id: int, tokenizer: Dict[str, Any],
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, dtype: Optional[str] = None,
                 storage_options: Optional[Dict[str, Any]] = None) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens={shard_tokens} must be >= 1")
        self.dtype = np.dtype(dtype or dtype_for_vocab(vocab_size))
        if self.dtype == np.uint16 and vocab_size > 2**16:
            raise ValueError(f"vocab_size={vocab_size} does not fit uint16; use uint32")
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ValueError(f"dtype={self.dtype} must be uint16 or uint32")
        self.fs, self.root = _fs_and_root(output, storage_options)
        self.fs.makedirs(self.root, exist_ok=True)
        self.vocab_size, self.eos_id, self.tokenizer = int(vocab_size), int(eos_id), tokenizer
        self.shard_tokens = int(shard_tokens)
        self._buf: Dict[str, List[np.ndarray]] = {s: [] for s in SPLITS}
        self._buf_n = {s: 0 for s in SPLITS}
        self._files: Dict[str, List[Dict[str, Any]]] = {s: [] for s in SPLITS}
        self._docs = {s: 0 for s in SPLITS}
        self._tokens = {s: 0 for s in SPLITS}

    def add_document(self, tokens: np.ndarray, split: str = "train", eos: bool = True) -> None:
        """Append one document's ids (EOS appended unless `eos=False`)."""
        arr = np.asarray(tokens).reshape(-1)
        if arr.size and (int(arr.max()) >= self.vocab_size or int(arr.min()) < 0):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        if eos:
            arr = np.concatenate([arr.astype(self.dtype), np.array([self.eos_id], self.dtype)])
        self._buf[split].append(arr.astype(self.dtype, copy=False))
        self._buf_n[split] += int(arr.size)
        self._docs[split] += 1
        self._tokens[split] += int(arr.size)
        while self._buf_n[split] >= self.shard_tokens:
            self._flush(split, self.shard_tokens)

    def _flush(self, split: str, n: int) -> None:
        flat = np.concatenate(self._buf[split]) if self._buf[split] else np.zeros(0, self.dtype)
        head, rest = flat[:n], flat[n:]
        self._buf[split] = [rest] if rest.size else []
        self._buf_n[split] = int(rest.size)
        name = f"{split}_{len(self._files[split]):05d}.bin"
        with self.fs.open(posixpath.join(self.root, name), "wb") as f:
            f.write(head.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._files[split].append({"file": name, "tokens": int(head.size)})

    def write_file(self, name: str, text: str) -> None:
        self.fs.pipe_file(posixpath.join(self.root, name), text.encode("utf-8"))

    def close(self, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        for s in SPLITS:
            if self._buf_n[s]:
                self._flush(s, self._buf_n[s])
        index = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": self.dtype.name,
            "vocab_size": self.vocab_size, "eos_id": self.eos_id, "tokenizer": self.tokenizer,
            "splits": {s: {"tokens": self._tokens[s], "documents": self._docs[s],
                           "files": self._files[s]} for s in SPLITS},
            "meta": dict(meta or {}),
        }
        data = json.dumps(index, indent=1, sort_keys=True).encode("utf-8")
        dest = posixpath.join(self.root, INDEX_FILE)
        atomic_write_bytes(dest, data, fs=self.fs)  # local: temp + rename; object stores: one PUT
        return index


# ---------------------------------------------------------------- reader


class ShardSet:
    """An opened shard directory: its index and per-split token sources."""

    def __init__(self, path: str, storage_options: Optional[Dict[str, Any]] = None) -> None:
        self.path = path
        self.fs, self.root = _fs_and_root(path, storage_options)
        index_path = posixpath.join(self.root, INDEX_FILE)
        if not self.fs.exists(index_path):
            raise FileNotFoundError(
                f"no {INDEX_FILE} under {path!r}: not a shard directory, or its writer did not "
                f"finish (build one with `python -m train.prepare --input ... --output {path}`)")
        with self.fs.open(index_path, "rb") as f:
            self.index = json.loads(f.read().decode("utf-8"))
        if self.index.get("format") != FORMAT_NAME:
            raise ValueError(f"{index_path}: format={self.index.get('format')!r}, "
                             f"expected {FORMAT_NAME!r}")
        if int(self.index.get("version", -1)) > FORMAT_VERSION:
            raise ValueError(f"{index_path}: version {self.index['version']} is newer than "
                             f"this reader ({FORMAT_VERSION})")
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size = int(self.index["vocab_size"])
        self.eos_id = int(self.index["eos_id"])
        self._local = isinstance(self.fs, LocalFileSystem)

    def num_tokens(self, split: str) -> int:
        return int(self.index["splits"][split]["tokens"])

    def sources(self, split: str) -> List[Any]:
        if split not in self.index["splits"]:
            raise KeyError(f"split {split!r} not in {self.path} (has {list(self.index['splits'])})")
        out: List[Any] = []
        w = self.dtype.itemsize
        for entry in self.index["splits"][split]["files"]:
            n = int(entry["tokens"])
            if n == 0:
                continue
            p = posixpath.join(self.root, entry["file"])
            if self._local:
                size = os.path.getsize(p)
                if size != n * w:
                    raise IOError(f"{p}: {size} bytes, index.json says {n} tokens x {w} bytes")
                out.append(ArraySource(np.memmap(p, dtype=self.dtype.newbyteorder("<"),
                                                 mode="r", shape=(n,))))
            else:
                out.append(RemoteSource(self.fs, p, self.dtype.newbyteorder("<").str, n))
        return out

    def tokenizer(self):
        """The tokenizer these shards were written with (for decoding samples)."""
        from train.data.tokenizer import BPETokenizer, ByteTokenizer

        name = self.index["tokenizer"]["name"]
        if name == "byte":
            return ByteTokenizer()
        if name == "bpe":
            tok_path = posixpath.join(self.root, self.index["tokenizer"]["file"])
            with self.fs.open(tok_path, "rb") as f:
                return BPETokenizer.from_str(f.read().decode("utf-8"))
        raise ValueError(f"unknown tokenizer {name!r} in {self.path}/{INDEX_FILE}")

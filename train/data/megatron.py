"""Megatron-LM / megatron-core indexed datasets (`<prefix>.bin` + `<prefix>.idx`) as a token source.

The `.idx` layout (MMIDIDX, version 1), as megatron-core's `_IndexWriter` writes it
(`megatron/core/datasets/indexed_dataset.py`, checked against megatron-core 0.16.1):

    b"MMIDIDX\\x00\\x00"          9 bytes
    version                      uint64 LE (== 1)
    dtype code                   uint8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                        6 float64, 7 float32, 8 uint16
    sequence_count               uint64 LE
    document_count               uint64 LE (entries of document_indices: #documents + 1)
    sequence_lengths             int32[sequence_count]   (tokens per sequence)
    sequence_pointers            int64[sequence_count]   (byte offset of each sequence in .bin)
    document_indices             int64[document_count]   (0, then the sequence index that ends
                                                          each document)
    (sequence_modes int8[sequence_count], multimodal datasets only: not supported here)

The `.bin` is the sequences' tokens back to back in that dtype. Megatron's writer makes the
pointers contiguous (this reader checks it), so the token stream of documents [d0, d1) is one
contiguous byte range of `.bin`: it is read as is, memory-mapped for a local path, by ranged
reads (`cat_ranges`) for any other fsspec URL (s3://, memory://, ...).

End of document: nothing is inserted between documents. Megatron's preprocessing appends the
tokenizer's EOD itself when run with `--append-eod` (the usual choice for GPT pretraining), and
the files do not record the EOD id, so the stream here is exactly the tokens Megatron trains on.
Data written without `--append-eod` runs documents together, as it does in Megatron.

Vocabulary: the files do not record it either. The data's vocab is a configured value
(`data.megatron_vocab_size`, trusted, nothing is scanned) or, when that is 0, the largest token
id + 1 found by scanning every token (cheap for a local memmap; a full read for remote data).
"""

from __future__ import annotations

import os
import struct
from typing import Any, Dict, Optional, Tuple

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from train.data.shards import ArraySource, RemoteSource

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
_SCAN_TOKENS = 16 * 2**20


class MegatronIndexedDataset:
    """An opened `<prefix>.bin`/`<prefix>.idx` pair (local path or any fsspec URL)."""

    def __init__(self, prefix: str, storage_options: Optional[Dict[str, Any]] = None) -> None:
        for ext in (".bin", ".idx"):
            if prefix.endswith(ext):
                raise ValueError(f"{prefix!r}: give the prefix, without {ext}")
        self.prefix = prefix
        self.fs, root = fsspec.core.url_to_fs(prefix, **dict(storage_options or {}))
        self.idx_path, self.bin_path = root + ".idx", root + ".bin"
        self._local = isinstance(self.fs, LocalFileSystem)
        for p in (self.idx_path, self.bin_path):
            if not self.fs.exists(p):
                raise FileNotFoundError(
                    f"{p} not found: data.path must be the prefix of a Megatron indexed dataset "
                    f"(<prefix>.bin and <prefix>.idx, e.g. from Megatron's "
                    f"tools/preprocess_data.py --output-prefix)")
        head = self.fs.cat_file(self.idx_path, 0, _HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:9] != INDEX_HEADER:
            raise ValueError(f"{self.idx_path}: not a Megatron MMIDIDX index (bad header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != INDEX_VERSION:
            raise ValueError(f"{self.idx_path}: MMIDIDX version {version}, this reader "
                             f"knows {INDEX_VERSION}")
        if code not in DTYPE_CODES:
            raise ValueError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code]).newbyteorder("<")
        if self.dtype.kind not in "iu":
            raise ValueError(f"{self.idx_path}: token dtype {self.dtype.name} is not an integer")
        expected = _HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
        size = int(self.fs.size(self.idx_path))
        if size == expected + n_seq and n_seq:
            raise ValueError(f"{self.idx_path}: multimodal index (sequence modes) not supported")
        if size != expected:
            raise IOError(f"{self.idx_path}: {size} bytes, its header implies {expected}")
        if self._local:
            body = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        else:
            body = np.frombuffer(self.fs.cat_file(self.idx_path), dtype=np.uint8)
        off = _HEADER_BYTES
        self.sequence_lengths = np.frombuffer(body, "<i4", n_seq, off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(body, "<i8", n_seq, off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(body, "<i8", n_doc, off)
        # Token offset of each sequence; the pointers must be these, contiguous from 0.
        self._seq_starts = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        if not np.array_equal(self.sequence_pointers,
                              self._seq_starts[:-1] * self.dtype.itemsize):
            raise ValueError(f"{self.idx_path}: sequences are not stored contiguously in .bin")
        self.num_tokens = int(self._seq_starts[-1])
        bin_size = int(self.fs.size(self.bin_path))
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise IOError(f"{self.bin_path}: {bin_size} bytes, the index says {self.num_tokens} "
                          f"tokens x {self.dtype.itemsize} bytes")
        if n_doc < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            raise ValueError(f"{self.idx_path}: malformed document indices")
        self._tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r",
                                  shape=(self.num_tokens,))
                        if self._local and self.num_tokens else None)

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.shape[0]) - 1

    def document_token_range(self, d0: int, d1: int) -> Tuple[int, int]:
        """Token offsets [a, b) in the stream of documents [d0, d1)."""
        s0, s1 = int(self.document_indices[d0]), int(self.document_indices[d1])
        return int(self._seq_starts[s0]), int(self._seq_starts[s1])

    def source(self, d0: int = 0, d1: Optional[int] = None) -> Any:
        """A TokenDataset source for documents [d0, d1) (all by default)."""
        a, b = self.document_token_range(d0, self.num_documents if d1 is None else d1)
        if self._tokens is not None:
            return ArraySource(self._tokens[a:b])
        return RemoteSource(self.fs, self.bin_path, self.dtype, b - a, start=a)

    def tokens(self, d0: int = 0, d1: Optional[int] = None) -> np.ndarray:
        src = self.source(d0, d1)
        return src.read_many([(0, len(src))])[0] if len(src) else np.zeros(0, self.dtype)

    def max_token_id(self) -> int:
        """Largest token id in the data (scans every token in chunks); -1 if empty."""
        src, best = self.source(), -1
        for a in range(0, len(src), _SCAN_TOKENS):
            chunk = src.read_many([(a, min(len(src), a + _SCAN_TOKENS))])[0]
            if chunk.size:
                if int(chunk.min()) < 0:
                    raise ValueError(f"{self.bin_path}: negative token id")
                best = max(best, int(chunk.max()))
        return best


def split_documents(n_docs: int, val_fraction: float) -> int:
    """First validation document when the last `val_fraction` of documents is held out
    (contiguous, like Megatron's own --split): at least one document each side."""
    if n_docs < 2:
        raise ValueError(f"a Megatron dataset with {n_docs} document(s) cannot be split into "
                         f"train and validation: set data.val_path or use more documents")
    n_val = min(n_docs - 1, max(1, int(round(n_docs * float(val_fraction)))))
    return n_docs - n_val


def open_megatron(path: str, val_path: str, val_fraction: float, vocab_size: int,
                  storage_options: Optional[Dict[str, Any]] = None):
    """(train_sources, val_sources, data_vocab_size, info) for build_datasets."""
    train = MegatronIndexedDataset(path, storage_options)
    if val_path:
        val = MegatronIndexedDataset(val_path, storage_options)
        train_src, val_src = [train.source()], [val.source()]
        split = {"val_path": val_path, "val_documents": val.num_documents}
        parts = [train, val]
    else:
        cut = split_documents(train.num_documents, val_fraction)
        train_src, val_src = [train.source(0, cut)], [train.source(cut)]
        split = {"val_fraction": float(val_fraction), "val_documents": train.num_documents - cut}
        parts = [train]
    if vocab_size > 0:
        data_vocab, vocab_from = int(vocab_size), "data.megatron_vocab_size"
    else:
        data_vocab, vocab_from = max(p.max_token_id() for p in parts) + 1, "max token id + 1"
    n_train, n_val = len(train_src[0]), len(val_src[0])
    info = {"source": "megatron", "path": path, "vocab_size": data_vocab,
            "vocab_from": vocab_from, "eos_id": -1, "tokenizer": "unknown (megatron)",
            "dtype": train.dtype.name, "documents": train.num_documents,
            "train_tokens": n_train, "val_tokens": n_val, **split,
            "description": f"megatron {path} ({train.dtype.name}, "
                           f"{n_train / 1e6:.1f}M train tokens)"}
    return train_src, val_src, data_vocab, info

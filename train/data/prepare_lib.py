"""Build a shard directory from text or JSONL files (the work behind `python -m train.prepare`).

Each text file is one document; each JSONL line is one document (its `jsonl_key` string).
Inputs are paths or globs, local or any fsspec URL; compressed inputs (.gz, .bz2, .xz, .zst
where the codec is installed) are read by extension.

Validation split: a document goes to `val` when a hash of its content, read as a number in
[0, 1), is below `val_fraction` -- deterministic, and duplicates land in the same split. If no
document falls in `val` (few, large documents: one text file), the tail of the last train
document (val_fraction of all tokens, at least one token) becomes the val split instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import fsspec
import numpy as np

from train.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter
from train.data.tokenizer import BPETokenizer, ByteTokenizer

FORMATS = ("text", "jsonl")
TOKENIZERS = ("byte", "bpe")
_GLOB_CHARS = set("*?[")


class PrepareError(ValueError):
    """Bad prepare inputs or options; the message says which and how to fix it."""


def expand_inputs(inputs: Sequence[str], storage_options: Optional[Dict[str, Any]] = None
                  ) -> List[str]:
    """Every input path or glob expanded (sorted within a glob), as full URLs; errors if empty."""
    out: List[str] = []
    for spec in inputs:
        fs, path = fsspec.core.url_to_fs(spec, **dict(storage_options or {}))
        if any(c in spec for c in _GLOB_CHARS):
            matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not matches:
                raise PrepareError(f"--input {spec!r} matched no files")
        elif fs.isfile(path):
            matches = [path]
        elif fs.isdir(path):
            raise PrepareError(f"--input {spec!r} is a directory; pass files or a glob "
                               f"such as '{spec.rstrip('/')}/*.txt'")
        else:
            raise PrepareError(f"--input {spec!r} does not exist")
        out.extend(fs.unstrip_protocol(p) for p in matches)
    if not out:
        raise PrepareError("no --input given")
    return out


def iter_documents(urls: Sequence[str], fmt: str = "text", jsonl_key: str = "text",
                   storage_options: Optional[Dict[str, Any]] = None) -> Iterator[str]:
    if fmt not in FORMATS:
        raise PrepareError(f"--format={fmt!r} must be one of {', '.join(FORMATS)}")
    so = dict(storage_options or {})
    for url in urls:
        with fsspec.open(url, "rt", encoding="utf-8", errors="replace", compression="infer",
                         **so) as f:
            if fmt == "text":
                yield f.read()
                continue
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{url}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(jsonl_key), str):
                    raise PrepareError(f"{url}:{lineno}: no string field {jsonl_key!r} "
                                       f"(choose the field with --jsonl-key)")
                yield obj[jsonl_key]


def _is_val(doc: str, val_fraction: float) -> bool:
    h = hashlib.sha256(doc.encode("utf-8", errors="replace")).digest()[:8]
    return int.from_bytes(h, "big") / 2.0**64 < val_fraction


def prepare(inputs: Sequence[str], output: str, fmt: str = "text", jsonl_key: str = "text",
            tokenizer: str = "byte", vocab_size: Optional[int] = None,
            val_fraction: float = 0.01, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            storage_options: Optional[Dict[str, Any]] = None,
            log: Callable[[str], None] = print, progress_every_s: float = 5.0) -> Dict[str, Any]:
    """Tokenize the inputs into shards under `output`; returns the written index."""
    if tokenizer not in TOKENIZERS:
        raise PrepareError(f"--tokenizer={tokenizer!r} must be one of {', '.join(TOKENIZERS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction={val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise PrepareError(f"--shard-tokens={shard_tokens} must be >= 1")
    if fmt not in FORMATS:
        raise PrepareError(f"--format={fmt!r} must be one of {', '.join(FORMATS)}")
    urls = expand_inputs(inputs, storage_options)
    log(f"prepare: {len(urls)} input file(s), format={fmt}, tokenizer={tokenizer}")

    def docs() -> Iterator[str]:
        return iter_documents(urls, fmt, jsonl_key, storage_options)

    if tokenizer == "byte":
        if vocab_size not in (None, ByteTokenizer.vocab_size):
            raise PrepareError(f"--vocab-size={vocab_size} applies to --tokenizer bpe only "
                               f"(byte-level is always {ByteTokenizer.vocab_size})")
        tok: Any = ByteTokenizer()
    else:
        t0 = time.perf_counter()
        tok = BPETokenizer.train(docs(), int(vocab_size or 8192))
        log(f"prepare: trained BPE (vocab {tok.vocab_size}) in {time.perf_counter() - t0:.1f}s")

    writer = ShardWriter(output, tok.vocab_size, tok.eos_id, tok.to_json(), shard_tokens,
                         storage_options=storage_options)
    if tokenizer == "bpe":
        writer.write_file("tokenizer.json", tok.to_str())
    t0 = last = time.perf_counter()
    n_docs = n_tokens = n_val = 0
    pending: Optional[np.ndarray] = None  # last train document, held back for the val fallback

    for text in docs():
        ids = tok.encode(text)
        n_docs += 1
        n_tokens += int(ids.size) + 1
        if val_fraction > 0 and _is_val(text, val_fraction):
            writer.add_document(ids, "val")
            n_val += 1
        else:
            if pending is not None:
                writer.add_document(pending, "train")
            pending = ids
        now = time.perf_counter()
        if now - last >= progress_every_s:
            last = now
            log(f"prepare: {n_docs} docs, {n_tokens / 1e6:.2f}M tokens, "
                f"{n_tokens / (now - t0) / 1e6:.2f}M tok/s")
    if n_docs == 0:
        raise PrepareError("the inputs hold no documents")
    if pending is not None:
        if val_fraction > 0 and n_val == 0:
            k = max(1, math.ceil(val_fraction * n_tokens))
            k = min(k, max(int(pending.size) - 1, 0))
            if k < 1:
                raise PrepareError(f"too little text for a val split ({n_tokens} tokens); "
                                   f"add inputs or pass --val-fraction 0")
            writer.add_document(pending[:-k], "train", eos=False)
            writer.add_document(pending[-k:], "val")
            log(f"prepare: no whole document fell in val; its last {k} tokens of the last "
                f"document are the val split")
        else:
            writer.add_document(pending, "train")
    index = writer.close(meta={"inputs": list(inputs), "n_input_files": len(urls),
                               "format": fmt, "jsonl_key": jsonl_key if fmt == "jsonl" else None,
                               "val_fraction": val_fraction})
    sp = index["splits"]
    log(f"prepare: wrote {output}: train {sp['train']['tokens']} tokens in "
        f"{len(sp['train']['files'])} shard(s), val {sp['val']['tokens']} tokens, "
        f"dtype {index['dtype']}, vocab {index['vocab_size']} "
        f"({time.perf_counter() - t0:.1f}s)")
    return index

"""The builtin corpus: the Python standard library's own source, on every machine, no download.

Real text (code, docstrings, comments) that exists wherever the trainer runs. Files are the
`.py` files under `sysconfig.get_paths()["stdlib"]`, minus site-packages, test suites and
`encodings/` (codec tables), taken in sorted relative-path order until `max_bytes`; each file
is one document, followed by EOS, tokenized byte-level (vocab 256, EOS = id 0).

The stdlib differs between Python versions (and patch releases), so the corpus is identified by a
content hash (sha256 over every file's relative path and bytes) that `info["corpus_hash"]`
reports and the run should record: two runs trained on the same corpus iff the hashes match.
Ranks of one job must run the same Python; compare hashes across ranks if in doubt.

Validation holds out whole files: files are ranked by a hash of their relative path and taken in
that order until they hold `val_fraction` of the corpus bytes (at least one file, never all), so
the split is deterministic, by file, and about the requested size.

The tokenized corpus is cached as a shard directory (`train/data/shards.py` format) under
`<cache_dir>/builtin-<key>/`, key = hash of (corpus hash, val_fraction, tokenizer). Several
ranks may build it at once: each writes a private temp directory and renames it into place;
the first rename wins and the others discard theirs.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import time
import uuid
from typing import Dict, List, Optional, Tuple

from checkpointing.atomic import publish_dir
from train.data.shards import ShardSet, ShardWriter
from train.data.tokenizer import ByteTokenizer

CORPUS_VERSION = 2
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__", "encodings"})


def default_cache_dir() -> str:
    if os.environ.get("MOEFORGE_CACHE_DIR"):
        return os.environ["MOEFORGE_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moeforge")


def stdlib_files(max_bytes: int, root: Optional[str] = None) -> List[Tuple[str, str]]:
    """(relative posix path, absolute path) of the corpus files, sorted, capped at max_bytes."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for fn in filenames:
            if fn.endswith(".py"):
                ap = os.path.join(dirpath, fn)
                found.append((os.path.relpath(ap, root).replace(os.sep, "/"), ap))
    found.sort()
    out, total = [], 0
    for rel, ap in found:
        size = os.path.getsize(ap)
        if total + size > max_bytes:
            break
        out.append((rel, ap))
        total += size
    return out


def _path_rank(rel: str) -> bytes:
    return hashlib.sha256(rel.encode("utf-8")).digest()


def read_corpus(max_bytes: int, root: Optional[str] = None) -> Tuple[List[Tuple[str, bytes]], str]:
    """The corpus documents and their content hash."""
    h = hashlib.sha256(f"moeforge-builtin-v{CORPUS_VERSION}\0".encode())
    docs = []
    for rel, ap in stdlib_files(max_bytes, root):
        with open(ap, "rb") as f:
            data = f.read()
        h.update(rel.encode("utf-8") + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
        docs.append((rel, data))
    if not docs:
        where = root or sysconfig.get_paths()["stdlib"]
        raise FileNotFoundError(f"no .py files found under the stdlib {where}")
    return docs, h.hexdigest()


def val_files(docs: List[Tuple[str, bytes]], val_fraction: float) -> set:
    """Relative paths of the held-out files (see the module docstring)."""
    target = val_fraction * sum(len(d) for _, d in docs)
    chosen, size = set(), 0
    for rel, data in sorted(docs, key=lambda rd: _path_rank(rd[0])):
        if size >= target or len(chosen) == len(docs) - 1:
            break
        chosen.add(rel)
        size += len(data)
    return chosen


def build_builtin_corpus(cache_dir: Optional[str] = None, max_bytes: int = 12 * 2**20,
                         val_fraction: float = 0.01, root: Optional[str] = None,
                         log=None) -> Tuple[ShardSet, Dict]:
    """Open (building on first use) the cached builtin corpus. Returns (shards, info)."""
    t0 = time.perf_counter()
    docs, corpus_hash = read_corpus(max_bytes, root)
    tok = ByteTokenizer()
    key = hashlib.sha256(f"{corpus_hash}|val={val_fraction!r}|{tok.name}|v{CORPUS_VERSION}"
                         .encode()).hexdigest()[:16]
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    final = os.path.join(cache_dir, f"builtin-{key}")
    built = False
    if not os.path.exists(os.path.join(final, "index.json")):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = os.path.join(cache_dir, f".tmp-builtin-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        val = val_files(docs, val_fraction)
        w = ShardWriter(tmp, tok.vocab_size, tok.eos_id, tok.to_json(), shard_tokens=2**40)
        for rel, data in docs:
            w.add_document(tok.encode(data), "val" if rel in val else "train")
        w.close(meta={"source": "builtin", "corpus_hash": corpus_hash,
                      "python": sys.version.split()[0], "n_files": len(docs),
                      "val_files": sorted(val), "val_fraction": val_fraction,
                      "max_bytes": max_bytes})
        # Another rank may rename its copy first; both copies are byte-identical, so keep theirs.
        built = publish_dir(tmp, final, marker="index.json")
    shards = ShardSet(final)
    info = {"source": "builtin", "corpus_hash": corpus_hash, "python": sys.version.split()[0],
            "n_files": len(docs), "corpus_bytes": sum(len(d) for _, d in docs),
            "train_tokens": shards.num_tokens("train"), "val_tokens": shards.num_tokens("val"),
            "tokenizer": "byte", "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "path": final, "built": built, "seconds": round(time.perf_counter() - t0, 3)}
    info["description"] = (f"builtin stdlib corpus (Python {info['python']}, "
                           f"{info['corpus_bytes'] / 1e6:.1f} MB, {corpus_hash[:12]})")
    if log is not None:
        log(f"builtin corpus {corpus_hash[:12]} ({info['n_files']} files, "
            f"{info['train_tokens']} train / {info['val_tokens']} val tokens) "
            f"{'built' if built else 'cached'} at {final} in {info['seconds']}s")
    return shards, info

import multiprocessing as mp
import os

import numpy as np

from train.data.corpus import build_builtin_corpus, read_corpus
from train.data.tokenizer import ByteTokenizer

SMALL = 1 * 2**20


def _tokens(shards, split):
    return np.concatenate([np.asarray(s.tokens) for s in shards.sources(split)])


def test_builtin_corpus_is_deterministic_and_cached(tmp_path):
    a, info_a = build_builtin_corpus(str(tmp_path / "a"), max_bytes=SMALL)
    b, info_b = build_builtin_corpus(str(tmp_path / "b"), max_bytes=SMALL)
    assert info_a["corpus_hash"] == info_b["corpus_hash"]
    assert len(info_a["corpus_hash"]) == 64
    for split in ("train", "val"):
        assert np.array_equal(_tokens(a, split), _tokens(b, split))
    assert info_a["built"] and info_b["built"]
    again, info_c = build_builtin_corpus(str(tmp_path / "a"), max_bytes=SMALL)
    assert not info_c["built"] and info_c["path"] == info_a["path"]
    assert info_c["corpus_hash"] == info_a["corpus_hash"]
    # The cap changes the corpus, and so the hash.
    _, h_other = read_corpus(SMALL // 2)
    assert h_other != info_a["corpus_hash"]


def test_builtin_corpus_is_real_text(tmp_path):
    shards, info = build_builtin_corpus(str(tmp_path), max_bytes=SMALL)
    assert info["vocab_size"] == 256 and info["eos_id"] == 0
    assert info["n_files"] > 20 and info["train_tokens"] > 500_000 and info["val_tokens"] > 0
    toks = _tokens(shards, "train")
    assert int((toks == 0).sum()) == info["n_files"] - len(shards.index["meta"]["val_files"])
    text = ByteTokenizer().decode(toks[:200_000])
    for word in ("def ", "import ", "return", "class "):
        assert word in text
    printable = sum(c.isprintable() or c in "\n\t" for c in text) / len(text)
    assert printable > 0.99


def test_val_files_disjoint_from_train(tmp_path):
    shards, info = build_builtin_corpus(str(tmp_path), max_bytes=SMALL, val_fraction=0.05)
    val_files = set(shards.index["meta"]["val_files"])
    docs, _ = read_corpus(SMALL)
    assert val_files and len(val_files) < len(docs)
    tok = ByteTokenizer()
    expect_val = sum(len(d) + 1 for r, d in docs if r in val_files)
    assert info["val_tokens"] == expect_val
    total = sum(len(d) + 1 for _, d in docs)
    assert 0.05 * total <= expect_val <= 0.05 * total + max(len(d) + 1 for _, d in docs)
    assert info["train_tokens"] == sum(len(d) + 1 for _, d in docs) - expect_val
    # The val stream is exactly the val files, in order.
    val = np.concatenate([np.append(tok.encode(d), 0) for r, d in docs if r in val_files])
    assert np.array_equal(_tokens(shards, "val"), val)


def _build(args):
    cache, max_bytes = args
    _, info = build_builtin_corpus(cache, max_bytes=max_bytes)
    return info["corpus_hash"], info["path"], info["train_tokens"]


def test_concurrent_builds_are_safe(tmp_path):
    cache = str(tmp_path / "shared")
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.map(_build, [(cache, SMALL)] * 3)
    assert len(set(results)) == 1
    entries = os.listdir(cache)
    assert [e for e in entries if e.startswith("builtin-")] == [os.path.basename(results[0][1])]
    assert not [e for e in entries if e.startswith(".tmp")]

import json
import os
import uuid

import fsspec
import numpy as np
import pytest

from train.data import shards as shards_mod
from train.data.loader import TokenDataset
from train.data.shards import ArraySource, RemoteSource, ShardSet, ShardWriter


def _docs(vocab, n_docs=7, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab - 1, size=int(rng.integers(1, 50))) for _ in range(n_docs)]


def _write(path, vocab, docs, shard_tokens=16, **kw):
    w = ShardWriter(path, vocab, vocab - 1, {"name": "byte"}, shard_tokens=shard_tokens, **kw)
    for i, d in enumerate(docs):
        w.add_document(d, "val" if i % 3 == 2 else "train")
    return w.close(meta={"test": True})


def _expected(docs, vocab, split):
    parts = [np.append(d, vocab - 1) for i, d in enumerate(docs)
             if (i % 3 == 2) == (split == "val")]
    return np.concatenate(parts)


@pytest.mark.parametrize("vocab,dtype", [(257, "uint16"), (65536, "uint16"), (70000, "uint32")])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_round_trip(tmp_path, vocab, dtype, where):
    path = str(tmp_path / "out") if where == "local" else f"memory://shards-{uuid.uuid4().hex}"
    docs = _docs(vocab)
    index = _write(path, vocab, docs)
    assert index["dtype"] == dtype
    s = ShardSet(path)
    assert (s.vocab_size, s.eos_id, s.dtype.name) == (vocab, vocab - 1, dtype)
    assert s.index["meta"] == {"test": True}
    src_type = ArraySource if where == "local" else RemoteSource
    for split in ("train", "val"):
        srcs = s.sources(split)
        assert srcs and all(isinstance(x, src_type) for x in srcs)
        assert len(srcs) == len(s.index["splits"][split]["files"])
        exp = _expected(docs, vocab, split)
        ds = TokenDataset(srcs, split)
        assert ds.num_tokens == s.num_tokens(split) == exp.size
        # Whole-stream read through windows of length 5 that straddle shard boundaries.
        got = ds.windows(range(ds.num_windows(4)), 4)
        for w in range(got.shape[0]):
            assert got[w].tolist() == exp[w * 4: w * 4 + 5].tolist()


def test_file_layout_and_index(tmp_path):
    docs = _docs(257)
    _write(str(tmp_path), 257, docs, shard_tokens=10)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == "moeforge-shards" and index["version"] == 1
    for split in ("train", "val"):
        files = index["splits"][split]["files"]
        assert sum(f["tokens"] for f in files) == index["splits"][split]["tokens"]
        assert all(f["tokens"] == 10 for f in files[:-1])
        for f in files:
            raw = np.fromfile(tmp_path / f["file"], dtype="<u2")
            assert raw.size == f["tokens"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_missing_index_and_truncated_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.prepare"):
        ShardSet(str(tmp_path / "nothing"))
    _write(str(tmp_path), 257, _docs(257))
    s = ShardSet(str(tmp_path))
    first = s.index["splits"]["train"]["files"][0]["file"]
    with open(tmp_path / first, "r+b") as f:
        f.truncate(4)
    with pytest.raises(IOError, match="index.json says"):
        s.sources("train")


def test_out_of_range_token_rejected(tmp_path):
    w = ShardWriter(str(tmp_path), 257, 256, {"name": "byte"})
    with pytest.raises(ValueError, match="out of range"):
        w.add_document(np.array([1, 300]))


def test_storage_options_flow_through(monkeypatch):
    seen = []
    real = fsspec.core.url_to_fs

    def spy(url, **kw):
        seen.append((url, dict(kw)))
        return real(url)

    monkeypatch.setattr(shards_mod.fsspec.core, "url_to_fs", spy)
    path = f"memory://so-{uuid.uuid4().hex}"
    opts = {"endpoint_url": "http://127.0.0.1:9", "anon": False}
    _write(path, 257, _docs(257), storage_options=opts)
    ShardSet(path, opts)
    assert seen and all(kw == opts for _, kw in seen)

"""Megatron-LM indexed datasets as a data source: written by megatron-core's own builder, read
back token-exact through our reader (local memmap and fsspec memory://), and trained on end to end."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from moe.config import ConfigError
from tests.train.runner import FAST, read_jsonl, run_train
from train.data import DataConfig, build_datasets, validate_data_config
from train.data.megatron import MegatronIndexedDataset, split_documents

indexed_dataset = pytest.importorskip(
    "megatron.core.datasets.indexed_dataset",
    reason="megatron-core is not installed (pip install 'moeforge[megatron]')")


def _docs(n_docs: int, vocab: int, eod: int, seed: int = 0) -> list:
    """Documents ending with EOD, as Megatron's preprocess_data.py --append-eod writes them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_docs):
        body = rng.integers(1, vocab, size=int(rng.integers(5, 200)))
        out.append(np.concatenate([body, [eod]]).astype(np.int64))
    return out


def _write(prefix: str, docs: list, dtype=np.uint16) -> None:
    """Build <prefix>.bin/.idx with megatron-core's IndexedDatasetBuilder."""
    b = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_document(d, [len(d)])  # the builder takes any array-like
    b.finalize(prefix + ".idx")


def _upload(prefix: str) -> str:
    fs = fsspec.filesystem("memory")
    url = f"memory://megatron-{uuid.uuid4().hex}/data"
    for ext in (".bin", ".idx"):
        fs.pipe_file(url + ext, Path(prefix + ext).read_bytes())
    return url


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_read_back_token_exact_local_and_memory(tmp_path, dtype):
    docs = _docs(40, 50000, eod=0)
    prefix = str(tmp_path / "data")
    _write(prefix, docs, dtype)
    ref = indexed_dataset.IndexedDataset(prefix)  # megatron-core's own reader agrees
    assert len(ref) == len(docs) and np.array_equal(ref[3], docs[3])
    want = np.concatenate(docs)
    for where in (prefix, _upload(prefix)):
        ds = MegatronIndexedDataset(where)
        assert ds.dtype == np.dtype(dtype) and ds.num_documents == len(docs)
        assert np.array_equal(ds.tokens(), want)
        a, b = ds.document_token_range(7, 9)
        assert np.array_equal(ds.tokens(7, 9), np.concatenate(docs[7:9]))
        assert b - a == len(docs[7]) + len(docs[8])
        src = ds.source(5, 30)
        ranges = [(0, 3), (10, 200), (len(src) - 4, len(src))]
        flat = np.concatenate(docs[5:30])
        for (lo, hi), got in zip(ranges, src.read_many(ranges)):
            assert np.array_equal(got, flat[lo:hi])
        assert ds.max_token_id() == int(want.max())


def test_build_datasets_split_and_vocab(tmp_path):
    docs = _docs(20, 300, eod=299)
    prefix = str(tmp_path / "data")
    _write(prefix, docs)
    cfg = DataConfig(source="megatron", path=prefix, val_fraction=0.1)
    train, val, info = build_datasets(cfg, vocab_size=512)
    cut = split_documents(20, 0.1)
    assert cut == 18 and info["val_documents"] == 2
    assert train.num_tokens == sum(map(len, docs[:cut]))
    assert val.num_tokens == sum(map(len, docs[cut:]))
    assert info["vocab_size"] == max(int(d.max()) for d in docs) + 1 == 300
    w = train.windows([0], 16)[0].numpy()
    assert np.array_equal(w, np.concatenate(docs)[:17])
    json.dumps(info)
    with pytest.raises(ConfigError, match="model.vocab_size=256"):
        build_datasets(cfg, vocab_size=256)
    # A configured vocab is trusted (no scan) and checked against the model.
    cfg.megatron_vocab_size = 1000
    with pytest.raises(ConfigError, match="megatron_vocab_size"):
        build_datasets(cfg, vocab_size=512)
    # A second prefix as the validation split.
    _write(str(tmp_path / "val"), docs[:3])
    cfg = DataConfig(source="megatron", path=prefix, val_path=str(tmp_path / "val"))
    train, val, _ = build_datasets(cfg, vocab_size=512)
    assert train.num_tokens == sum(map(len, docs))
    assert val.num_tokens == sum(map(len, docs[:3]))


def test_config_errors_name_the_key(tmp_path):
    bad = [
        (DataConfig(source="megatron"), "data.path must be set"),
        (DataConfig(source="megatron", path="x/data.bin"), "data.path='x/data.bin' must be the prefix"),
        (DataConfig(source="megatron", path="x", val_path="v.idx"), "data.val_path="),
        (DataConfig(source="megatron", path="x", megatron_vocab_size=-1), "data.megatron_vocab_size"),
        (DataConfig(source="builtin", val_path="v"), "data.val_path"),
        (DataConfig(source="shards", path="s", megatron_vocab_size=8), "data.megatron_vocab_size"),
    ]
    for cfg, msg in bad:
        with pytest.raises(ConfigError, match=msg.replace(".", r"\.").replace("(", r"\(")):
            validate_data_config(cfg)
    with pytest.raises(FileNotFoundError, match="prefix of a Megatron indexed dataset"):
        MegatronIndexedDataset(str(tmp_path / "missing"))
    (tmp_path / "junk.idx").write_bytes(b"NOTMMIDX" * 8)
    (tmp_path / "junk.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="bad header"):
        MegatronIndexedDataset(str(tmp_path / "junk"))


def test_train_three_steps_end_to_end(tmp_path):
    prefix = str(tmp_path / "data")
    _write(prefix, _docs(60, 256, eod=0))
    run_train("data=megatron", f"data.path={prefix}", "data.val_fraction=0.1", *FAST,
              "trainer.max_steps=3", f"output_dir={tmp_path / 'out'}", "run_name=m")
    rows = read_jsonl(tmp_path / "out" / "m" / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r and "step" in r]
    assert max(int(r["step"]) for r in steps) == 3
    assert all(np.isfinite(float(r["loss"])) for r in steps)
    states = sorted((tmp_path / "out" / "m").glob("step_*/trainer_state.json"))
    assert states, "no checkpoint written"
    data = json.loads(states[-1].read_text())["data"]
    assert data["source"] == "megatron" and data["path"] == prefix and data["vocab_size"] == 256

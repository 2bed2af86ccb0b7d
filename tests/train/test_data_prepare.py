import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from train.data import DataConfig, build_datasets, global_batch
from train.data.prepare_lib import PrepareError, prepare
from train.data.shards import ShardSet
from train.data.tokenizer import ByteTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stream(shards, split):
    return np.concatenate([np.asarray(s.tokens) for s in shards.sources(split)])


def _texts(tmp_path, n=30):
    d = tmp_path / "in"
    d.mkdir()
    docs = [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(n)]
    for i, t in enumerate(docs):
        (d / f"doc{i:03d}.txt").write_text(t)
    return d, docs


def test_cli_text_subprocess(tmp_path):
    d, docs = _texts(tmp_path)
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-m", "train.prepare", "--input", str(d / "*.txt"),
                        "--output", str(out), "--val-fraction", "0.2", "--shard-tokens", "500"],
                       cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "prepare: wrote" in r.stdout
    s = ShardSet(str(out))
    assert s.index["tokenizer"]["name"] == "byte" and s.index["dtype"] == "uint16"
    assert len(s.index["splits"]["train"]["files"]) > 1
    sp = s.index["splits"]
    assert sp["train"]["documents"] + sp["val"]["documents"] == len(docs)
    assert sp["val"]["documents"] > 0
    tok = ByteTokenizer()
    all_text = tok.decode(_stream(s, "train")) + tok.decode(_stream(s, "val"))
    assert sorted(all_text.replace("document", "\0document").split("\0")[1:]) == sorted(docs)
    # Val documents are not in train.
    train_text = tok.decode(np.where(_stream(s, "train") == 0, 10, _stream(s, "train")))
    val_docs = tok.decode(np.where(_stream(s, "val") == 0, 10, _stream(s, "val"))).split("\n")
    assert all(v not in train_text.split("\n") for v in val_docs if v)
    # Trainable through the data config.
    train, val, info = build_datasets(DataConfig(source="shards", path=str(out)), 256)
    assert info["source"] == "shards" and train.num_tokens == sp["train"]["tokens"]
    assert global_batch(train, 0, 0, 2, 16)[0].shape == (2, 16)


def test_cli_missing_input(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train.prepare", "--input",
                        str(tmp_path / "nope*.txt"), "--output", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "matched no files" in r.stderr


def test_jsonl_and_memory_output(tmp_path):
    p = tmp_path / "a.jsonl"
    rows = [{"text": f"row {i} " + "x" * i, "id": i} for i in range(40)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = f"memory://prep-{uuid.uuid4().hex}"
    logs = []
    idx = prepare([str(p)], out, fmt="jsonl", val_fraction=0.1, log=logs.append)
    assert idx["splits"]["train"]["documents"] + idx["splits"]["val"]["documents"] == 40
    assert any("wrote" in m for m in logs)
    s = ShardSet(out)
    total = sum(len(r["text"]) + 1 for r in rows)
    assert s.num_tokens("train") + s.num_tokens("val") == total


def test_jsonl_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"body": "hi"}\n')
    with pytest.raises(PrepareError, match=r"bad.jsonl:1: no string field 'text'.*--jsonl-key"):
        prepare([str(p)], str(tmp_path / "o"), fmt="jsonl", log=lambda m: None)
    p.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(PrepareError, match="bad.jsonl:2: not valid JSON"):
        prepare([str(p)], str(tmp_path / "o"), fmt="jsonl", log=lambda m: None)
    with pytest.raises(PrepareError, match="does not exist"):
        prepare([str(tmp_path / "missing.txt")], str(tmp_path / "o"), log=lambda m: None)
    with pytest.raises(PrepareError, match="directory"):
        prepare([str(tmp_path)], str(tmp_path / "o"), log=lambda m: None)


def test_single_text_file_gets_val_tail(tmp_path):
    p = tmp_path / "one.txt"
    text = "".join(f"line {i}\n" for i in range(500))
    p.write_text(text)
    idx = prepare([str(p)], str(tmp_path / "o"), val_fraction=0.05, log=lambda m: None)
    s = ShardSet(str(tmp_path / "o"))
    tok = ByteTokenizer()
    assert idx["splits"]["val"]["tokens"] > 0.04 * len(text)
    assert tok.decode(_stream(s, "train")) + tok.decode(_stream(s, "val")) == text


def test_bpe_prepare(tmp_path):
    pytest.importorskip("tokenizers")
    d, docs = _texts(tmp_path)
    out = tmp_path / "bpe"
    idx = prepare([str(d / "*.txt")], str(out), tokenizer="bpe", vocab_size=300,
                  val_fraction=0.2, log=lambda m: None)
    assert idx["tokenizer"]["name"] == "bpe" and idx["vocab_size"] <= 300
    s = ShardSet(str(out))
    tok = s.tokenizer()
    train = _stream(s, "train")
    assert int(train.max()) < s.vocab_size
    assert train.size < sum(len(t) for t in docs)  # compresses
    texts = tok.decode(train) + tok.decode(_stream(s, "val"))
    assert sum(len(t) for t in docs) == len(texts)
    with pytest.raises(PrepareError, match="--vocab-size"):
        prepare([str(d / "*.txt")], str(tmp_path / "x"), vocab_size=500, log=lambda m: None)

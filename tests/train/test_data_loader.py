import numpy as np
import pytest
import torch

from moe.config import ConfigError
from train.data import (DataConfig, TokenDataset, batch_for_indices, build_datasets, global_batch,
                        micro_batches_for_rank, permute_windows, rank_micro_batches,
                        validate_data_config, validation_batches)
from train.data.shards import ArraySource

SEQ = 8


def _ds(n_tokens=1001, n_sources=3):
    toks = np.arange(n_tokens, dtype=np.int64) % 251
    cuts = np.linspace(0, n_tokens, n_sources + 1).astype(int)
    return TokenDataset([ArraySource(toks[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]), toks


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16, 17, 63, 64, 65, 1000, 4099])
def test_permutation_is_a_bijection_per_epoch(n):
    p = permute_windows(7, range(3 * n), n)
    for e in range(3):
        assert sorted(p[e * n:(e + 1) * n].tolist()) == list(range(n))
    if n >= 16:  # each epoch reshuffles, and the seed matters
        assert p[:n].tolist() != p[n:2 * n].tolist()
        assert p[:n].tolist() != permute_windows(8, range(n), n).tolist()
        assert p[:n].tolist() != list(range(n))


def test_sample_is_pure_function_of_seed_and_index():
    ds1, toks = _ds()
    ds2, _ = _ds()  # fresh objects, no shared state
    for i in [0, 1, 5, 124, 125, 999, 10**6]:
        a, b = ds1.sample(i, SEQ, seed=3), ds2.sample(i, SEQ, seed=3)
        assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (SEQ + 1,)
        w = int(permute_windows(3, [i], ds1.num_windows(SEQ))[0])
        assert a.tolist() == toks[w * SEQ: w * SEQ + SEQ + 1].tolist()
    # Order of queries does not matter; batches equal per-sample results.
    x, y = global_batch(ds1, 3, 40, 16, SEQ)
    assert x.shape == y.shape == (16, SEQ)
    for r in range(16):
        s = ds2.sample(40 + r, SEQ, seed=3)
        assert torch.equal(x[r], s[:-1]) and torch.equal(y[r], s[1:])


def test_epoch_wrap_covers_every_window_once_per_epoch():
    ds, toks = _ds(n_tokens=161)  # 20 windows of 8
    nw = ds.num_windows(SEQ)
    assert nw == 20
    x, y = global_batch(ds, 0, 0, 3 * nw, SEQ)
    for e in range(3):
        starts = sorted(int(x[e * nw + k, 0]) for k in range(nw))
        assert starts == sorted(int(toks[w * SEQ]) for w in range(nw))
        # every target token of the split appears exactly once per epoch
        assert sorted(y[e * nw:(e + 1) * nw].reshape(-1).tolist()) == sorted(toks[1:].tolist())
    assert not torch.equal(x[:nw], x[nw:2 * nw])


def _rank_stream(ds, seed, first, gbs, mbs, dp_size):
    rows = []
    for rank in range(dp_size):
        for idx in micro_batches_for_rank(first, gbs, mbs, rank, dp_size):
            assert len(idx) == mbs
            xb, _ = batch_for_indices(ds, seed, idx, SEQ)
            rows.append(xb)
    return torch.cat(rows)


def test_stream_independent_of_world_size_and_micro_batch():
    ds, _ = _ds()
    gbs = 24
    for step in range(3):
        first = step * gbs  # the cursor: samples consumed
        ref, _ = global_batch(ds, 11, first, gbs, SEQ)
        for dp_size, mbs in [(1, 24), (1, 1), (2, 3), (3, 4), (4, 6), (8, 1), (24, 1)]:
            assert torch.equal(_rank_stream(ds, 11, first, gbs, mbs, dp_size), ref)
            got = [xb for r in range(dp_size)
                   for xb, _ in rank_micro_batches(ds, 11, first, gbs, mbs, SEQ, r, dp_size)]
            assert torch.equal(torch.cat(got), ref)
        idx = [i for r in range(4) for m in micro_batches_for_rank(first, gbs, 2, r, 4) for i in m]
        assert idx == list(range(first, first + gbs))


def test_resume_at_any_index_is_exact():
    ds, _ = _ds()
    full, _ = global_batch(ds, 5, 0, 60, SEQ)
    parts = [global_batch(ds, 5, a, b - a, SEQ)[0] for a, b in [(0, 7), (7, 31), (31, 60)]]
    assert torch.equal(torch.cat(parts), full)


def test_micro_batch_errors_name_the_key():
    with pytest.raises(ConfigError, match="trainer.global_batch_size"):
        micro_batches_for_rank(0, 10, 1, 0, 3)
    with pytest.raises(ConfigError, match="trainer.micro_batch_size"):
        micro_batches_for_rank(0, 12, 5, 0, 2)
    with pytest.raises(ValueError, match="dp_rank"):
        micro_batches_for_rank(0, 12, 1, 2, 2)


def test_too_short_split_errors():
    ds, _ = _ds(n_tokens=5, n_sources=1)
    with pytest.raises(ValueError, match="seq_len"):
        ds.sample(0, SEQ)


def test_validation_batches_fixed_and_sharded():
    ds, toks = _ds()
    a = validation_batches(ds, 3, 4, SEQ)
    b = validation_batches(ds, 3, 4, SEQ)
    assert len(a) == 3 and all(x.shape == (4, SEQ) for x, _ in a)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    starts = [int(x[r, 0]) for x, _ in a for r in range(4)]
    assert len(set(starts)) == 12  # spread out, no repeats when the split is large enough
    halves = [validation_batches(ds, 3, 4, SEQ, dp_rank=r, dp_size=2) for r in range(2)]
    for k in range(3):
        assert torch.equal(torch.cat([halves[0][k][0], halves[1][k][0]]), a[k][0])


def test_config_errors_name_the_key():
    validate_data_config(DataConfig())
    validate_data_config(DataConfig(source="shards", path="s3://b/p",
                                    storage_options={"endpoint_url": "http://x"}))
    cases = [
        (DataConfig(source="web"), "data.source"),
        (DataConfig(source="shards"), "data.path must be set when data.source=shards"),
        (DataConfig(path="/x"), "data.path"),
        (DataConfig(val_fraction=0.0), "data.val_fraction"),
        (DataConfig(val_fraction=0.7), "data.val_fraction"),
        (DataConfig(builtin_max_bytes=10), "data.builtin_max_bytes"),
        (DataConfig(storage_options=None), "data.storage_options"),
    ]
    for cfg, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            validate_data_config(cfg)
    assert issubclass(ConfigError, ValueError)


def test_config_is_omegaconf_compatible():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.structured(DataConfig)
    cfg.storage_options = {"endpoint_url": "http://127.0.0.1:5000"}
    obj = omegaconf.OmegaConf.to_object(cfg)
    assert isinstance(obj, DataConfig)
    validate_data_config(obj)


def test_build_datasets_builtin(tmp_path):
    cfg = DataConfig(builtin_max_bytes=2**20)
    train, val, info = build_datasets(cfg, vocab_size=256, cache_dir=str(tmp_path))
    assert info["source"] == "builtin" and len(info["corpus_hash"]) == 64
    assert train.num_tokens == info["train_tokens"] and val.num_tokens == info["val_tokens"]
    x, y = global_batch(train, 0, 0, 4, 128)
    assert x.shape == (4, 128) and int(x.max()) < 256
    assert len(validation_batches(val, 2, 2, 128)) == 2
    with pytest.raises(ConfigError, match="model.vocab_size=255"):
        build_datasets(cfg, vocab_size=255, cache_dir=str(tmp_path))

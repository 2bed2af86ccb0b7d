"""The trainer's data layer: corpus, tokenizers, shards, and the deterministic sample stream.

The trainer calls:

    train_ds, val_ds, info = build_datasets(cfg.data, vocab_size=cfg.model.vocab_size,
                                            cache_dir=None)
    for inputs_BT, targets_BT in rank_micro_batches(train_ds, seed, samples_consumed, gbs, mbs,
                                                    seq_len, dp_rank, dp_size):
        ...  # forward/backward; rank_micro_batches = micro_batches_for_rank + batch_for_indices
    samples_consumed += gbs
    evals = validation_batches(val_ds, n_batches, batch, seq_len, dp_rank, dp_size)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

from moe.config import ConfigError
from train.data.config import DataConfig, validate_data_config
from train.data.shards import ShardSet

if TYPE_CHECKING:
    from train.data.loader import TokenDataset

__all__ = ["DataConfig", "validate_data_config", "TokenDataset", "build_datasets",
           "batch_for_indices", "global_batch", "micro_batches_for_rank", "permute_windows",
           "rank_micro_batches", "validation_batches", "ShardSet"]

# The loader (torch) is imported on first use: train.config imports this package for DataConfig,
# and a config-only command (launch --dry-run, --cfg job, a config error) need not pay for torch.
_LOADER = {"TokenDataset", "batch_for_indices", "global_batch", "micro_batches_for_rank", "permute_windows",
           "rank_micro_batches", "validation_batches"}


def __getattr__(name: str):
    if name in _LOADER:
        from train.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'train.data' has no attribute {name!r}")


def _datasets(shards: ShardSet) -> Tuple[TokenDataset, TokenDataset]:
    from train.data.loader import TokenDataset

    return tuple(TokenDataset(shards.sources(s), s, shards.eos_id, shards.vocab_size)
                 for s in ("train", "val"))  # type: ignore[return-value]


def build_datasets(cfg: DataConfig, vocab_size: int, cache_dir: Optional[str] = None,
                   log=None) -> Tuple[TokenDataset, TokenDataset, Dict]:
    """(train_ds, val_ds, info). `info` is JSON-able provenance to record with the run
    (for builtin: corpus_hash and Python version; for shards: path and index summary;
    for megatron: prefix, dtype, documents, token counts and where the vocab size came from)."""
    validate_data_config(cfg)
    if cfg.source == "megatron":
        from train.data.megatron import open_megatron

        train_src, val_src, data_vocab, info = open_megatron(
            cfg.path, cfg.val_path, float(cfg.val_fraction), int(cfg.megatron_vocab_size),
            dict(cfg.storage_options or {}))
        if data_vocab > vocab_size:
            raise ConfigError(
                f"model.vocab_size={vocab_size} is smaller than the data's vocabulary "
                f"({data_vocab}, from {info['vocab_from']}, Megatron data {cfg.path}): set "
                f"model.vocab_size>={data_vocab} (or data.megatron_vocab_size if that is wrong)")
        from train.data.loader import TokenDataset

        train_ds = TokenDataset(train_src, "train", -1, data_vocab)
        val_ds = TokenDataset(val_src, "val", -1, data_vocab)
        if train_ds.num_tokens == 0:
            raise ValueError(f"the train split of {cfg.path} is empty")
        return train_ds, val_ds, info
    if cfg.source == "builtin":
        from train.data.corpus import build_builtin_corpus

        shards, info = build_builtin_corpus(cache_dir, int(cfg.builtin_max_bytes),
                                            float(cfg.val_fraction), log=log)
    else:
        shards = ShardSet(cfg.path, dict(cfg.storage_options or {}))
        info = {"source": "shards", "path": cfg.path, "vocab_size": shards.vocab_size,
                "eos_id": shards.eos_id, "tokenizer": shards.index["tokenizer"]["name"],
                "dtype": shards.dtype.name, "train_tokens": shards.num_tokens("train"),
                "val_tokens": shards.num_tokens("val"),
                "meta": shards.index.get("meta", {}),
                "description": f"shards {cfg.path} ({shards.index['tokenizer']['name']}, "
                               f"{shards.num_tokens('train') / 1e6:.1f}M train tokens)"}
    if shards.vocab_size > vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than the data's vocabulary "
            f"({shards.vocab_size}, tokenizer {info['tokenizer']}): set model.vocab_size>="
            f"{shards.vocab_size}")
    train_ds, val_ds = _datasets(shards)
    if train_ds.num_tokens == 0:
        raise ValueError(f"the train split of {info.get('path')} is empty")
    return train_ds, val_ds, info

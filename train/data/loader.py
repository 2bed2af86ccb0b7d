"""Packed sequences and the data cursor.

The stream is a pure function of (seed, global sample index): sample `i` is the window of
`seq_len + 1` tokens starting at `w * seq_len`, where `w = permute(i mod W)` and W is the number
of windows of the split (consecutive windows share one token, so every token is a target once per
epoch). `i // W` is the epoch; each epoch has its own permutation.

The permutation is a keyed Feistel network over the smallest even-bit power of two >= W, with
cycle-walking back into [0, W): a bijection that costs O(1) memory and a few integer ops per
sample, so corpora of billions of windows need no permutation table and any index can be
computed directly (resume at any sample, any world size). Keys come from splitmix64 of
(seed, epoch, round); everything is vectorised over numpy uint64, whose arithmetic wraps.

The data cursor is just `samples_consumed`. A global batch is samples
[first, first + global_batch_size); rank r of D takes the r-th contiguous 1/D of it, in
micro-batches of `micro_batch_size`; so the concatenation over ranks of their micro-batches is
the global batch in order, whatever the world size or the accumulation steps.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from moe.config import ConfigError

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_FEISTEL_ROUNDS = 6


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute_windows(seed: int, indices: Sequence[int] | np.ndarray, n_windows: int) -> np.ndarray:
    """Window id of each global sample index: a per-epoch seeded bijection of [0, n_windows)."""
    if n_windows < 1:
        raise ValueError(f"n_windows={n_windows} must be >= 1")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and int(idx.min()) < 0:
        raise ValueError("sample indices must be >= 0")
    epoch = (idx // n_windows).astype(np.uint64)
    x = (idx % n_windows).astype(np.uint64)
    if n_windows == 1:
        return x.astype(np.int64)
    half = max(1, ((n_windows - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    seed_key = _mix64(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    keys = [_mix64(seed_key ^ _mix64((epoch << np.uint64(8)) | np.uint64(r)))
            for r in range(_FEISTEL_ROUNDS)]
    n = np.uint64(n_windows)
    todo = np.ones(x.shape, dtype=bool)
    # Cycle-walking: the domain is < 4 * n_windows, so on average < 4 passes.
    while todo.any():
        v = x[todo]
        left, right = v >> np.uint64(half), v & mask
        for r in range(_FEISTEL_ROUNDS):
            f = _mix64(keys[r][todo] ^ right) & mask
            left, right = right, left ^ f
        x[todo] = (left << np.uint64(half)) | right
        todo = x >= n
    return x.astype(np.int64)


class TokenDataset:
    """One split's token stream (the concatenation of its sources), cut into packed windows."""

    def __init__(self, sources: Sequence[Any], name: str = "train", eos_id: int = -1,
                 vocab_size: int = 0) -> None:
        self.sources = [s for s in sources if len(s) > 0]
        self.name, self.eos_id, self.vocab_size = name, int(eos_id), int(vocab_size)
        self._starts = np.cumsum([0] + [len(s) for s in self.sources]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self._starts[-1])

    def num_windows(self, seq_len: int) -> int:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        return max(0, (self.num_tokens - 1) // seq_len)

    def _check_windows(self, seq_len: int) -> int:
        n = self.num_windows(seq_len)
        if n < 1:
            raise ValueError(
                f"the {self.name} split has {self.num_tokens} tokens, fewer than "
                f"trainer.seq_len+1={seq_len + 1}: use a larger corpus or a shorter seq_len")
        return n

    def windows(self, window_ids: Sequence[int] | np.ndarray, seq_len: int) -> torch.Tensor:
        """Tokens of the given windows: LongTensor[len(window_ids), seq_len + 1]."""
        ids = np.asarray(window_ids, dtype=np.int64).reshape(-1)
        out = np.empty((ids.size, seq_len + 1), dtype=np.int64)
        # Group the (possibly source-spanning) ranges by source, one read_many call per source.
        plan: dict = {}
        for row, w in enumerate(ids.tolist()):
            a, b = w * seq_len, w * seq_len + seq_len + 1
            s = int(np.searchsorted(self._starts, a, side="right")) - 1
            col = 0
            while a < b:
                lo, hi = int(self._starts[s]), int(self._starts[s + 1])
                take = min(b, hi) - a
                plan.setdefault(s, []).append((row, col, a - lo, a - lo + take))
                a, col, s = a + take, col + take, s + 1
        for s, items in plan.items():
            chunks = self.sources[s].read_many([(lo, hi) for _, _, lo, hi in items])
            for (row, col, lo, hi), chunk in zip(items, chunks):
                out[row, col:col + hi - lo] = chunk
        return torch.from_numpy(out)

    def sample(self, global_index: int, seq_len: int, seed: int = 0) -> torch.Tensor:
        """Global sample `global_index` of the stream with this seed: LongTensor[seq_len + 1]."""
        return self.samples([global_index], seq_len, seed)[0]

    def samples(self, indices: Sequence[int], seq_len: int, seed: int = 0) -> torch.Tensor:
        n = self._check_windows(seq_len)
        return self.windows(permute_windows(seed, indices, n), seq_len)


def batch_for_indices(dataset: TokenDataset, seed: int, indices: Sequence[int],
                      seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs_BT, targets_BT) for the given global sample indices, in that order."""
    x = dataset.samples(list(indices), seq_len, seed)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def global_batch(dataset: TokenDataset, seed: int, first_index: int, global_batch_size: int,
                 seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole global batch starting at sample `first_index` (= samples consumed so far)."""
    return batch_for_indices(dataset, seed, range(first_index, first_index + global_batch_size),
                             seq_len)


def micro_batches_for_rank(first_index: int, global_batch_size: int, micro_batch_size: int,
                           dp_rank: int, dp_size: int) -> List[range]:
    """Global sample indices this data-parallel rank consumes, one range per micro-batch.

    Rank r takes samples [first + r*P, first + (r+1)*P) with P = global_batch_size / dp_size,
    in P / micro_batch_size accumulation steps. Concatenating every rank's ranges in rank order
    gives the global batch in order, so the stream depends on neither dp_size nor micro-batch size.
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if global_batch_size % dp_size:
        raise ConfigError(f"trainer.global_batch_size={global_batch_size} must be divisible by "
                          f"the data-parallel size {dp_size}")
    per_rank = global_batch_size // dp_size
    if micro_batch_size < 1 or per_rank % micro_batch_size:
        raise ConfigError(
            f"trainer.micro_batch_size={micro_batch_size} must divide "
            f"global_batch_size/dp_size = {global_batch_size}/{dp_size} = {per_rank}")
    start = first_index + dp_rank * per_rank
    return [range(start + k, start + k + micro_batch_size)
            for k in range(0, per_rank, micro_batch_size)]


def rank_micro_batches(dataset: TokenDataset, seed: int, first_index: int,
                       global_batch_size: int, micro_batch_size: int, seq_len: int,
                       dp_rank: int, dp_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """This rank's (inputs_BT, targets_BT) micro-batches of the global batch at `first_index`.

    The split is checked now (errors name the key); the tokens are read lazily, one micro-batch
    per `next()`, so a training step's data wait is measured where it happens.
    """
    ranges = micro_batches_for_rank(first_index, global_batch_size, micro_batch_size,
                                    dp_rank, dp_size)
    dataset._check_windows(seq_len)
    return (batch_for_indices(dataset, seed, r, seq_len) for r in ranges)


def validation_batches(dataset: TokenDataset, n_batches: int, batch: int, seq_len: int,
                       dp_rank: int = 0, dp_size: int = 1
                       ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """A fixed evaluation set: n_batches x batch windows spread evenly over the split.

    Independent of the training seed and of the step, so every eval scores the same tokens.
    With dp_size > 1 each rank gets its contiguous share of every batch (batch % dp_size == 0).
    If the split has fewer windows than requested, windows repeat.
    """
    n = dataset._check_windows(seq_len)
    if batch % dp_size:
        raise ConfigError(f"eval batch {batch} must be divisible by the data-parallel size "
                          f"{dp_size}")
    total = n_batches * batch
    ids = (np.arange(total, dtype=np.int64) * n) // max(total, 1)
    per = batch // dp_size
    out = []
    for b in range(n_batches):
        rows = ids[b * batch + dp_rank * per: b * batch + (dp_rank + 1) * per]
        x = dataset.windows(rows, seq_len)
        out.append((x[:, :-1].contiguous(), x[:, 1:].contiguous()))
    return out

"""Tokenizers: byte-level (the default, no files, no dependency) and a locally trained BPE.

Byte-level: vocab_size 256, token id = UTF-8 byte value, and id 0 (the NUL byte) doubles as EOS,
written after every document so the model sees document boundaries. Text almost never holds NUL
(the builtin stdlib corpus has none), so NUL bytes in the input are dropped rather than costing a
257th id: the vocabulary stays a power of two (the tiny preset's vocab_size=256) and the ids fit
uint8/uint16. Decoding drops EOS, so encode/decode round-trips any text without NUL.

BPE: Hugging Face `tokenizers` (optional dependency, `pip install tokenizers`), byte-level BPE
trained on the prepare inputs, with `<|endoftext|>` as EOS. Only `train.prepare` builds one; the
trainer reads token ids from shards and never needs the tokenizer itself.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence, Union

import numpy as np

BYTE_VOCAB_SIZE = 256
BYTE_EOS_ID = 0
BPE_EOS_TOKEN = "<|endoftext|>"


class ByteTokenizer:
    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID

    def encode(self, text: Union[str, bytes]) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        arr = np.frombuffer(data, dtype=np.uint8)
        return arr[arr != BYTE_EOS_ID].astype(np.int64)

    def decode(self, ids: Union[Sequence[int], np.ndarray]) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        keep = arr[(arr != BYTE_EOS_ID) & (arr < 256)].astype(np.uint8)
        return keep.tobytes().decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def _require_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "--tokenizer bpe needs the optional `tokenizers` package: "
            "pip install tokenizers (or pip install 'moeforge[test]'); "
            "--tokenizer byte needs nothing") from e
    return tokenizers


class BPETokenizer:
    name = "bpe"

    def __init__(self, tok) -> None:
        self._tok = tok
        eos = tok.token_to_id(BPE_EOS_TOKEN)
        if eos is None:
            raise ValueError(f"BPE tokenizer has no {BPE_EOS_TOKEN} token")
        self.eos_id = int(eos)
        self.vocab_size = int(tok.get_vocab_size())

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        tk = _require_tokenizers()
        if vocab_size < 300:
            raise ValueError(f"--vocab-size={vocab_size} must be >= 300 for BPE "
                             f"(256 byte symbols + EOS + merges)")
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[BPE_EOS_TOKEN],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_str(cls, s: str) -> "BPETokenizer":
        tk = _require_tokenizers()
        return cls(tk.Tokenizer.from_str(s))

    def to_str(self) -> str:
        return self._tok.to_str()

    def encode(self, text: Union[str, bytes]) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> Iterator[np.ndarray]:
        for enc in self._tok.encode_batch(list(texts)):
            yield np.asarray(enc.ids, dtype=np.int64)

    def decode(self, ids: Union[Sequence[int], np.ndarray]) -> str:
        arr = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) != self.eos_id]
        return self._tok.decode(arr)

    def to_json(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "file": "tokenizer.json"}

import numpy as np
import pytest

from train.data.tokenizer import BYTE_EOS_ID, BYTE_VOCAB_SIZE, BPETokenizer, ByteTokenizer

TEXT = "def f(x):\n    return x ** 2  # naïve — ünïcödé 🙂\n"


def test_byte_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert 0 < ids.min() and ids.max() < 256 and len(ids) == len(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert tok.decode(np.append(ids, BYTE_EOS_ID)) == TEXT  # EOS is dropped
    assert tok.encode(TEXT.encode("utf-8")).tolist() == ids.tolist()
    assert tok.decode(tok.encode("a\x00b")) == "ab"  # NUL is reserved for EOS and dropped
    assert (tok.vocab_size, tok.eos_id) == (BYTE_VOCAB_SIZE, BYTE_EOS_ID) == (256, 0)


def test_bpe_round_trip():
    pytest.importorskip("tokenizers")
    corpus = [TEXT * 3, "the quick brown fox jumps over the lazy dog\n" * 20,
              "import os\nimport sys\n" * 10]
    tok = BPETokenizer.train(corpus, vocab_size=320)
    assert tok.vocab_size <= 320 and 0 <= tok.eos_id < tok.vocab_size
    for t in corpus + ["unseen text ✓"]:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
    assert len(tok.encode(corpus[1])) < len(corpus[1])  # merges learned
    again = BPETokenizer.from_str(tok.to_str())
    assert again.encode(TEXT).tolist() == tok.encode(TEXT).tolist()


def test_bpe_vocab_too_small():
    pytest.importorskip("tokenizers")
    with pytest.raises(ValueError, match="vocab-size"):
        BPETokenizer.train(["abc"], vocab_size=100)

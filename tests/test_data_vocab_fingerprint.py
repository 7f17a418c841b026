"""A SentencePiece vocabulary records a fingerprint of the corpus it was trained on: reusing it on other
text is an error, except a workdir's own vocabulary before anything was trained with it (retrained)."""

import json

import numpy as np
import pytest

from tfmstep.data import text
from tfmstep.errors import UserError

VOCAB = 300  # byte fallback alone takes 256 pieces


def _corpus(seed):
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 7))) for _ in range(60)]
    return " ".join(rng.choice(words, size=3000)).encode()


def test_vocabulary_records_its_corpus_and_is_refused_on_another(tmp_path):
    vocab = str(tmp_path / "vocab.spm")
    a, b = _corpus(0), _corpus(1)
    text.load_or_train_sentencepiece(vocab, VOCAB, a, "corpus=a")
    with open(vocab, "rb") as f:
        recorded = text.read_fingerprint(f.read())
    assert recorded == text.corpus_fingerprint(a, "corpus=a")
    text.load_or_train_sentencepiece(vocab, VOCAB, a, "corpus=a")  # the same corpus: reused
    with pytest.raises(UserError, match=r"vocab.spm was trained on another corpus \(corpus=a, \d+ train bytes\)"
                                        r" than this run's train split \(corpus=b"):
        text.load_or_train_sentencepiece(vocab, VOCAB, b, "corpus=b")


def test_workdirs_own_untrained_vocabulary_is_retrained_on_the_new_corpus(tmp_path):
    vocab = str(tmp_path / "vocab.spm")
    (tmp_path / "config.json").write_text(json.dumps({"model": "lstm_lm"}))  # a workdir, nothing trained
    a, b = _corpus(0), _corpus(1)
    text.load_or_train_sentencepiece(vocab, VOCAB, a, "corpus=a")
    tokenizer = text.load_or_train_sentencepiece(vocab, VOCAB, b, "corpus=b")
    with open(vocab, "rb") as f:
        assert text.read_fingerprint(f.read())["source"] == "corpus=b"
    assert tokenizer.decode(tokenizer.encode(b[:200])) == b[:200].decode()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-10.index").write_bytes(b"")  # now a model depends on it
    with pytest.raises(UserError, match="trained on another corpus"):
        text.load_or_train_sentencepiece(vocab, VOCAB, a, "corpus=a")

"""Text data: which corpus is read, the fixed split, the windows and the subword vocabulary."""

import logging

import numpy as np
import pytest

import tfmstep
from tfmstep.data import text
from tfmstep.models import lstm_lm


def _bytes(tokens):
    return bytes(np.asarray(tokens).astype(np.uint8).tolist())


def test_offline_corpus_is_the_sorted_standard_library_source():
    files = text.stdlib_source_files()
    assert files == sorted(files) and all(f.endswith(".py") for f in files)
    with open(files[0], "rb") as f:
        first_file = f.read()
    assert text.load_corpus(text.STDLIB_CORPUS, max_bytes=5000) == first_file[:5000]


def test_split_is_fixed_at_a_line_boundary_near_the_validation_fraction():
    config = tfmstep.get_config("lstm_lm", "tiny")
    splits = lstm_lm.token_splits(config)
    total = len(splits["train"]) + len(splits["validation"])
    assert total == config.max_corpus_bytes
    assert len(splits["validation"]) == pytest.approx(0.1 * total, rel=0.02)
    assert splits["train"][-1] == ord("\n")
    text._tokenized_cache.clear()
    np.testing.assert_array_equal(lstm_lm.token_splits(config)["validation"], splits["validation"])


def test_train_labels_are_the_inputs_shifted_by_one_token():
    config = tfmstep.get_config("lstm_lm", "tiny")
    inputs, labels = next(iter(lstm_lm.lm_dataset(config, "train", 4, seed=1)))
    np.testing.assert_array_equal(inputs[:, 1:].numpy(), labels[:, :-1].numpy())
    assert inputs.shape == (4, config.seq_len)


def test_validation_scores_every_token_once_in_order_after_its_context():
    tokens = np.arange(1000, 1100, dtype=np.int32)
    train = np.arange(0, 50, dtype=np.int32)
    seq_len, context = 8, 5
    batches = list(text.window_dataset(tokens, "validation", seq_len, 4, 0, 0, context=train,
                                       eval_context=context))
    inputs = np.concatenate([b[0].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert inputs.shape[1] == context + seq_len
    scored = labels[labels != text.IGNORED_LABEL]
    np.testing.assert_array_equal(scored, tokens[1:1 + len(scored)])
    assert len(scored) == (len(tokens) - 1) // seq_len * seq_len
    assert ((labels != text.IGNORED_LABEL).sum(1) == seq_len).all()
    # The first chunk reads the end of the train split as its context.
    np.testing.assert_array_equal(inputs[0, :context], train[-context:])
    np.testing.assert_array_equal(inputs[1, :context + 1], tokens[seq_len - context:seq_len + 1])


def test_validation_without_context_is_plain_consecutive_windows():
    tokens = np.arange(100, dtype=np.int32)
    inputs, labels = next(iter(text.window_dataset(tokens, "validation", 10, 3, 0, 0)))
    np.testing.assert_array_equal(inputs.numpy()[1], np.arange(10, 20))
    np.testing.assert_array_equal(labels.numpy()[1], np.arange(11, 21))


def test_local_text_file_and_directory_are_used(tmp_path):
    (tmp_path / "b.txt").write_text("or not to be " * 100)
    (tmp_path / "a.txt").write_text("to be " * 200)
    config = tfmstep.get_config("lstm_lm", "tiny", text_file=str(tmp_path / "a.txt"))
    assert _bytes(lstm_lm.token_splits(config)["train"][:9]) == b"to be to "
    config = tfmstep.get_config("lstm_lm", "tiny", text_file=str(tmp_path))
    corpus = _bytes(np.concatenate(list(lstm_lm.token_splits(config).values())))
    assert corpus.startswith(b"to be ") and b"or not" in corpus  # sorted: a.txt, then b.txt


def test_missing_text_file_is_a_clear_error(tmp_path):
    config = tfmstep.get_config("lstm_lm", "tiny", text_file=str(tmp_path / "missing.txt"))
    with pytest.raises(tfmstep.UserError, match="text file not found"):
        lstm_lm.token_splits(config)


def test_tfds_corpus_that_is_not_prepared_falls_back_to_the_stdlib_and_says_so(caplog, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def not_prepared(name, **kwargs):  # what tfds.load(download=False) raises for an unprepared dataset
        raise AssertionError(f"Dataset {name}: could not find data in ~/tensorflow_datasets.")

    monkeypatch.setattr(tfds, "load", not_prepared)
    with caplog.at_level(logging.WARNING):
        data = text.load_corpus("tiny_shakespeare", max_bytes=3000)
    assert data == text.load_corpus(text.STDLIB_CORPUS, max_bytes=3000)
    assert "FALLING BACK" in caplog.text


def test_mistyped_tfds_corpus_is_an_error_not_a_fallback():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(tfmstep.UserError, match="unknown TFDS dataset 'tiny_shakespear'.*tiny_shakespeare"):
        text.load_corpus("tiny_shakespear", max_bytes=3000)


def test_sentencepiece_vocabulary_is_trained_once_saved_and_round_trips_code(tmp_path):
    vocab_file = str(tmp_path / "run" / "vocab.spm")
    config = tfmstep.get_config("lstm_lm", "tiny", tokenizer="sentencepiece", vocab_file=vocab_file,
                                vocab_size=400)
    corpus = lstm_lm.tokenized_corpus(config)
    assert (tmp_path / "run" / "vocab.spm").exists()
    assert corpus.bytes_per_validation_token > 1.2  # subwords: fewer tokens than bytes
    assert corpus.train.max() < 400
    source = "def f(x):\n    if x:\n\t\treturn  'é'  # done\n"
    tokenizer = lstm_lm.make_tokenizer(config)
    ids = tokenizer.encode(source.encode())
    assert tokenizer.decode(ids) == source
    # A fresh process reads the saved file and gets the same ids.
    text._tokenized_cache.clear()
    with open(vocab_file, "rb") as f:
        np.testing.assert_array_equal(text.SentencePieceTokenizer(f.read()).encode(source.encode()), ids)
    np.testing.assert_array_equal(lstm_lm.tokenized_corpus(config).validation, corpus.validation)


def test_sentencepiece_vocabulary_of_another_size_is_a_clear_error(tmp_path):
    vocab_file = str(tmp_path / "vocab.spm")
    lstm_lm.tokenized_corpus(tfmstep.get_config("lstm_lm", "tiny", tokenizer="sentencepiece",
                                                vocab_file=vocab_file, vocab_size=400))
    config = tfmstep.get_config("lstm_lm", "tiny", tokenizer="sentencepiece", vocab_file=vocab_file,
                                vocab_size=500)
    with pytest.raises(tfmstep.UserError, match="has 400 pieces but vocab_size is 500"):
        lstm_lm.tokenized_corpus(config)


def test_sentencepiece_without_a_vocab_file_is_a_clear_error():
    with pytest.raises(tfmstep.UserError, match="needs vocab_file"):
        tfmstep.get_config("lstm_lm", tokenizer="sentencepiece", vocab_size=1000)

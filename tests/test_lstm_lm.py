"""The LSTM language model: text data, stateful generation, and the generate tool's errors."""

import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep.models import lstm_lm


def test_offline_corpus_is_the_standard_library_source_with_a_fixed_split():
    config = tfmstep.get_config("lstm_lm", "tiny")
    splits = lstm_lm.token_splits(config)
    assert len(splits["train"]) + len(splits["validation"]) == config.max_corpus_bytes
    assert len(splits["validation"]) == pytest.approx(0.1 * config.max_corpus_bytes, abs=1)
    assert b"import" in bytes(splits["train"][:20000].astype(np.uint8).tolist())
    np.testing.assert_array_equal(lstm_lm.token_splits(config)["validation"], splits["validation"])


def test_labels_are_the_inputs_shifted_by_one_token():
    config = tfmstep.get_config("lstm_lm", "tiny")
    inputs, labels = next(iter(lstm_lm.lm_dataset(config, "validation", 2)))
    np.testing.assert_array_equal(inputs[:, 1:].numpy(), labels[:, :-1].numpy())


def test_missing_text_file_is_a_clear_error(tmp_path):
    config = tfmstep.get_config("lstm_lm", "tiny", text_file=str(tmp_path / "missing.txt"))
    with pytest.raises(tfmstep.UserError, match="text file not found"):
        lstm_lm.token_splits(config)


def test_local_text_file_is_used(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be " * 200)
    config = tfmstep.get_config("lstm_lm", "tiny", text_file=str(path))
    assert bytes(lstm_lm.token_splits(config)["train"][:9].astype(np.uint8).tolist()) == b"to be or "


def test_stateful_step_matches_the_full_sequence_model():
    model = tfmstep.build("lstm_lm", "tiny", layers=2)
    tokens = tf.constant(np.random.default_rng(0).integers(0, 256, size=(3, 12)), tf.int32)
    full = model(tokens).numpy()
    step = lstm_lm.make_step_fn(model)
    state = lstm_lm.initial_state(model, 3)
    for t in range(12):
        logits, state = step(tokens[:, t], state)
        np.testing.assert_allclose(logits.numpy(), full[:, t], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("decoder", ["greedy", "sample", "beam"])
def test_generate_text_returns_text_and_its_log_probability(decoder):
    model = tfmstep.build("lstm_lm", "tiny")
    text, log_prob = lstm_lm.generate_text(model, "def ", decoder=decoder, max_new_tokens=5, seed=1)
    assert isinstance(text, str) and log_prob < 0


def test_tied_weights_need_matching_sizes():
    with pytest.raises(tfmstep.UserError, match="tie_weights needs embedding_dim == units"):
        tfmstep.get_config("lstm_lm", tie_weights=True, embedding_dim=64, units=128)
    model = tfmstep.build("lstm_lm", "tiny", tie_weights=True, embedding_dim=32, units=32)
    assert model(tf.zeros((1, 4), tf.int32)).shape == (1, 4, 256)

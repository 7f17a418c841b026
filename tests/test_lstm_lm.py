"""The LSTM language model: its loss, stateful generation, weight tying, subword vocabularies."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep import saving, trainer
from tfmstep.models import lstm_lm


def test_loss_skips_context_labels():
    logits = tf.math.log(tf.constant([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    loss, metrics = lstm_lm.lm_loss(tf.constant([[-1, 0, 0]]), logits)
    assert loss.numpy()[0] == pytest.approx(-(np.log(0.9) + np.log(0.2)) / 2, rel=1e-5)
    assert metrics["accuracy"].numpy()[0] == pytest.approx(0.5)


def test_bits_per_byte_is_nats_over_ln2_for_byte_tokens():
    config = tfmstep.get_config("lstm_lm", "tiny")
    assert lstm_lm.bits_per_byte(config, np.log(2.0) * 1.5) == pytest.approx(1.5)


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


@pytest.mark.parametrize("embedding_dim", [32, 16])
def test_tied_output_reuses_the_embedding_and_steps_match_the_full_forward(embedding_dim):
    """units 32: embedding_dim 32 ties directly, 16 through a projection; either way the stateful step
    function (generation, export) computes what the whole-sequence model does."""
    model = tfmstep.build("lstm_lm", "tiny", tie_weights=True, embedding_dim=embedding_dim, units=32)
    tokens = tf.constant([[3, 70, 101, 9]], tf.int32)
    full = model(tokens, training=False)
    assert full.shape == (1, 4, 256)
    assert not any(layer.name == "logits" and hasattr(layer, "kernel") for layer in model.layers)
    assert any(layer.name == "projection" for layer in model.layers) == (embedding_dim != 32)
    step = lstm_lm.make_step_fn(model)
    state = lstm_lm.initial_state(model, 1)
    for t in range(4):
        logits, state = step(tokens[:, t], state)
        np.testing.assert_allclose(logits.numpy(), full[:, t].numpy(), rtol=1e-4, atol=1e-5)


def test_sentencepiece_model_generates_text_through_its_vocabulary(tmp_path):
    config = tfmstep.get_config("lstm_lm", "tiny", tokenizer="sentencepiece", vocab_size=400,
                                vocab_file=str(tmp_path / "vocab.spm"))
    model = tfmstep.get_spec("lstm_lm").build(config)
    inputs, _ = next(iter(lstm_lm.lm_dataset(config, "train", 2)))
    assert model(inputs).shape == (2, config.seq_len, 400)
    text, log_prob = lstm_lm.generate_text(model, "import os\n", max_new_tokens=4,
                                           tokenizer=lstm_lm.make_tokenizer(config))
    assert isinstance(text, str) and log_prob < 0


def test_bad_decoder_and_empty_prompt_are_clear_errors():
    model = tfmstep.build("lstm_lm", "tiny")
    with pytest.raises(tfmstep.UserError, match="unknown decoder"):
        lstm_lm.generate_text(model, "x", decoder="nucleus")
    with pytest.raises(tfmstep.UserError, match="prompt must not be empty"):
        lstm_lm.generate_text(model, "")


def test_generate_tool_prints_the_prompt_and_its_continuation(tmp_path, repo_root):
    workdir = str(tmp_path / "run")
    trainer.train("lstm_lm", workdir, preset="tiny",
                  config=trainer.TrainConfig(steps=2, batch_size=4, eval_batches=1, checkpoint_every=2,
                                             steps_per_call=2))
    result = subprocess.run([sys.executable, f"{repo_root}/tools/generate.py", f"--workdir={workdir}",
                             "--prompt=import ", "--decoder=beam", "--beam_width=2", "--max_new_tokens=6"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("import ")
    assert "beam: log-probability" in result.stderr


def test_subword_run_with_a_relative_vocab_path_loads_from_another_directory(tmp_path, monkeypatch):
    """config.json keeps vocab_file as given (relative to where training ran); loading from elsewhere
    finds the workdir's copy instead of training a new vocabulary."""
    monkeypatch.chdir(tmp_path)
    trainer.train("lstm_lm", "run", preset="tiny",
                  overrides={"tokenizer": "sentencepiece", "vocab_size": 400, "vocab_file": "run/vocab.spm"},
                  config=trainer.TrainConfig(steps=2, batch_size=4, eval_batches=1, checkpoint_every=2,
                                             steps_per_call=2))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    model, config, _ = saving.load_trained(str(tmp_path / "run"))
    assert config.vocab_file == str(tmp_path / "run" / "vocab.spm")
    assert not (tmp_path / "elsewhere" / "run").exists()  # no vocabulary was trained here
    text, _ = lstm_lm.generate_text(model, "import os\n", max_new_tokens=3,
                                    tokenizer=lstm_lm.make_tokenizer(config))
    assert isinstance(text, str)

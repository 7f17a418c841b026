"""Decoding on a hand-built Markov model whose probabilities are known exactly."""

import numpy as np
import pytest
import tensorflow as tf

from tfmstep import decoding

A, B, C, END = 0, 1, 2, 3
# TRANSITIONS[previous token] = probabilities of the next token.
TRANSITIONS = np.array([
    [0.00, 0.60, 0.40, 0.00],  # after A: B is likelier than C ...
    [0.35, 0.00, 0.35, 0.30],  # ... but after B nothing is likely,
    [0.00, 0.05, 0.05, 0.90],  # while after C the end is near certain.
    [0.00, 0.00, 0.00, 1.00],
], np.float32)
LOGITS = tf.math.log(tf.constant(TRANSITIONS) + 1e-12)


def markov_step(tokens, state):
    """State = how many tokens were read (unused by the distribution; checks state plumbing)."""
    return tf.gather(LOGITS, tokens), state + 1


def _prompt(batch=1):
    return tf.fill([batch, 1], A)


def test_greedy_takes_the_locally_best_token():
    tokens, log_prob = decoding.sample(markov_step, _prompt(), tf.zeros([1]), 2, greedy=True, end_token=END)
    assert tokens.numpy().tolist()[0][0] == B
    assert log_prob.numpy()[0] == pytest.approx(np.log(0.6 * 0.35), rel=1e-4)


def test_beam_search_finds_the_sequence_greedy_misses_with_its_log_probability():
    best, log_prob, length = decoding.beam_search(markov_step, _prompt(), tf.zeros([1]), 2, beam_width=2,
                                                  end_token=END)
    assert best.numpy().tolist() == [[C, END]]
    assert log_prob.numpy()[0] == pytest.approx(np.log(0.4 * 0.9), rel=1e-4)
    assert length.numpy().tolist() == [2]


def test_beam_search_pads_finished_beams_with_the_end_token_at_no_cost():
    best, log_prob, length = decoding.beam_search(markov_step, _prompt(), tf.zeros([1]), 5, beam_width=3,
                                                  end_token=END)
    assert best.numpy().tolist() == [[C, END, END, END, END]]
    assert log_prob.numpy()[0] == pytest.approx(np.log(0.36), rel=1e-4)
    assert length.numpy().tolist() == [2]


def test_beam_search_runs_inside_tf_function_with_a_batch():
    search = tf.function(lambda p: decoding.beam_search(markov_step, p, tf.zeros([3]), 2, beam_width=2,
                                                        end_token=END))
    best, log_prob, _ = search(_prompt(3))
    assert best.numpy().tolist() == [[C, END]] * 3
    np.testing.assert_allclose(log_prob.numpy(), np.log(0.36), rtol=1e-4)


def test_top_k_never_picks_outside_the_top_k():
    logits = tf.math.log(tf.constant([[0.3, 0.25, 0.2, 0.15, 0.1]]))
    step = lambda tokens, state: (tf.tile(logits, [tf.shape(tokens)[0], 1]), state)  # noqa: E731
    tokens, _ = decoding.sample(step, tf.zeros([256, 1], tf.int32), tf.zeros([256]), 8, top_k=2, seed=7)
    assert set(np.unique(tokens.numpy())) == {0, 1}


def test_top_p_keeps_the_smallest_nucleus():
    logits = tf.math.log(tf.constant([[0.5, 0.3, 0.15, 0.05]]))
    filtered = decoding.filter_logits(logits, top_p=0.75).numpy()[0]
    assert np.isfinite(filtered[:2]).all() and (filtered[2:] <= decoding.NEG_INF).all()
    step = lambda tokens, state: (tf.tile(logits, [tf.shape(tokens)[0], 1]), state)  # noqa: E731
    tokens, _ = decoding.sample(step, tf.zeros([256, 1], tf.int32), tf.zeros([256]), 4, top_p=0.75, seed=1)
    assert set(np.unique(tokens.numpy())) == {0, 1}


def test_sampling_is_reproducible_under_a_seed():
    run = lambda seed: decoding.sample(markov_step, _prompt(64), tf.zeros([64]), 4, seed=seed,  # noqa: E731
                                       temperature=1.5, end_token=END)[0].numpy()
    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_sampling_follows_the_model_distribution():
    tokens, _ = decoding.sample(markov_step, _prompt(4000), tf.zeros([4000]), 1, seed=0)
    frequency_b = float(np.mean(tokens.numpy()[:, 0] == B))
    assert frequency_b == pytest.approx(0.6, abs=0.03)

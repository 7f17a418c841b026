"""The Kneser-Ney baseline: a proper distribution, and better than lower orders on structured text."""

import numpy as np
import pytest

from tfmstep import ngram


def _distribution(model, history, vocab):
    return np.array([2.0 ** model.log2_probs(np.array([w]), context=np.array(history))[0]
                     for w in range(vocab)])


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probabilities_sum_to_one_for_seen_and_unseen_contexts(order):
    rng = np.random.default_rng(0)
    vocab = 6
    train = rng.integers(0, vocab - 1, size=400)  # token 5 never occurs: unseen contexts exist
    model = ngram.KneserNey(order, vocab).fit(train)
    for history in ([0, 1, 2], [5, 5, 5], [1, 5, 0], list(train[-3:])):
        probs = _distribution(model, history, vocab)
        assert probs.sum() == pytest.approx(1.0, abs=1e-9)
        assert (probs > 0).all()


def test_higher_order_wins_on_text_with_long_range_structure():
    rng = np.random.default_rng(1)
    words = [rng.integers(0, 20, size=5) for _ in range(30)]
    stream = np.concatenate([words[i] for i in rng.integers(0, 30, size=800)])
    train, validation = stream[:3600], stream[3600:]
    result = ngram.best_order(train, validation, 20, orders=range(1, 6))
    bits = result["bits_per_token_by_order"]
    assert bits[4] < bits[2] < bits[1]
    assert result["best_order"] >= 3


def test_order_below_one_is_rejected():
    with pytest.raises(ValueError, match="order must be >= 1"):
        ngram.KneserNey(0, 10)

"""Decoding for autoregressive models: greedy, temperature, top-k, top-p and beam search.

Everything is a TensorFlow graph (``tf.while_loop``, stateless RNG keyed by an integer seed), so the same
functions run eagerly, inside ``tf.function`` and as exported SavedModel signatures. A model plugs in
through a step function ``step(tokens [N], state) -> (logits [N, vocab], state)`` that carries its
recurrent state (an LSTM's (h, c), ...) from token to token: the prompt is read once, each new token costs
one step.

keras-hub's samplers are not used: they draw from a stateful SeedGenerator (a variable that an exported
signature would have to carry and that makes a seed not reproduce a result), and its BeamSampler has no
length penalty and keeps extending beams that already emitted the end token.
"""

from __future__ import annotations

import tensorflow as tf

NEG_INF = -1e9


def prefill(step_fn, prompt, state):
    """Run the prompt [B, P>=1] through ``step_fn``; returns (logits after the last token, state)."""
    prompt = tf.convert_to_tensor(prompt, tf.int32)
    tf.debugging.assert_greater(tf.shape(prompt)[1], 0, message="the prompt must have at least 1 token")
    logits, state = step_fn(prompt[:, 0], state)

    def body(i, logits, state):
        logits, state = step_fn(prompt[:, i], state)
        return i + 1, logits, state

    _, logits, state = tf.while_loop(lambda i, *_: i < tf.shape(prompt)[1], body, (1, logits, state))
    return logits, state


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Keep the ``top_k`` largest logits and/or the smallest set whose probability reaches ``top_p``."""
    logits = tf.convert_to_tensor(logits, tf.float32)
    if top_k:
        kth = tf.math.top_k(logits, k=top_k).values[:, -1:]
        logits = tf.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = tf.sort(logits, direction="DESCENDING", axis=-1)
        cumulative = tf.cumsum(tf.nn.softmax(sorted_logits), axis=-1, exclusive=True)
        # The smallest logit still inside the nucleus (the first token is always kept).
        keep = tf.cast(cumulative < top_p, tf.int32)
        cutoff = tf.gather(sorted_logits, tf.reduce_sum(keep, -1, keepdims=True) - 1, batch_dims=1)
        logits = tf.where(logits < cutoff, NEG_INF, logits)
    return logits


def sample(step_fn, prompt, state, max_new_tokens, *, temperature=1.0, top_k=0, top_p=1.0, seed=0,
           greedy=False, end_token=-1):
    """Generate ``max_new_tokens`` after ``prompt``: tokens [B, max_new_tokens] and their log-probs [B].

    ``greedy`` takes the argmax; otherwise tokens are drawn from softmax(logits / temperature) restricted
    by ``top_k``/``top_p``, with a stateless RNG keyed by (``seed``, position): the same seed gives the
    same text. After ``end_token`` a sequence emits ``end_token`` and adds no log-probability.
    """
    logits, state = prefill(step_fn, prompt, state)
    batch = tf.shape(logits)[0]
    seed = tf.cast(seed, tf.int64)
    tokens = tf.TensorArray(tf.int32, size=max_new_tokens)

    def body(i, logits, state, tokens, log_prob, done):
        log_probs = tf.nn.log_softmax(logits)
        if greedy:
            token = tf.argmax(logits, -1, output_type=tf.int32)
        else:
            scaled = filter_logits(logits / temperature, top_k, top_p)
            token = tf.random.stateless_categorical(scaled, 1, seed=tf.stack([seed, tf.cast(i, tf.int64)]),
                                                    dtype=tf.int32)[:, 0]
        token = tf.where(done, end_token, token)
        log_prob += tf.where(done, 0.0, tf.gather(log_probs, token, batch_dims=1))
        done = done | tf.equal(token, end_token)
        logits, state = step_fn(token, state)
        return i + 1, logits, state, tokens.write(i, token), log_prob, done

    _, _, _, tokens, log_prob, _ = tf.while_loop(
        lambda i, *_: i < max_new_tokens, body,
        (0, logits, state, tokens, tf.zeros([batch]), tf.zeros([batch], tf.bool)))
    return tf.transpose(tokens.stack()), log_prob


def _any_batch(x):
    return tf.TensorShape([None]).concatenate(x.shape[1:])


def beam_step(step_fn, logits, state, scores, sequences, done, lengths, *, length_penalty=0.0,
              end_token=-1):
    """One token of beam search over k beams of B prompts: picks the k best extensions, then feeds them.

    ``logits`` [B * k, vocab] are the beams' next-token logits, ``state`` their recurrent state (batch
    B * k first), ``scores``/``done``/``lengths`` [B, k] and ``sequences`` [B, k, t] the hypotheses so far.
    Returns the same six values one token later.
    """
    batch = tf.shape(scores)[0]
    k = scores.shape[1]
    vocab = tf.shape(logits)[1]
    log_probs = tf.reshape(tf.nn.log_softmax(logits), [batch, k, vocab])
    # A finished beam can only "emit" end_token again, at no cost.
    finished_row = tf.where(tf.range(vocab) == end_token, 0.0, NEG_INF)
    log_probs = tf.where(done[..., None], finished_row[None, None], log_probs)
    candidates = tf.reshape(scores[..., None] + log_probs, [batch, k * vocab])
    new_lengths = tf.reshape(tf.repeat(lengths + tf.cast(~done, tf.int32), vocab, axis=1),
                             [batch, k * vocab])
    if length_penalty:
        rank = candidates / tf.pow(tf.cast(tf.maximum(new_lengths, 1), tf.float32), length_penalty)
    else:
        rank = candidates
    _, chosen = tf.math.top_k(rank, k=k)  # [B, k]
    parent = chosen // vocab
    token = chosen % vocab
    scores = tf.gather(candidates, chosen, batch_dims=1)
    lengths = tf.gather(new_lengths, chosen, batch_dims=1)
    sequences = tf.concat([tf.gather(sequences, parent, batch_dims=1), token[..., None]], -1)
    done = tf.gather(done, parent, batch_dims=1) | tf.equal(token, end_token)
    flat_parent = tf.reshape(parent + tf.range(batch)[:, None] * k, [-1])
    state = tf.nest.map_structure(lambda s: tf.gather(s, flat_parent), state)
    logits, state = step_fn(tf.reshape(token, [-1]), state)
    return logits, state, scores, sequences, done, lengths


def initial_beams(logits, state, beam_width):
    """The logits, state and hypotheses ``beam_step`` starts from, after a prompt of B sequences."""
    batch = tf.shape(logits)[0]
    k = beam_width

    def tile(x):  # [B, ...] -> [B * k, ...]
        return tf.repeat(x, k, axis=0)

    # Only the first beam is live at the start, so the k beams do not all pick the same token.
    scores = tf.tile(tf.concat([[0.0], tf.fill([k - 1], NEG_INF)], 0)[None], [batch, 1])  # [B, k]
    return (tile(logits), tf.nest.map_structure(tile, state), scores, tf.zeros([batch, k, 0], tf.int32),
            tf.zeros([batch, k], tf.bool), tf.zeros([batch, k], tf.int32))


def beam_search(step_fn, prompt, state, max_new_tokens, *, beam_width=4, length_penalty=0.0,
                end_token=-1):
    """Beam search: the best continuation [B, max_new_tokens], its log-probability [B] and length [B].

    Hypotheses are ranked by log_prob / length ** length_penalty (0: plain log-probability). A beam that
    emits ``end_token`` is finished: it keeps its score and is padded with ``end_token``.
    ``state`` may be any nested structure of tensors with the batch as their first axis.
    """
    logits, state = prefill(step_fn, prompt, state)
    k = beam_width
    logits, state, scores, sequences, done, lengths = initial_beams(logits, state, k)

    def body(i, *beams):
        return (i + 1, *beam_step(step_fn, *beams, length_penalty=length_penalty, end_token=end_token))

    _, _, _, scores, sequences, done, lengths = tf.while_loop(
        lambda i, *_: i < max_new_tokens, body, (0, logits, state, scores, sequences, done, lengths),
        shape_invariants=(tf.TensorShape([]), _any_batch(logits), tf.nest.map_structure(_any_batch, state),
                          _any_batch(scores), tf.TensorShape([None, k, None]), _any_batch(done),
                          _any_batch(lengths)))
    if length_penalty:
        final = scores / tf.pow(tf.cast(tf.maximum(lengths, 1), tf.float32), length_penalty)
    else:
        final = scores
    best = tf.argmax(final, -1, output_type=tf.int32)
    return (tf.gather(sequences, best, batch_dims=1), tf.gather(scores, best, batch_dims=1),
            tf.gather(lengths, best, batch_dims=1))

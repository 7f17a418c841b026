"""The LSTM LM's benchmark hooks: time per generated token (``inference_timer``) and an analytic FLOPs
count (``forward_flops``; TF's graph profiler does not look inside the recurrence's while loop)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfmstep import decoding
from tfmstep.benchmark.timing import percentile_summary, time_in_loop
from tfmstep.models.lstm_lm.model import initial_state, make_step_fn


def forward_flops(config) -> float:
    """Per training sequence: each LSTM layer does 4 gates x (input + recurrent) matmuls per token, plus
    the head."""
    per_token, width = 0.0, config.embedding_dim
    for _ in range(config.layers):
        per_token += 2.0 * 4 * config.units * (width + config.units)
        width = config.units
    per_token += 2.0 * config.units * config.vocab_size
    return per_token * config.seq_len


def per_token_times(model: keras.Model, config, prompt_tokens: int = 64, new_tokens: int = 64,
                    beam_width: int = 4, repeats: int = 50) -> list:
    """Time per token of generation (batch 1): reading the prompt, a greedy step, a beam-search step
    (``decoding.beam_step``, the one generation runs).

    Share = that phase's part of one generation of ``new_tokens`` after a ``prompt_tokens`` prompt.
    """
    step = make_step_fn(model)
    vocab = model.output_shape[-1]

    def prefill_token(args):
        tokens, state = args
        return step(tokens, state)[1]

    def greedy_token(args):
        tokens, state = args
        logits, state = step(tokens, state)
        return tf.argmax(logits, -1, output_type=tf.int32), state

    def beam_token(beams):  # k beams of one prompt
        return decoding.beam_step(step, *beams)

    one = (tf.zeros([1], tf.int32), initial_state(model, 1))
    beams = decoding.initial_beams(tf.zeros([1, vocab]), initial_state(model, 1), beam_width)
    rows = [
        {"step": "prompt token (prefill)", **percentile_summary(time_in_loop(prefill_token, one, repeats)),
         "tokens": prompt_tokens},
        {"step": "greedy token", **percentile_summary(time_in_loop(greedy_token, one, repeats)),
         "tokens": new_tokens},
        {"step": f"beam token (width {beam_width})",
         **percentile_summary(time_in_loop(beam_token, beams, repeats)), "tokens": new_tokens},
    ]
    greedy_total = rows[0]["mean_ms"] * prompt_tokens + rows[1]["mean_ms"] * new_tokens
    beam_total = rows[0]["mean_ms"] * prompt_tokens + rows[2]["mean_ms"] * new_tokens
    rows[0]["share"] = rows[0]["mean_ms"] * prompt_tokens / greedy_total  # of a greedy generation
    rows[1]["share"] = rows[1]["mean_ms"] * new_tokens / greedy_total
    rows[2]["share"] = rows[2]["mean_ms"] * new_tokens / beam_total  # of a beam generation
    return rows

"""Serving signatures of the chain reasoner (registered as its ``servable`` hook).

- ``serving_default``: ``tokens`` int32 [B, T] (the problem's character ids, then its answer slots, then
  PAD) -> ``answers`` [B, A] (answer ids), ``answer_text`` [B] and ``steps_used`` [B].
- ``answer_text``: ``text`` string [B] -> the same, tokenised in the graph with the model's tokenizer
  (characters, or a file task's SentencePiece pieces through keras-hub's tokenizer layer, whose
  vocabulary is also copied to the version's assets/; answer slots appended), so a client sends the
  problem as it has it.

Every input is checked in the graph before the model runs (``tfmstep.export.signatures.check_inputs``:
rank, a batch of 1..1024; then ids inside the vocabulary, exactly one of each answer slot, at most
``max_tokens`` tokens, printable-ASCII non-empty text). A bad request fails
with an InvalidArgument naming the input, never with an out-of-range gather (which on GPU silently reads
zeros).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfmstep.data import chains
from tfmstep.export.signatures import Servable, Signature, after, assert_in_range, assert_that, check_inputs


MAX_BATCH = 1024


def check_tokens(tokens, config):
    """The request's token ids, checked before the model reads them (see the module docstring)."""
    spec = {"tokens": tf.TensorSpec([None, None], tf.int32)}
    tokens = check_inputs({"tokens": tokens}, spec, max_batch=MAX_BATCH)["tokens"]
    slots = tf.stack([tf.reduce_sum(tf.cast(tf.equal(tokens, s), tf.int32), axis=1)
                      for s in chains.answer_slots(config.answers)], axis=1)
    return after([
        assert_that(tf.shape(tokens)[1] <= config.max_tokens,
                    f"input 'tokens': {{}} tokens per problem is over max_tokens={config.max_tokens}",
                    tf.shape(tokens)[1]),
        assert_in_range(tokens, 0, config.input_vocab_size - 1, "tokens", "token ids"),
        assert_that(tf.reduce_all(tf.equal(slots, 1)),
                    f"input 'tokens': every problem needs each answer slot id 1..{config.answers} exactly once"),
    ], tokens)


def _charset_table():
    """codepoint (0..127) -> character id, -1 where the tokenizer has none."""
    table = np.full(128, -1, np.int32)
    for char in chains.CHARSET:
        table[ord(char)] = chains.encode(char)[0]
    return tf.constant(table)


def _id_strings():
    """character id -> its character ("" for PAD and answer slots)."""
    return tf.constant([""] * chains.FIRST_CHAR_ID + list(chains.CHARSET))


def text_to_tokens(text, config, pieces=None):
    """string [B] -> int32 tokens [B, T]: characters (or ``pieces``: a keras-hub SentencePiece tokenizer
    layer, ids offset past the characters), then the answer slots, then PAD. Checks the text."""
    text = check_inputs({"text": text}, {"text": tf.TensorSpec([None], tf.string)}, max_batch=MAX_BATCH)["text"]
    codepoints = tf.strings.unicode_decode(text, "UTF-8", errors="replace", replacement_char=0xFFFD)
    flat = codepoints.flat_values
    inside = (flat >= 0) & (flat < 128)
    ids = tf.gather(_charset_table(), tf.where(inside, flat, 0))
    ragged = codepoints.with_flat_values(ids)
    if pieces is not None:
        ragged = tf.cast(pieces.tokenize(text), tf.int32) + chains.VOCAB_SIZE
        if isinstance(ragged, tf.Tensor):  # one problem comes back dense
            ragged = tf.RaggedTensor.from_tensor(ragged)
    lengths = ragged.row_lengths()
    checks = [
        assert_that(tf.reduce_all(inside & (ids >= 0)),
                    "input 'text': a character outside printable ASCII (the tokenizer's vocabulary)"),
        assert_that(tf.reduce_all(lengths > 0), "input 'text': empty problem"),
        assert_that(tf.reduce_all(lengths <= config.max_tokens - config.answers),
                    f"input 'text': longer than max_tokens={config.max_tokens} minus "
                    f"{config.answers} answer slots"),
    ]
    with tf.control_dependencies(checks):
        slots = tf.broadcast_to(tf.constant(chains.answer_slots(config.answers), tf.int32)[None],
                                [tf.shape(text)[0], config.answers])
        joined = tf.concat([ragged, tf.RaggedTensor.from_tensor(slots)], axis=1)
        return joined.to_tensor(default_value=chains.PAD)


def chain_servable(name: str, model: keras.Model, config) -> Servable:
    from tfmstep.models.chain_transformer.model import chain_tokenizer

    id_strings = _id_strings()
    tokenizer = chain_tokenizer(config)
    pieces = tokenizer.sentencepiece.tokenizer if isinstance(tokenizer, chains.PieceTokenizer) else None
    if pieces is not None:
        pieces(tf.constant(["x"]))  # a first call builds the layer; the export archive tracks built layers

    def outputs_of(tokens):
        outputs = model({"tokens": tokens}, training=False)
        answers = tf.argmax(outputs["logits"], -1, output_type=tf.int32)
        return {"answers": answers, "answer_text": tf.strings.reduce_join(tf.gather(id_strings, answers), axis=1),
                "steps_used": tf.cast(outputs["steps_used"], tf.int32)}

    def answer_tokens(tokens):
        return outputs_of(check_tokens(tokens, config))

    def answer_text(text):
        return outputs_of(text_to_tokens(text, config, pieces))

    def raw_outputs(tokens):
        outputs = model({"tokens": tokens}, training=False)
        return {"logits": tf.cast(outputs["logits"], tf.float32),
                "steps_used": tf.cast(outputs["steps_used"], tf.float32)}

    def reference(signature_name, inputs):
        if signature_name == "answer_text":
            texts = [t.decode() if isinstance(t, bytes) else t for t in np.asarray(inputs["text"]).tolist()]
            rows = [outputs_of(tf.constant([tokenizer.encode(t) + chains.answer_slots(config.answers)],
                                           tf.int32)) for t in texts]
            return {key: np.concatenate([r[key].numpy() for r in rows]) for key in rows[0]}
        return {key: value.numpy() for key, value in outputs_of(tf.constant(inputs["tokens"])).items()}

    tokens = _example_tokens(config).astype(np.int32)
    if pieces is None:
        example_problems = [chains.decode(row) for row in tokens]
    else:
        example_problems = [tokenizer.sentencepiece.decode(row[row >= chains.VOCAB_SIZE] - chains.VOCAB_SIZE)
                            for row in tokens]
    token_spec = {"tokens": tf.TensorSpec([None, None], tf.int32, name="tokens")}
    return Servable(
        signatures={"serving_default": Signature(answer_tokens, token_spec),
                    "answer_text": Signature(answer_text, {"text": tf.TensorSpec([None], tf.string, name="text")})},
        warmup_inputs={"serving_default": {"tokens": tokens},
                       "answer_text": {"text": np.array([p.encode() for p in example_problems], object)}},
        tflite_fn=raw_outputs, tflite_input_signature=token_spec, primary_output="logits",
        keras_reference=reference, vocab_file=config.vocab_file if pieces is not None else None,
        trackables=[pieces] if pieces is not None else [])


def _example_tokens(config, batch_size: int = 2):
    from tfmstep.models.chain_transformer.model import chain_dataset  # the family's own data

    inputs, _ = next(iter(chain_dataset(config, "validation", batch_size)))
    return np.asarray(inputs["tokens"])[:batch_size]

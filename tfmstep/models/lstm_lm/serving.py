"""Serving signatures of the LSTM language model (registered as the family's ``servable`` hook).

- ``serving_default`` = ``next_token_logits``: ``text`` string [batch] (raw UTF-8, tokenised in the graph
  with the model's own tokenizer: bytes, or its SentencePiece vocabulary, which then ships in the
  version's ``assets/``) -> ``next_token_logits`` [batch, vocab_size], ``next_token`` int32 [batch].
- ``generate``: ``text`` [batch], ``max_length`` int32 scalar (1..1024), ``beam_width`` int32 scalar (1 =
  greedy, 2, 4, 8) -> ``text`` [batch] (the continuation), ``tokens`` int32 [batch, max_length],
  ``log_prob`` [batch].

Every input is checked in the graph before any kernel reads it (``signatures.check_inputs``: rank, batch
1..``MAX_BATCH``; then every text 1..``MAX_PROMPT_TOKENS`` tokens, ``max_length`` and ``beam_width`` in
range); a bad request fails with an InvalidArgument naming the input. Token ids come out of the
tokenizer, so they are always inside the vocabulary.

TF-Lite converts the whole-sequence logits at the training length with the LSTMs unrolled (an LSTM's while
loop needs TF select ops); that copy is built only when a TF-Lite file is asked for.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from tfmstep.errors import UserError
from tfmstep.export import signatures
from tfmstep.models.lstm_lm import model as lm

# Beam widths ``generate`` accepts at run time (1 = greedy). Each is a branch of one tf.switch_case,
# because beam search needs its width as a static shape.
BEAM_WIDTHS = (1, 2, 4, 8)
MAX_GENERATE_LENGTH = 1024
MAX_BATCH = 256  # texts per request
MAX_PROMPT_TOKENS = 4096  # tokens per text (bytes, or SentencePiece pieces)

_BYTE_STRINGS = [bytes([i]) for i in range(256)]


def text_to_tokens(text: tf.Tensor) -> tf.RaggedTensor:
    """[B] strings -> ragged [B, bytes] int32 byte tokens (the LM's tokenisation, in the graph)."""
    chars = tf.strings.bytes_split(text)
    values = tf.reshape(tf.io.decode_raw(chars.flat_values, tf.uint8), [-1])
    return chars.with_flat_values(tf.cast(values, tf.int32))


def tokens_to_text(tokens: tf.Tensor) -> tf.Tensor:
    """[B, T] byte tokens -> [B] strings (raw bytes; a client decodes them as UTF-8)."""
    table = tf.constant(_BYTE_STRINGS)
    return tf.strings.reduce_join(tf.gather(table, tf.clip_by_value(tokens, 0, 255)), axis=-1)


@dataclasses.dataclass
class TextCodec:
    """How the LM's text becomes tokens and back: in the graph (serving) and in Python (the reference)."""

    unit: str  # what one token is, for the error messages
    to_tokens: Callable  # graph: [B] strings -> ragged [B, tokens] int32
    to_text: Callable  # graph: [B, T] int32 ids -> [B] strings
    encode: Callable  # Python: bytes -> int32 ids
    decode: Callable  # Python: ids -> bytes, what the graph's text output holds
    vocab_file: str | None = None  # shipped in assets/
    trackables: list = dataclasses.field(default_factory=list)


def byte_codec() -> TextCodec:
    """One byte tokenizer: the Python side is the training tokenizer itself (``data/text.py``
    ``ByteTokenizer``); the graph side (``text_to_tokens`` / ``tokens_to_text``) is tested equal to it
    (tests/test_export_saved_model.py). Not keras-hub's ``ByteTokenizer`` in the graph: it tokenises the
    same bytes, but its detokenize drops id 0 (as padding) and rewrites invalid UTF-8 to U+FFFD, so the
    served text would no longer be the bytes the model produced (a beam cut inside a multi-byte
    character, a generated NUL)."""
    from tfmstep.data import text as text_data

    tokenizer = text_data.ByteTokenizer()
    return TextCodec("byte", text_to_tokens, tokens_to_text, encode=tokenizer.encode,
                     decode=tokenizer.decode_bytes)


def sentencepiece_codec(config) -> TextCodec:
    """The model's own vocabulary file, in the graph through keras-hub's SentencePieceTokenizer (TF Text's
    SentencepieceOp / SentencepieceTokenizeOp / SentencepieceDetokenizeOp).

    Read from ``config.vocab_file`` and never retrained here: a vocabulary made anew would not be the one
    the weights were trained with.

    The stock TF Serving model server has these ops: tensorflow/serving's model_servers/BUILD links
    ``@org_tensorflow_text//tensorflow_text:ops_lib`` (which includes ``sentencepiece_tokenizer_cc``) into
    ``server_lib``, since tensorflow/serving#1490 (2020); details in tfmstep/export/README.md."""
    from tfmstep.data import text as text_data

    path = config.vocab_file
    if not path or not os.path.isfile(path):
        raise UserError(f"the SentencePiece vocabulary {path!r} (vocab_file) is missing; the export needs "
                        f"the file the model was trained with (a relative path is read from the current "
                        f"directory)")
    with open(path, "rb") as f:
        proto = f.read()
    try:
        python_tokenizer = text_data.SentencePieceTokenizer(proto)
    except Exception as e:  # not a SentencePiece model proto
        raise UserError(f"vocab_file {path} is not a SentencePiece model ({type(e).__name__})") from None
    if python_tokenizer.vocabulary_size != config.vocab_size:
        raise UserError(f"vocab_file {path} has {python_tokenizer.vocabulary_size} pieces but the model's "
                        f"vocab_size is {config.vocab_size}")
    layer = python_tokenizer.tokenizer
    layer(tf.constant(["x"]))  # a first call builds the layer; ExportArchive tracks only built layers

    def to_tokens(text):
        return tf.cast(layer.tokenize(text), tf.int32)

    def decode(ids):
        return python_tokenizer.decode(np.asarray(ids, np.int32)).encode("utf-8")

    # The op holds the model proto as an attribute, so the graph is self-contained; the asset is the same
    # bytes where TF Serving's layout expects a vocabulary (for clients, and to re-tokenise offline).
    return TextCodec("SentencePiece token", to_tokens, layer.detokenize, encode=python_tokenizer.encode,
                     decode=decode, vocab_file=path, trackables=[layer])


def text_codec(config) -> TextCodec:
    return sentencepiece_codec(config) if config.tokenizer == "sentencepiece" else byte_codec()


def _masked_step(step_fn):
    """Wrap ``step(tokens, state)`` so that token -1 (right padding of a shorter prompt) leaves the state
    and the last logits unchanged: prompts of different lengths then decode in one batch."""

    def step(tokens, state):
        lstm_state, last_logits = state
        valid = tokens >= 0
        logits, new_state = step_fn(tf.maximum(tokens, 0), lstm_state)
        new_state = tf.where(tf.reshape(valid, [-1, 1, 1, 1]), new_state, lstm_state)
        logits = tf.where(valid[:, None], logits, last_logits)
        return logits, (new_state, logits)

    return step


def unrolled_copy(model: keras.Model, sequence_length: int) -> keras.Model:
    """The functional model at a fixed length with every RNN layer unrolled (what TF-Lite converts).

    Only the RNN layers are rebuilt (with ``unroll=True``, their weights copied now); every other layer is
    the model's own, shared: a layer holding another layer (the tied output reads the embedding's matrix)
    then needs no config round trip."""
    rebuilt = []

    def clone_layer(layer):
        if not isinstance(layer, keras.layers.RNN):
            return layer
        layer_config = layer.get_config()
        layer_config["unroll"] = True
        copy = layer.__class__.from_config(layer_config)
        rebuilt.append((layer, copy))
        return copy

    inputs = keras.Input(shape=(sequence_length,), dtype=model.inputs[0].dtype, name=model.inputs[0].name)
    copy = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_layer)
    for original, layer in rebuilt:
        layer.set_weights(original.get_weights())
    return copy


def lstm_servable(name: str, model: keras.Model, config) -> signatures.Servable:
    from tfmstep import decoding

    step_fn = _masked_step(lm.make_step_fn(model))
    vocab = int(config.vocab_size)
    codec = text_codec(config)
    text_spec = {"text": tf.TensorSpec([None], tf.string, name="text")}
    generate_spec = dict(text_spec, max_length=tf.TensorSpec([], tf.int32, name="max_length"),
                         beam_width=tf.TensorSpec([], tf.int32, name="beam_width"))

    def prompt_tokens(text):
        """Checked text [B] -> (tokens [B, T] right-padded with -1, lengths [B])."""
        tokens = codec.to_tokens(text)
        lengths = tf.cast(tokens.row_lengths(), tf.int32)
        shortest = tf.reduce_min(tf.concat([lengths, [1]], 0))
        longest = tf.reduce_max(tf.concat([lengths, [0]], 0))
        checks = [
            signatures.assert_that(shortest > 0, f"input 'text': every text must have at least 1 {codec.unit}"),
            signatures.assert_that(longest <= MAX_PROMPT_TOKENS,
                                   f"input 'text': a text of {{}} {codec.unit}s is over the limit of "
                                   f"{MAX_PROMPT_TOKENS}", longest),
        ]
        return signatures.after(checks, (tokens.to_tensor(default_value=-1), lengths))

    def next_token_logits(text):
        text = signatures.check_inputs({"text": text}, text_spec, max_batch=MAX_BATCH)["text"]
        padded, lengths = prompt_tokens(text)
        logits = tf.cast(model(tf.maximum(padded, 0), training=False), tf.float32)  # causal: padding is after
        last = tf.gather(logits, lengths - 1, batch_dims=1)
        return {"next_token_logits": last,
                "next_token": tf.argmax(last, -1, output_type=tf.int32)}

    def generate(text, max_length, beam_width):
        inputs = signatures.check_inputs({"text": text, "max_length": max_length, "beam_width": beam_width},
                                         generate_spec, max_batch=MAX_BATCH)
        max_length, beam_width = inputs["max_length"], inputs["beam_width"]
        checks = [
            signatures.assert_that((max_length >= 1) & (max_length <= MAX_GENERATE_LENGTH),
                                   f"input 'max_length' must be in [1, {MAX_GENERATE_LENGTH}], got {{}}",
                                   max_length),
            signatures.assert_that(tf.reduce_any(tf.equal(beam_width, BEAM_WIDTHS)),
                                   f"input 'beam_width' must be one of {', '.join(map(str, BEAM_WIDTHS))}, "
                                   f"got {{}}", beam_width),
        ]
        # Everything downstream (tokenising too) waits for the checks.
        text, max_length, beam_width = signatures.after(checks, (inputs["text"], max_length, beam_width))
        padded, _ = prompt_tokens(text)
        batch = tf.shape(padded)[0]
        state = (lm.initial_state(model, batch), tf.zeros([batch, vocab], tf.float32))

        def greedy():
            return decoding.sample(step_fn, padded, state, max_length, greedy=True)

        def beam(width):
            return lambda: decoding.beam_search(step_fn, padded, state, max_length, beam_width=width)[:2]

        branch = tf.argmax(tf.cast(tf.equal(beam_width, BEAM_WIDTHS), tf.int32), output_type=tf.int32)
        tokens, log_prob = tf.switch_case(branch, [greedy] + [beam(w) for w in BEAM_WIDTHS[1:]])
        return {"text": codec.to_text(tokens), "tokens": tokens, "log_prob": log_prob}

    prompts = np.array([b"def main(", b"import os\n"], dtype=object)

    def make_tflite_fn():
        unrolled = unrolled_copy(model, config.seq_len)

        def sequence_logits(tokens):
            return {"logits": tf.cast(unrolled(tokens, training=False), tf.float32)}

        return sequence_logits

    def reference(signature_name, inputs):
        """Each prompt alone (no padding), tokenised in Python, through the Keras model / the unbatched
        decoders."""
        rows = []
        for prompt in inputs["text"]:
            tokens = tf.constant([codec.encode(prompt).tolist()], tf.int32)
            if signature_name in ("serving_default", "next_token_logits"):
                last = keras.ops.convert_to_numpy(model(tokens, training=False))[0, -1]
                rows.append({"next_token_logits": last, "next_token": np.argmax(last)})
                continue
            plain_step = lm.make_step_fn(model)
            state = lm.initial_state(model, 1)
            length, width = int(inputs["max_length"]), int(inputs["beam_width"])
            if width == 1:
                out, log_prob = decoding.sample(plain_step, tokens, state, length, greedy=True)
            else:
                out, log_prob, _ = decoding.beam_search(plain_step, tokens, state, length, beam_width=width)
            rows.append({"tokens": out.numpy()[0], "log_prob": log_prob.numpy()[0],
                         "text": codec.decode(out.numpy()[0])})
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    logits_signature = signatures.Signature(next_token_logits, text_spec)
    return signatures.Servable(
        signatures={"serving_default": logits_signature, "next_token_logits": logits_signature,
                    "generate": signatures.Signature(generate, generate_spec)},
        warmup_inputs={"next_token_logits": {"text": prompts},
                       "generate": {"text": prompts, "max_length": np.array(8, np.int32),
                                    "beam_width": np.array(2, np.int32)}},
        make_tflite_fn=make_tflite_fn,
        tflite_input_signature={"tokens": tf.TensorSpec([None, config.seq_len], tf.int32, name="tokens")},
        primary_output="logits", keras_reference=reference, vocab_file=codec.vocab_file,
        trackables=list(codec.trackables))

"""What each model exports: serving signatures (TF Serving), the function TF-Lite converts, warmup inputs.

Driven by the registry. ``servable(name, model, config)`` returns a ``Servable`` for any registered model:
a family listed in ``FAMILIES`` gets its own signatures (the classifier's ``probabilities``/``classes``,
the language model's ``next_token_logits`` and ``generate`` with in-graph tokenisation -- bytes, or its
SentencePiece vocabulary, which then ships in the version's ``assets/`` --, the chain
reasoner's ``answers``/``steps_used``); any other family gets the generic ``serving_default`` over the
model's own inputs with its outputs under their own names. Special cases of a family live here and nowhere
else, so the export, the tests and ``tools/export.py`` stay generic.

Every serving function is a plain function (``keras.export.ExportArchive`` wraps it in a ``tf.function``
without ``jit_compile``: an XLA must-compile attribute breaks TF Serving on GPU) with a dynamic batch
dimension, and refuses an empty batch with a clear in-graph error.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from tfmstep import registry
from tfmstep.errors import UserError

# Beam widths the LM's ``generate`` signature accepts at run time (1 = greedy). Each is a branch of one
# tf.switch_case, because beam search needs its width as a static shape.
BEAM_WIDTHS = (1, 2, 4, 8)
MAX_GENERATE_LENGTH = 1024


@dataclasses.dataclass
class Signature:
    fn: Callable  # fn(**inputs) -> {output_name: tensor}
    input_signature: dict  # {input_name: tf.TensorSpec}; the batch dimension is None


@dataclasses.dataclass
class Servable:
    """Everything the exporters need to know about one model."""

    signatures: dict  # {signature_name: Signature}; "serving_default" is always present
    warmup_inputs: dict  # {signature_name: {input_name: np.ndarray}}: realistic requests for warmup/tests
    # TF-Lite: a function of the model's inputs returning its raw outputs (a dict), with TF-Lite-friendly
    # fixed shapes (LSTMs unrolled at the training sequence length).
    tflite_fn: Callable
    tflite_input_signature: dict
    primary_output: str  # the output whose argmax is compared between TF-Lite and Keras
    agreement_mask: Callable | None = None  # labels -> bool mask of positions that count (None: all)
    # (signature_name, inputs) -> the outputs computed in plain Keras, one example at a time where the
    # serving function batches or pads: what the reloaded SavedModel is checked against.
    keras_reference: Callable | None = None
    # A file the servable needs at serving time: copied into the version's assets/ as a
    # tf.saved_model.Asset, so it moves with the model (TF Serving's place for vocabularies).
    vocab_file: str | None = None
    # Non-variable TF resources the serving functions use (the SentencePiece op's model), which the
    # archive must track to save them.
    trackables: list = dataclasses.field(default_factory=list)


def _check_nonempty(tensor, what: str):
    """In-graph: a request with an empty batch fails with this message instead of returning nothing."""
    return tf.debugging.assert_positive(tf.shape(tensor)[0], message=f"empty batch: {what} has no examples")


def _with_batch_none(spec: tf.TensorSpec, name: str) -> tf.TensorSpec:
    return tf.TensorSpec([None] + list(spec.shape[1:]), spec.dtype, name=name)


def model_input_specs(name: str, model: keras.Model, config) -> dict:
    """{input_name: TensorSpec with batch None}: the functional model's inputs, else its dataset's."""
    if getattr(model, "inputs", None) and not isinstance(model.inputs, dict) and len(model.inputs) == 1:
        tensor = model.inputs[0]
        input_name = tensor.name or "inputs"
        return {input_name: tf.TensorSpec(tensor.shape, tensor.dtype, name=input_name)}
    element = registry.get_spec(name).dataset(config, "validation", 2).element_spec[0]
    if isinstance(element, Mapping):
        return {key: _with_batch_none(spec, key) for key, spec in element.items()}
    return {"inputs": _with_batch_none(element, "inputs")}


def _dict_inputs(model: keras.Model) -> bool:
    """Whether the model takes a dict of inputs (subclassed or multi-input) rather than one tensor."""
    return not (getattr(model, "inputs", None) and len(model.inputs) == 1
                and not isinstance(model.inputs, dict))


def _named_outputs(outputs, model: keras.Model) -> dict:
    """Outputs under meaningful names: a dict's keys, else the functional model's output layer names."""
    if isinstance(outputs, Mapping):
        return {key: value for key, value in outputs.items()}
    flat = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(flat) or len(set(names)) != len(names):
        names = ["outputs"] if len(flat) == 1 else [f"outputs_{i}" for i in range(len(flat))]
    return dict(zip(names, flat))


def _example_inputs(name: str, config, input_specs: dict, batch_size: int = 2) -> dict:
    inputs, _ = next(iter(registry.get_spec(name).dataset(config, "validation", batch_size)))
    if not isinstance(inputs, Mapping):
        inputs = {next(iter(input_specs)): inputs}
    return {key: np.asarray(value)[:batch_size] for key, value in inputs.items()}


# ---------------------------------------------------------------------------------------------------------
# Generic: any registered model.


def generic_servable(name: str, model: keras.Model, config) -> Servable:
    input_specs = model_input_specs(name, model, config)
    dict_inputs = _dict_inputs(model)

    def call_model(**kwargs):
        first = next(iter(kwargs.values()))
        with tf.control_dependencies([_check_nonempty(first, next(iter(kwargs)))]):
            packed = dict(kwargs) if dict_inputs else first
            return _named_outputs(model(packed, training=False), model)

    example = _example_inputs(name, config, input_specs)
    outputs = _named_outputs(model(dict(example) if dict_inputs else next(iter(example.values())),
                                   training=False), model)
    primary = "logits" if "logits" in outputs else next(iter(outputs))

    def reference(signature_name, inputs):
        return _named_outputs(model(dict(inputs) if dict_inputs else next(iter(inputs.values())),
                                    training=False), model)

    return Servable(
        signatures={"serving_default": Signature(call_model, input_specs)},
        warmup_inputs={"serving_default": example},
        tflite_fn=call_model, tflite_input_signature=input_specs, primary_output=primary,
        keras_reference=reference)


# ---------------------------------------------------------------------------------------------------------
# Classifier: probabilities and classes.


def classifier_servable(name: str, model: keras.Model, config) -> Servable:
    servable = generic_servable(name, model, config)
    input_name, spec = next(iter(servable.tflite_input_signature.items()))

    def classify(**kwargs):
        images = kwargs[input_name]
        with tf.control_dependencies([_check_nonempty(images, input_name)]):
            logits = tf.cast(model(images, training=False), tf.float32)
        return {"probabilities": tf.nn.softmax(logits, axis=-1),
                "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}

    def logits_only(**kwargs):
        return {"logits": tf.cast(model(kwargs[input_name], training=False), tf.float32)}

    def reference(signature_name, inputs):
        logits = keras.ops.convert_to_numpy(model(inputs[input_name], training=False))
        return {"probabilities": keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1)),
                "classes": np.argmax(logits, -1)}

    servable.signatures = {"serving_default": Signature(classify, {input_name: spec})}
    servable.keras_reference = reference
    servable.tflite_fn = logits_only
    servable.primary_output = "logits"
    return servable


# ---------------------------------------------------------------------------------------------------------
# Language model: text in, in-graph tokenisation (bytes or SentencePiece), next-token logits and generation.

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

    unit: str  # what one token is, for the empty-text error
    to_tokens: Callable  # graph: [B] strings -> ragged [B, tokens] int32
    to_text: Callable  # graph: [B, T] int32 ids -> [B] strings
    encode: Callable  # Python: bytes -> int32 ids
    decode: Callable  # Python: ids -> bytes, what the graph's text output holds
    vocab_file: str | None = None  # shipped in assets/
    trackables: list = dataclasses.field(default_factory=list)


def byte_codec() -> TextCodec:
    return TextCodec("byte", text_to_tokens, tokens_to_text,
                     encode=lambda data: np.frombuffer(data, np.uint8).astype(np.int32),
                     decode=lambda ids: bytes(np.asarray(ids).astype(np.uint8).tolist()))


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


def language_model_servable(name: str, model: keras.Model, config) -> Servable:
    from tfmstep import decoding
    from tfmstep.models import lstm_lm

    step_fn = _masked_step(lstm_lm.make_step_fn(model))
    vocab = int(config.vocab_size)
    codec = text_codec(config)

    def prompt_tokens(text):
        checks = [_check_nonempty(text, "text")]
        tokens = codec.to_tokens(text)
        lengths = tokens.row_lengths()
        checks.append(tf.debugging.assert_positive(
            lengths, message=f"every text must have at least 1 {codec.unit}"))
        with tf.control_dependencies(checks):  # nothing downstream may run on an invalid request
            return tf.identity(tokens.to_tensor(default_value=-1)), tf.cast(tf.identity(lengths), tf.int32)

    def next_token_logits(text):
        padded, lengths = prompt_tokens(text)
        logits = tf.cast(model(tf.maximum(padded, 0), training=False), tf.float32)  # causal: padding is after
        last = tf.gather(logits, lengths - 1, batch_dims=1)
        return {"next_token_logits": last,
                "next_token": tf.argmax(last, -1, output_type=tf.int32)}

    def generate(text, max_length, beam_width):
        padded, _ = prompt_tokens(text)
        checks = [
            tf.debugging.assert_greater_equal(max_length, 1, message="max_length must be >= 1"),
            tf.debugging.assert_less_equal(max_length, MAX_GENERATE_LENGTH,
                                           message=f"max_length must be <= {MAX_GENERATE_LENGTH}"),
            tf.debugging.Assert(tf.reduce_any(tf.equal(beam_width, BEAM_WIDTHS)),
                                [f"beam_width must be one of {BEAM_WIDTHS}, got", beam_width]),
        ]
        with tf.control_dependencies(checks):  # everything downstream waits for the checks
            padded = tf.identity(padded)
            max_length, beam_width = tf.identity(max_length), tf.identity(beam_width)
        batch = tf.shape(padded)[0]
        state = (lstm_lm.initial_state(model, batch), tf.zeros([batch, vocab], tf.float32))

        def greedy():
            return decoding.sample(step_fn, padded, state, max_length, greedy=True)

        def beam(width):
            return lambda: decoding.beam_search(step_fn, padded, state, max_length, beam_width=width)[:2]

        branch = tf.argmax(tf.cast(tf.equal(beam_width, BEAM_WIDTHS), tf.int32), output_type=tf.int32)
        tokens, log_prob = tf.switch_case(branch, [greedy] + [beam(w) for w in BEAM_WIDTHS[1:]])
        return {"text": codec.to_text(tokens), "tokens": tokens, "log_prob": log_prob}

    text_spec = {"text": tf.TensorSpec([None], tf.string, name="text")}
    generate_spec = dict(text_spec, max_length=tf.TensorSpec([], tf.int32, name="max_length"),
                         beam_width=tf.TensorSpec([], tf.int32, name="beam_width"))
    prompts = np.array([b"def main(", b"import os\n"], dtype=object)

    # TF-Lite: the whole-sequence forward at the training length, with the LSTMs unrolled (a while-loop
    # LSTM needs TF select ops; the unrolled one converts to builtins).
    unrolled = unrolled_copy(model, config.seq_len)

    def sequence_logits(tokens):
        return {"logits": tf.cast(unrolled(tokens, training=False), tf.float32)}

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
            plain_step = lstm_lm.make_step_fn(model)
            state = lstm_lm.initial_state(model, 1)
            length, width = int(inputs["max_length"]), int(inputs["beam_width"])
            if width == 1:
                out, log_prob = decoding.sample(plain_step, tokens, state, length, greedy=True)
            else:
                out, log_prob, _ = decoding.beam_search(plain_step, tokens, state, length, beam_width=width)
            rows.append({"tokens": out.numpy()[0], "log_prob": log_prob.numpy()[0],
                         "text": codec.decode(out.numpy()[0])})
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    logits_signature = Signature(next_token_logits, text_spec)
    return Servable(
        signatures={"serving_default": logits_signature, "next_token_logits": logits_signature,
                    "generate": Signature(generate, generate_spec)},
        warmup_inputs={"next_token_logits": {"text": prompts},
                       "generate": {"text": prompts, "max_length": np.array(8, np.int32),
                                    "beam_width": np.array(2, np.int32)}},
        tflite_fn=sequence_logits,
        tflite_input_signature={"tokens": tf.TensorSpec([None, config.seq_len], tf.int32, name="tokens")},
        primary_output="logits", keras_reference=reference, vocab_file=codec.vocab_file,
        trackables=list(codec.trackables))


def unrolled_copy(model: keras.Model, sequence_length: int) -> keras.Model:
    """A copy of the functional model (weights copied now) with every RNN layer unrolled at a fixed length."""

    def clone_layer(layer):
        layer_config = layer.get_config()
        if isinstance(layer, keras.layers.RNN) or "unroll" in layer_config:
            layer_config["unroll"] = True
        return layer.__class__.from_config(layer_config)

    inputs = keras.Input(shape=(sequence_length,), dtype=model.inputs[0].dtype, name=model.inputs[0].name)
    copy = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_layer)
    copy.set_weights(model.get_weights())
    return copy


# ---------------------------------------------------------------------------------------------------------
# Chain reasoner: answers and the loop iterations it used (halting).


def chain_servable(name: str, model: keras.Model, config) -> Servable:
    servable = generic_servable(name, model, config)
    input_specs = {key: tf.TensorSpec([None, None], spec.dtype, name=key)
                   for key, spec in servable.tflite_input_signature.items()}

    def answer(**kwargs):
        with tf.control_dependencies([_check_nonempty(kwargs["op"], "op")]):
            outputs = model(dict(kwargs), training=False)
        return {"answers": tf.argmax(outputs["logits"], -1, output_type=tf.int32),
                "steps_used": tf.cast(outputs["steps_used"], tf.int32)}

    def raw_outputs(**kwargs):
        outputs = model(dict(kwargs), training=False)
        return {"logits": tf.cast(outputs["logits"], tf.float32),
                "steps_used": tf.cast(outputs["steps_used"], tf.float32)}

    def reference(signature_name, inputs):
        outputs = model({k: tf.constant(v) for k, v in inputs.items()}, training=False)
        return {"answers": np.argmax(outputs["logits"].numpy(), -1),
                "steps_used": outputs["steps_used"].numpy().astype(np.int32)}

    servable.signatures = {"serving_default": Signature(answer, input_specs)}
    servable.keras_reference = reference
    servable.tflite_fn = raw_outputs
    servable.tflite_input_signature = input_specs
    servable.primary_output = "logits"
    servable.agreement_mask = lambda labels: np.asarray(labels["depth"]) >= 0  # real tokens, not padding
    return servable


# Family name -> builder of its Servable. Models not listed get ``generic_servable``.
FAMILIES: dict[str, Callable[[str, keras.Model, Any], Servable]] = {
    "cnn_classifier": classifier_servable,
    "lstm_lm": language_model_servable,
    "chain_transformer": chain_servable,
}


def servable(name: str, model: keras.Model, config) -> Servable:
    spec = registry.get_spec(name)  # unknown name -> UserError listing the registered models
    result = (spec.servable or FAMILIES.get(name, generic_servable))(name, model, config)
    if "serving_default" not in result.signatures:
        raise UserError(f"the export table for {name!r} has no serving_default signature")
    return result

"""Generic export machinery: what a servable is, the generic servable of any model, in-graph input checks.

``servable(name, model, config)`` returns a ``Servable`` for any registered model: the family's own
(its registry ``servable`` hook: the classifier's ``probabilities``/``classes`` in
``tfmstep/models/cnn_classifier.py``, the language model's ``next_token_logits``/``generate`` in
``tfmstep/models/lstm_lm/serving.py``, ...), else ``generic_servable``: ``serving_default`` over the
model's own inputs with its outputs under their own names.

Every serving function is a plain function (``keras.export.ExportArchive`` wraps it in a ``tf.function``
without ``jit_compile``: an XLA must-compile attribute breaks TF Serving on GPU) with a dynamic batch
dimension, and checks its inputs in the graph before any kernel runs (``check_inputs``): rank and static
dimensions, a batch of 1..``max_batch`` examples, finite float values, plus the family's own value ranges
(``assert_in_range``). A bad request fails with an ``InvalidArgument`` naming the input -- never a process
abort inside a kernel (oneDNN's convolution aborts on a rank-3 image), never a silent wrong answer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from tfmstep import registry
from tfmstep.errors import UserError

# Requests larger than this fail in the graph (a family may set its own limit per signature).
MAX_BATCH = 1024


@dataclasses.dataclass
class Signature:
    fn: Callable  # fn(**inputs) -> {output_name: tensor}
    input_signature: dict  # {input_name: tf.TensorSpec}; the batch dimension is None


@dataclasses.dataclass
class Servable:
    """Everything the exporters need to know about one model."""

    signatures: dict  # {signature_name: Signature}; "serving_default" is always present
    warmup_inputs: dict  # {signature_name: {input_name: np.ndarray}}: realistic requests for warmup/tests
    # TF-Lite: the input signature of ``tflite_fn`` (fixed shapes where TF-Lite needs them, e.g. the LM's
    # training sequence length) ...
    tflite_input_signature: dict
    primary_output: str  # the output whose argmax is compared between TF-Lite and Keras
    # ... and a function of those inputs returning the model's raw outputs (a dict). Either given, or
    # built on first use by ``make_tflite_fn`` (the LM's unrolled copy): the SavedModel path never builds
    # what only TF-Lite needs. Read it with ``tflite_function()``.
    tflite_fn: Callable | None = None
    make_tflite_fn: Callable[[], Callable] | None = None
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
    # Set by tflite.py: a temporary SavedModel of ``tflite_fn``, written once, converted to every format.
    tflite_source_dir: str | None = dataclasses.field(default=None, repr=False)
    # Set by ``servable()``: the family's registry entry, resolved once; the exporters read its dataset and
    # loss from here instead of looking the name up again.
    spec: registry.ModelSpec | None = dataclasses.field(default=None, repr=False)

    def tflite_function(self) -> Callable:
        if self.tflite_fn is None:
            if self.make_tflite_fn is None:
                raise UserError("this servable has no TF-Lite entry point (tflite_fn)")
            self.tflite_fn = self.make_tflite_fn()
        return self.tflite_fn


# ---------------------------------------------------------------------------------------------------------
# In-graph input checks.


def shape_text(spec: tf.TensorSpec) -> str:
    """``[batch, 8, 8, 1]``: a spec's shape as error messages show it."""
    dims = spec.shape.as_list() if spec.shape.rank is not None else None
    if dims is None:
        return "any shape"
    return "[" + ", ".join("batch" if i == 0 and d is None else ("?" if d is None else str(d))
                           for i, d in enumerate(dims)) + "]"


def assert_that(condition, message: str, *values) -> tf.Operation:
    """An Assert whose InvalidArgument reads ``message`` with ``{}`` filled in by ``values`` at run time."""
    return tf.debugging.Assert(condition, [tf.strings.format(message, values) if values else message])


def assert_in_range(x, low, high, name: str, what: str = "values") -> tf.Operation:
    """``low <= x <= high`` everywhere (an empty ``x`` passes); the error names the input and its range."""
    x = tf.reshape(tf.convert_to_tensor(x), [-1])
    empty = tf.equal(tf.size(x), 0)
    inside = tf.logical_and(tf.reduce_all(x >= low), tf.reduce_all(x <= high))
    smallest = tf.where(empty, tf.zeros([], x.dtype), tf.reduce_min(x))
    largest = tf.where(empty, tf.zeros([], x.dtype), tf.reduce_max(x))
    return assert_that(inside, f"input '{name}': {what} must be in [{low:g}, {high:g}], got {{}} to {{}}",
                       smallest, largest)


def after(checks, tensors):
    """``tensors`` (a dict or one tensor) re-emitted so that everything reading them waits for ``checks``."""
    with tf.control_dependencies(list(checks)):
        return tf.nest.map_structure(tf.identity, tensors)


def check_inputs(inputs: Mapping, specs: Mapping, *, max_batch: int = MAX_BATCH,
                 finite: bool = True) -> dict:
    """The request's tensors, checked in the graph before anything else reads them:

    - rank and every static dimension of the spec, with ``EnsureShape`` (a run-time check TF keeps: an
      Assert on ``tf.rank`` would be folded away by Grappler, which trusts the signature's static shape);
    - a batch (axis 0 of every batched input) of 1..``max_batch`` examples, the same for every input;
    - finite values in every float input (``finite``).

    Returns the checked tensors: read these, not the raw inputs, so every kernel depends on the checks.
    """
    checked, checks, batch = {}, [], None
    for name, spec in specs.items():
        # EnsureShape's error names the tensor: "Shape of tensor <name> [..] is not compatible with ...".
        x = tf.ensure_shape(tf.identity(inputs[name], name=name), spec.shape)
        checked[name] = x
        if spec.shape.rank and spec.shape[0] is None:  # batched
            size = tf.shape(x)[0]
            if batch is None:
                batch = (name, size)
                checks.append(assert_that(size > 0, f"empty batch: input '{name}' has no examples"))
                checks.append(assert_that(size <= max_batch, f"input '{name}': a batch of {{}} examples is "
                                                              f"over the limit of {max_batch}", size))
            else:
                checks.append(assert_that(tf.equal(size, batch[1]), f"input '{name}' has {{}} examples but "
                                                                    f"'{batch[0]}' has {{}}", size, batch[1]))
        if finite and spec.dtype.is_floating:
            checks.append(assert_that(tf.reduce_all(tf.math.is_finite(x)),
                                      f"input '{name}' has NaN or infinite values"))
    return after(checks, checked)


def _check_nonempty(tensor, what: str):
    """In-graph: a request with an empty batch fails with this message instead of returning nothing."""
    return tf.debugging.assert_positive(tf.shape(tensor)[0], message=f"empty batch: {what} has no examples")


def _with_batch_none(spec: tf.TensorSpec, name: str) -> tf.TensorSpec:
    return tf.TensorSpec([None] + list(spec.shape[1:]), spec.dtype, name=name)


def model_input_specs(name, model: keras.Model, config) -> dict:
    """{input_name: TensorSpec with batch None}: the functional model's inputs, else its dataset's.
    ``name``: the family's ModelSpec or registered name."""
    if getattr(model, "inputs", None) and not isinstance(model.inputs, dict) and len(model.inputs) == 1:
        tensor = model.inputs[0]
        input_name = tensor.name or "inputs"
        return {input_name: tf.TensorSpec(tensor.shape, tensor.dtype, name=input_name)}
    element = registry.resolve(name).dataset(config, "validation", 2).element_spec[0]
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


def example_inputs(name, config, input_specs: dict, batch_size: int = 2) -> dict:
    """A batch of the validation split as {input_name: np.ndarray} (warmup requests, tests); ``name``: the
    family's ModelSpec or registered name."""
    inputs, _ = next(iter(registry.resolve(name).dataset(config, "validation", batch_size)))
    if not isinstance(inputs, Mapping):
        inputs = {next(iter(input_specs)): inputs}
    return {key: np.asarray(value)[:batch_size] for key, value in inputs.items()}


_example_inputs = example_inputs


# ---------------------------------------------------------------------------------------------------------
# Generic: any registered model.


def generic_servable(name: str, model: keras.Model, config, spec: registry.ModelSpec | None = None) -> Servable:
    spec = spec or registry.resolve(name)
    input_specs = model_input_specs(spec, model, config)
    dict_inputs = _dict_inputs(model)

    def call_model(**kwargs):
        checked = check_inputs(kwargs, input_specs)
        packed = dict(checked) if dict_inputs else next(iter(checked.values()))
        return _named_outputs(model(packed, training=False), model)

    def raw_outputs(**kwargs):  # TF-Lite: no asserts (TF-Lite has no builtin for them)
        packed = dict(kwargs) if dict_inputs else next(iter(kwargs.values()))
        return _named_outputs(model(packed, training=False), model)

    example = example_inputs(spec, config, input_specs)
    outputs = _named_outputs(model(dict(example) if dict_inputs else next(iter(example.values())),
                                   training=False), model)
    primary = "logits" if "logits" in outputs else next(iter(outputs))

    def reference(signature_name, inputs):
        return _named_outputs(model(dict(inputs) if dict_inputs else next(iter(inputs.values())),
                                    training=False), model)

    return Servable(
        signatures={"serving_default": Signature(call_model, input_specs)},
        warmup_inputs={"serving_default": example},
        tflite_fn=raw_outputs, tflite_input_signature=input_specs, primary_output=primary,
        keras_reference=reference)


def servable(name, model: keras.Model, config) -> Servable:
    """The family's servable (its ``servable`` hook, else ``generic_servable``); ``name``: a registered name
    (an unknown one is a UserError listing the registered models) or the family's ModelSpec."""
    spec = registry.resolve(name)
    name = spec.name
    result = spec.servable(name, model, config) if spec.servable else generic_servable(name, model, config, spec)
    if "serving_default" not in result.signatures:
        raise UserError(f"the export table for {name!r} has no serving_default signature")
    result.spec = spec
    return result

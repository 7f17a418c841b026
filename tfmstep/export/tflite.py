"""TF-Lite artifacts (fp32, dynamic-range int8, fp16, full-integer int8), checked and run with LiteRT.

Every artifact is converted with ``tf.lite.TFLiteConverter`` from the servable's ``tflite_function()`` (see
``signatures.py``: raw outputs, LSTMs unrolled at a fixed length), restricted to TF-Lite builtin ops: LiteRT
refuses TF select ("Flex") ops, so ``check_builtin_ops`` reads the flatbuffer's operator codes and fails
with the op names if anything else slipped in. ``compare_with_keras`` runs the artifact with
``ai_edge_litert.interpreter`` on the validation split and reports the family's own metrics (via its
registered loss) next to the Keras model's, and how often the two agree on the argmax.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tempfile
import weakref
import keras
import numpy as np
import tensorflow as tf

from tfmstep import evaluation, registry
from tfmstep.errors import UserError
from tfmstep.export import signatures as signatures_lib

FORMATS = ("fp32", "dynamic_range", "fp16", "int8")
REPRESENTATIVE_EXAMPLES = 200


def _source_saved_model(model: keras.Model, servable: signatures_lib.Servable) -> str:
    """A SavedModel holding only the TF-Lite entry point; the converter reads it (converting straight
    from a concrete function keeps Keras 3 variables as resource reads that LiteRT cannot run).
    Written once per servable (``servable.tflite_source_dir``) and reused for every format."""
    if servable.tflite_source_dir and os.path.isdir(servable.tflite_source_dir):
        return servable.tflite_source_dir
    from tfmstep.export import saved_model as saved_model_lib

    directory = tempfile.mkdtemp(prefix="tfmstep-tflite-src-")
    fn = servable.tflite_function()
    source = signatures_lib.Servable(
        signatures={"serving_default": signatures_lib.Signature(fn, servable.tflite_input_signature)},
        warmup_inputs={}, tflite_fn=fn, tflite_input_signature=servable.tflite_input_signature,
        primary_output=servable.primary_output)
    saved_model_lib.build_archive(model, source).write_out(os.path.join(directory, "model"), verbose=False)
    servable.tflite_source_dir = os.path.join(directory, "model")
    weakref.finalize(servable, shutil.rmtree, directory, True)
    return servable.tflite_source_dir


def representative_dataset(spec: registry.ModelSpec, config, input_signature: dict, examples: int):
    """Calibration inputs for full-integer quantisation: the model's own train pipeline, one example
    per batch, the same examples every time (seed 0)."""
    def generate():
        for inputs, _ in spec.dataset(config, "train", 1, seed=0).take(examples):
            yield lite_feeds(inputs, input_signature)

    return generate


def _fit_to_spec(array: np.ndarray, spec: tf.TensorSpec) -> np.ndarray:
    """Crop/pad fixed axes (e.g. a sequence length) to the spec's static shape."""
    for axis, want in enumerate(spec.shape.as_list()):
        if want is None or array.shape[axis] == want:
            continue
        if array.shape[axis] > want:
            array = np.take(array, np.arange(want), axis=axis)
        else:
            pad = [(0, 0)] * array.ndim
            pad[axis] = (0, want - array.shape[axis])
            array = np.pad(array, pad)
    return array.astype(spec.dtype.as_numpy_dtype)


def convert(model: keras.Model, model_name: str, config, fmt: str, *,
            servable: signatures_lib.Servable | None = None,
            representative_examples: int = REPRESENTATIVE_EXAMPLES) -> bytes:
    """The .tflite flatbuffer of ``model`` in format ``fmt`` (one of FORMATS), builtin ops only."""
    if fmt not in FORMATS:
        raise UserError(f"unknown TF-Lite format {fmt!r}; choose from {', '.join(FORMATS)}")
    servable = servable or signatures_lib.servable(model_name, model, config)
    source_dir = _source_saved_model(model, servable)
    converter = tf.lite.TFLiteConverter.from_saved_model(source_dir, signature_keys=["serving_default"])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # never SELECT_TF_OPS
    if fmt == "dynamic_range":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif fmt == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset(
            _spec(servable, model_name), config, servable.tflite_input_signature, representative_examples)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # Float inputs/outputs become int8 too (a fully integer model); integer inputs (tokens) stay.
        if all(spec.dtype.is_floating for spec in servable.tflite_input_signature.values()):
            converter.inference_input_type = tf.int8
        if all(spec.dtype.is_floating for spec in _output_specs(servable)):
            converter.inference_output_type = tf.int8
    try:
        flatbuffer = converter.convert()
    except Exception as e:  # ConverterError: ops outside the allowed set, unsupported shapes, ...
        message = str(e).strip().splitlines()
        raise UserError(f"TF-Lite conversion of {model_name} to {fmt} failed with builtin ops only: "
                        f"{_first_op_error(message)}") from e
    check_builtin_ops(flatbuffer, f"{model_name} ({fmt})")
    return flatbuffer


def _output_specs(servable: signatures_lib.Servable) -> list:
    tflite_fn = servable.tflite_function()
    fn = tf.function(lambda inputs: tflite_fn(**inputs), autograph=False)
    outputs = fn.get_concrete_function(dict(servable.tflite_input_signature)).structured_outputs
    return tf.nest.flatten(outputs)


def _first_op_error(lines: list) -> str:
    """One line naming the TF ops that have no TF-Lite builtin (from the converter's MLIR errors)."""
    text = "\n".join(lines)
    select = re.findall(r"TF Select ops: ([^\n]+)", text)
    ops = sorted(set(re.findall(r"'tf\.(\w+)' op", text)) | {o.strip() for o in ",".join(select).split(",") if o.strip()})
    if ops:
        return f"TF ops with no TF-Lite builtin ({', '.join(ops)}); LiteRT refuses TF select ops"
    meaningful = [line for line in lines if line.strip() and not line.startswith("<unknown>")]
    return (meaningful[0] if meaningful else "unknown converter error").strip()[:300]


def op_names(flatbuffer: bytes) -> list[str]:
    """Operator codes of a .tflite flatbuffer: builtin names, or the custom code of custom/Flex ops."""
    from tensorflow.lite.python import schema_py_generated as schema

    builtin_names = {value: name for name, value in vars(schema.BuiltinOperator).items()
                     if not name.startswith("_")}
    root = schema.Model.GetRootAsModel(flatbuffer, 0)
    names = []
    for i in range(root.OperatorCodesLength()):
        code = root.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            custom = code.CustomCode()
            names.append("CUSTOM:" + (custom.decode() if custom else "?"))
        else:
            names.append(builtin_names.get(builtin, str(builtin)))
    return names


def check_builtin_ops(flatbuffer: bytes, what: str = "model") -> list[str]:
    """Fail with the op names if the flatbuffer needs TF select (Flex) or custom ops."""
    names = op_names(flatbuffer)
    bad = sorted({n for n in names if n.startswith("CUSTOM:")})
    if bad:
        raise UserError(f"{what} needs ops outside TF-Lite's builtins, which LiteRT refuses: "
                        f"{', '.join(n[len('CUSTOM:'):] for n in bad)}")
    return names


class LiteModel:
    """A .tflite model run with ``ai_edge_litert``; quantises/dequantises int8 inputs and outputs."""

    def __init__(self, flatbuffer: bytes, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=flatbuffer, num_threads=num_threads or os.cpu_count())
        self.runner = self.interpreter.get_signature_runner()
        self.input_details = self.runner.get_input_details()
        self.output_details = self.runner.get_output_details()

    def __call__(self, inputs: dict) -> dict:
        feeds = {}
        for name, detail in self.input_details.items():
            value = np.asarray(inputs[name])
            scale, zero = detail["quantization"]
            if detail["dtype"] in (np.int8, np.uint8) and scale:
                info = np.iinfo(detail["dtype"])
                value = np.clip(np.round(value / scale + zero), info.min, info.max)
            feeds[name] = value.astype(detail["dtype"])
        outputs = self.runner(**feeds)
        result = {}
        for name, value in outputs.items():
            scale, zero = self.output_details[name]["quantization"]
            if value.dtype in (np.int8, np.uint8) and scale:
                value = (value.astype(np.float32) - zero) * scale
            result[name] = value
        return result


def sizes(flatbuffer: bytes) -> dict:
    return {"bytes": len(flatbuffer), "gzip_bytes": len(gzip.compress(flatbuffer, compresslevel=9))}


def _spec(servable: signatures_lib.Servable, model_name: str) -> registry.ModelSpec:
    """The family: resolved once, when the servable was made (a hand-built servable: by name)."""
    return servable.spec or registry.get_spec(model_name)


def compare_with_keras(model: keras.Model, model_name: str, config, flatbuffer: bytes, *,
                       servable: signatures_lib.Servable | None = None, split: str = "validation",
                       batch_size: int = 32, max_batches: int = 0) -> dict:
    """Metrics of the TF-Lite artifact and of the Keras model on ``split`` (the family's own metrics from
    its registered loss, through the one evaluation loop, ``tfmstep.evaluation``), their argmax
    agreement rate, and the largest output difference."""
    servable = servable or signatures_lib.servable(model_name, model, config)
    spec = _spec(servable, model_name)
    lite = LiteModel(flatbuffer)
    tflite_fn = servable.tflite_function()
    primary = servable.primary_output
    sums = {"keras": [], "tflite": []}
    agree = count = 0
    max_abs_diff = 0.0
    dataset = spec.dataset(config, split, batch_size)
    for inputs, labels in (dataset.take(max_batches) if max_batches else dataset):
        feeds = lite_feeds(inputs, servable.tflite_input_signature)
        labels = tf.nest.map_structure(
            lambda a: _fit_labels(np.asarray(a), feeds, servable), labels)
        keras_out = {k: np.asarray(v) for k, v in tflite_fn(**feeds).items()}
        lite_out = lite(feeds)
        for source, outputs in (("keras", keras_out), ("tflite", lite_out)):
            sums[source].append(evaluation.batch_sums(
                spec.loss, labels, {k: tf.constant(v) for k, v in outputs.items()}
                if len(outputs) > 1 else tf.constant(outputs[primary])))
        same = np.argmax(keras_out[primary], -1) == np.argmax(lite_out[primary], -1)
        if servable.agreement_mask is not None:
            mask = servable.agreement_mask(labels)
            same = same[mask]
        agree += int(same.sum())
        count += int(same.size)
        max_abs_diff = max(max_abs_diff, float(np.max(np.abs(keras_out[primary] - lite_out[primary]))))
    empty = f"the {split} split of {model_name} is empty"
    result = {source: evaluation.mean_metrics(batches, empty_message=empty) for source, batches in sums.items()}
    result.update(examples=int(sum(float(b["count"]) for b in sums["keras"])), agreement=agree / max(count, 1),
                  max_abs_diff=max_abs_diff, primary_output=primary)
    return result


def lite_feeds(inputs, input_signature: dict) -> dict:
    """A dataset's inputs (one tensor or a dict) as the named, fixed-shape feeds of a TF-Lite input
    signature (a servable's ``tflite_input_signature``: its ``tflite_function`` and .tflite files)."""
    if not isinstance(inputs, dict):
        inputs = {next(iter(input_signature)): inputs}
    return {name: _fit_to_spec(np.asarray(inputs[name]), spec) for name, spec in input_signature.items()}


def _fit_labels(array: np.ndarray, feeds: dict, servable) -> np.ndarray:
    """Labels cropped/padded like their inputs (same per-position layout), e.g. LM windows."""
    first = servable.tflite_input_signature[next(iter(servable.tflite_input_signature))]
    if array.ndim >= 2 and first.shape.rank >= 2 and first.shape[1] is not None:
        return _fit_to_spec(array, tf.TensorSpec([None, first.shape[1]] + [None] * (array.ndim - 2),
                                                 tf.as_dtype(array.dtype)))
    return array


def export_tflite(model: keras.Model, model_name: str, config, fmt: str, output_dir: str, *,
                  servable: signatures_lib.Servable | None = None) -> str:
    """Write ``<output_dir>/<model_name>_<fmt>.tflite`` atomically; returns its path."""
    flatbuffer = convert(model, model_name, config, fmt, servable=servable)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{model_name}_{fmt}.tflite")
    temp = f"{path}.tmp-{os.getpid()}"
    with open(temp, "wb") as f:
        f.write(flatbuffer)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    return path

"""Served-path latency: one request through the Keras call, the SavedModel signature and each TF-Lite
file, at batch sizes 1 and 32."""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tfmstep import registry
from tfmstep.benchmark.timing import latencies
from tfmstep.benchmark.training import fresh_model


def served_path_latency(model: keras.Model, saved_model_dir: str, signature: str, input_name: str,
                        tflite_paths: dict, batch, repeats: int = 200) -> list:
    """p50/p99 of one request through: the Keras call, the SavedModel signature, each .tflite file.

    ``batch`` is a numpy array of inputs; every path gets the same values at batch sizes 1 and 32.
    """
    from ai_edge_litert.interpreter import Interpreter

    loaded = tf.saved_model.load(saved_model_dir)
    serving_fn = loaded.signatures[signature]
    keras_fn = tf.function(lambda x: model(x, training=False))
    rows = []
    for batch_size in (1, 32):
        x = np.asarray(batch[:batch_size])
        x_t = tf.constant(x)
        rows.append({"path": "keras call (tf.function)", "batch": batch_size,
                     **latencies(lambda: keras_fn(x_t), repeats)})
        rows.append({"path": f"SavedModel '{signature}'", "batch": batch_size,
                     **latencies(lambda: serving_fn(**{input_name: x_t}), repeats)})
        for label, path in tflite_paths.items():
            interpreter = Interpreter(model_path=path, num_threads=os.cpu_count())
            detail = interpreter.get_input_details()[0]
            interpreter.resize_tensor_input(detail["index"], (batch_size,) + tuple(detail["shape"][1:]))
            interpreter.allocate_tensors()
            detail = interpreter.get_input_details()[0]
            if detail["dtype"] in (np.int8, np.uint8):
                scale, zero = detail["quantization"]
                feed = np.clip(np.round(x / scale + zero), np.iinfo(detail["dtype"]).min,
                               np.iinfo(detail["dtype"]).max).astype(detail["dtype"])
            else:
                feed = x.astype(detail["dtype"])

            def invoke(interpreter=interpreter, index=detail["index"], feed=feed):
                interpreter.set_tensor(index, feed)
                interpreter.invoke()

            rows.append({"path": f"TF-Lite {label}", "batch": batch_size, **latencies(invoke, repeats)})
    return rows


def served_latency_report(name: str, preset: str = "default", repeats: int = 200) -> dict:
    """Export ``name`` (SavedModel + the four TF-Lite formats) to a temporary directory and time one
    request through each path next to the Keras call (a model with one input tensor)."""
    from tfmstep import export

    spec = registry.get_spec(name)
    config = spec.config(preset)
    model = fresh_model(spec, config)
    serving = export.servable(name, model, config)
    signature = serving.signatures["serving_default"]
    input_name = next(iter(signature.input_signature))
    batches = [x for x, _ in spec.dataset(config, "validation", 32).take(1)]
    with tempfile.TemporaryDirectory() as tmp:
        report = export.export_all(model, name, config, tmp, compare=False)
        tflite_paths = {fmt[len("tflite_"):]: entry["path"] for fmt, entry in report["artifacts"].items()
                        if fmt.startswith("tflite_")}
        rows = served_path_latency(model, report["artifacts"]["saved_model"]["path"], "serving_default",
                                   input_name, tflite_paths, batches[0].numpy(), repeats)
    by = {(r["path"], r["batch"]): r["p50_ms"] for r in rows}
    ratios = {}
    for batch in (1, 32):
        keras_p50 = by[("keras call (tf.function)", batch)]
        ratios[f"saved_model_vs_keras_p50_batch{batch}"] = by[("SavedModel 'serving_default'", batch)] / keras_p50
        if ("TF-Lite int8", batch) in by and ("TF-Lite fp32", batch) in by:
            ratios[f"int8_vs_fp32_p50_batch{batch}"] = by[("TF-Lite int8", batch)] / by[("TF-Lite fp32", batch)]
    return {"model": name, "rows": rows, "ratios": ratios}

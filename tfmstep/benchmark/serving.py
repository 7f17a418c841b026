"""Served-path latency: one request through the Keras call, the SavedModel signature and each TF-Lite
file, at batch sizes 1 and 32."""

from __future__ import annotations

import os
import time
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


SERVED_PRECISIONS = ("SavedModel float32", "SavedModel mixed_bfloat16", "TF-Lite fp32", "TF-Lite int8")


def served_precision_report(source: str, repeats: int = 40, batch_sizes=(1, 32),
                            max_eval_batches: int = 0) -> dict:
    """A trained model (a workdir, saved model or preset name: ``saving.load_trained``) served four ways:
    the SavedModel in float32 and in mixed_bfloat16 (the same weights, bfloat16 compute), TF-Lite fp32 and
    full-int8. Each is scored on the validation split with the family's metrics and timed at each batch
    size in interleaved repeats; latency ratios against float32 come with bootstrap intervals.

    A SavedModel is timed through its ``serving_default`` signature, what TF Serving runs; it is scored
    through the servable's TF-Lite entry point on the same model in the same precision, because the
    family's loss reads the raw outputs (e.g. logits) a serving signature turns into answers."""
    from tfmstep import evaluation, export, saving, step
    from tfmstep.benchmark import stats
    from tfmstep.export import tflite

    model, config, spec = saving.load_trained(source)
    bf16_model = spec.build(config)
    bf16_model.set_weights(model.get_weights())
    step.set_precision(bf16_model, "mixed_bfloat16")  # before anything is traced: its graphs compute in bf16
    validation = list(spec.dataset(config, "validation", 32))[:max_eval_batches or None]

    serving = export.servable(spec, model, config)  # the TF-Lite feeds and the primary output, as exported
    scorers, timers = {}, {}  # artifact -> fn({input name: numpy}) -> {output name: array}
    saved_feed_names, loaded = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for label, m in (("SavedModel float32", model), ("SavedModel mixed_bfloat16", bf16_model)):
            servable = serving if m is model else export.servable(spec, m, config)
            path = export.export_saved_model(m, spec.name, config, os.path.join(tmp, label.split()[-1]),
                                             servable=servable)
            loaded.append(tf.saved_model.load(path))  # held: its variables live as long as it does
            signature = loaded[-1].signatures["serving_default"]
            saved_feed_names[label] = list(signature.structured_input_signature[1])
            timers[label] = lambda feeds, fn=signature: fn(**{k: tf.constant(v) for k, v in feeds.items()})
            scorers[label] = lambda feeds, fn=servable.tflite_function(): fn(
                **{k: tf.constant(v) for k, v in feeds.items()})
        for fmt in ("fp32", "int8"):
            lite = tflite.LiteModel(tflite.convert(model, spec.name, config, fmt, servable=serving))
            scorers[f"TF-Lite {fmt}"] = timers[f"TF-Lite {fmt}"] = lite

        def timer_feeds(label, inputs):  # what a request to the artifact carries
            if label not in saved_feed_names:
                return tflite.lite_feeds(inputs, serving.tflite_input_signature)
            names = saved_feed_names[label]
            if not isinstance(inputs, dict):
                inputs = {names[0]: inputs}
            return {n: np.asarray(inputs[n]) for n in names}

        rows = []
        for label, score in scorers.items():
            metrics = evaluation.evaluate_outputs(spec.loss, validation, lambda inputs, score=score: tf.constant(
                score(tflite.lite_feeds(inputs, serving.tflite_input_signature))[serving.primary_output]))
            rows.append({"artifact": label, "metrics": {k: float(v) for k, v in metrics.items()}})

        timings = {}
        for batch_size in batch_sizes:
            batch = tf.nest.map_structure(lambda a: np.asarray(a)[:batch_size], validation[0][0])
            feeds = {label: timer_feeds(label, batch) for label in timers}
            for label, call in timers.items():
                call(feeds[label])  # warm-up
            seconds = {label: [] for label in timers}
            for _ in range(repeats):  # interleaved: a slow spell of the machine hits every artifact alike
                for label, call in timers.items():
                    start = time.perf_counter()
                    call(feeds[label])
                    seconds[label].append(time.perf_counter() - start)
            timings[batch_size] = seconds
    for row in rows:
        row["latency_ms"] = {str(b): {k: 1e3 * v for k, v in stats.summary(timings[b][row["artifact"]]).items()
                                      if k in ("median", "q1", "q3")} for b in batch_sizes}
    speedups = {}  # latency(base) / latency(other): above 1 means ``other`` answers sooner
    for batch_size in batch_sizes:
        for other, base in (("SavedModel mixed_bfloat16", "SavedModel float32"), ("TF-Lite int8", "TF-Lite fp32"),
                            ("TF-Lite fp32", "SavedModel float32")):
            speedups[f"{other} vs {base}, batch {batch_size}"] = stats.ratio(timings[batch_size][base],
                                                                             timings[batch_size][other])
    examples = sum(int(np.shape(tf.nest.flatten(labels)[0])[0]) for _, labels in validation)
    return {"source": source, "model": spec.name, "examples": examples, "repeats": repeats, "rows": rows,
            "speedups": speedups}

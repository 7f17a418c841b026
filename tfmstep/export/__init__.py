"""Deployable artifacts for every registered model: TF Serving SavedModels and TF-Lite files.

  from tfmstep import export
  report = export.export_all(model, "cnn_classifier", config, "export/artifacts",
                             formats=("saved_model", "tflite_int8"))

``signatures.py`` holds the generic servable machinery (each family registers its own signatures); ``saved_model.py`` writes TF Serving versions atomically
(with warmup requests); ``tflite.py`` converts, checks for builtin-only ops and compares with Keras;
``serving.py`` checks REST request bodies against a signature; ``server.py`` is ``tfmstep-serve``.
"""

from __future__ import annotations

import os

import keras

from tfmstep.errors import UserError
from tfmstep.export import saved_model, signatures, tflite
from tfmstep.export.saved_model import export_saved_model, list_versions
from tfmstep.export.signatures import servable
from tfmstep.export.tflite import export_tflite

FORMATS = ("saved_model",) + tuple(f"tflite_{f}" for f in tflite.FORMATS)
DEFAULT_EXPORT_BASE = os.path.join("export", "artifacts")  # git-ignored

__all__ = ["FORMATS", "DEFAULT_EXPORT_BASE", "check_formats", "export_all", "export_pruned",
           "export_saved_model", "export_tflite", "list_versions", "servable"]


def check_formats(formats) -> list[str]:
    formats = [f.strip() for f in formats if f.strip()]
    if not formats:
        raise UserError(f"no export format given; choose from {', '.join(FORMATS)}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def export_all(model: keras.Model, model_name, config, export_base: str, formats=FORMATS, *,
               version: int | None = None, compare: bool = True, max_eval_batches: int = 0) -> dict:
    """Export ``model`` in every format; with ``compare``, each TF-Lite file is run on the validation
    split against the Keras model. Returns a JSON-able report (paths, sizes, metrics, agreement).
    ``model_name``: the family's ModelSpec (e.g. from ``tfmstep.saving.load_trained``) or its registered name."""
    formats = check_formats(formats)
    serving = servable(model_name, model, config)  # resolves the family once (name or ModelSpec)
    model_name = serving.spec.name
    report: dict = {"model": model_name, "export_base": export_base, "artifacts": {}}
    keras_metrics = None
    for fmt in formats:
        if fmt == "saved_model":
            path = export_saved_model(model, model_name, config, export_base, version=version,
                                      servable=serving)
            report["artifacts"][fmt] = {"path": path, "bytes": _tree_size(path),
                                        "signatures": sorted(serving.signatures)}
            if compare:
                report["artifacts"][fmt].update(reloaded_vs_keras(path, serving))
            continue
        lite_format = fmt[len("tflite_"):]
        path = export_tflite(model, model_name, config, lite_format, os.path.join(export_base, "tflite"),
                             servable=serving)
        with open(path, "rb") as f:
            flatbuffer = f.read()
        entry = {"path": path, **tflite.sizes(flatbuffer)}
        if compare:
            comparison = tflite.compare_with_keras(model, model_name, config, flatbuffer, servable=serving,
                                                   max_batches=max_eval_batches)
            keras_metrics = comparison.pop("keras")
            entry.update(metrics=comparison.pop("tflite"), **comparison)
        report["artifacts"][fmt] = entry
    if compare and keras_metrics is not None:
        report["keras_metrics"] = keras_metrics
    fp32 = report["artifacts"].get("tflite_fp32")
    if fp32:
        for entry in report["artifacts"].values():
            if "bytes" in entry and "gzip_bytes" in entry:
                entry["size_vs_fp32"] = round(entry["bytes"] / fp32["bytes"], 4)
    return report


def export_pruned(sweep, export_base: str, formats=("fp32", "int8")) -> dict:
    """The TF-Lite files of every model of a pruning sweep (``tfmstep.pruning.pruning_sweep``), in
    ``<export_base>/pruned/<tag>/``; each row of the sweep's report gains ``tflite_<fmt>``: raw/gzip
    size, the family's metrics on validation and the argmax agreement with the Keras model."""
    report = sweep.report
    for row in report["rows"]:
        model = sweep.models[row["tag"]]
        serving = servable(sweep.spec or sweep.model_name, model, sweep.config)
        for fmt in formats:
            path = export_tflite(model, sweep.model_name, sweep.config, fmt,
                                 os.path.join(export_base, "pruned", row["tag"]), servable=serving)
            with open(path, "rb") as f:
                flatbuffer = f.read()
            comparison = tflite.compare_with_keras(model, sweep.model_name, sweep.config, flatbuffer,
                                                   servable=serving)
            row[f"tflite_{fmt}"] = {"path": path, **tflite.sizes(flatbuffer), "metrics": comparison["tflite"],
                                    "agreement": comparison["agreement"]}
    return report


def reloaded_vs_keras(version_dir: str, serving) -> dict:
    """Reload the SavedModel, replay its warmup requests and compare every output with plain Keras."""
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(version_dir)
    results = saved_model.run_warmup_requests(version_dir, loaded)
    max_diff, mismatched = 0.0, []
    for signature_name, outputs in results.items():
        expected = serving.keras_reference(signature_name, serving.warmup_inputs[signature_name])
        for key, want in expected.items():
            got, want = np.asarray(outputs[key]), np.asarray(want)
            if got.dtype.kind == "f":
                max_diff = max(max_diff, float(np.max(np.abs(got - want))))
            elif not np.array_equal(got, want):
                mismatched.append(f"{signature_name}/{key}")
    return {"warmup_requests_run": sorted(results), "reloaded_max_abs_diff": max_diff,
            "reloaded_mismatched_outputs": mismatched}


def _tree_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def export_table(report: dict) -> str:
    """Markdown: one row per artifact with size, size vs fp32, metrics and agreement with Keras."""
    artifacts = report["artifacts"]
    keras_metrics = report.get("keras_metrics", {})
    metric_names = list(keras_metrics)
    header = ["artifact", "bytes", "gzip bytes", "x fp32"] + metric_names + ["agreement", "max |diff|"]
    lines = [f"{report['model']}: Keras on validation: "
             + (", ".join(f"{k}={v:.4f}" for k, v in keras_metrics.items()) or "not compared"), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for fmt, entry in artifacts.items():
        metrics = entry.get("metrics", {})
        note = ""
        if "reloaded_max_abs_diff" in entry:
            note = (f" (reloaded vs Keras: max abs diff {entry['reloaded_max_abs_diff']:.2g}, "
                    f"{len(entry['reloaded_mismatched_outputs'])} integer outputs differ)")
        cells = [fmt + note, str(entry.get("bytes", "")), str(entry.get("gzip_bytes", "-")),
                 f"{entry['size_vs_fp32']:.3f}" if "size_vs_fp32" in entry else "-"]
        cells += [f"{metrics[m]:.4f}" if m in metrics else "-" for m in metric_names]
        cells += [f"{entry['agreement']:.4f}" if "agreement" in entry else "-",
                  f"{entry['max_abs_diff']:.3g}" if "max_abs_diff" in entry else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

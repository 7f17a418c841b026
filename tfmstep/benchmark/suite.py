"""The whole benchmark: the chosen sections, measured one after another into one results dict."""

from __future__ import annotations

import os
import platform

from absl import logging

from tfmstep import registry
from tfmstep.benchmark import flops, inference, scaling, serving, training
from tfmstep.errors import UserError

SECTIONS = ("training", "inference", "serving", "scaling")


def run_benchmarks(sections=SECTIONS, models=None, *, batch_size: int = 128, steps: int = 50,
                   repeats: int = 3, tune_for_steps: int = 1000, serving_model: str = "cnn_classifier",
                   scaling_model: str = "cnn_classifier") -> dict:
    """Training throughput and inference timing of ``models`` (default: every registered model), the
    served-path latency of ``serving_model`` and the multi-worker scaling of ``scaling_model``."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise UserError(f"unknown benchmark sections {unknown}; sections: {', '.join(SECTIONS)}")
    models = list(models or registry.list_models())
    for name in models + [serving_model, scaling_model]:
        registry.get_spec(name)  # an unknown name fails before anything is measured
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"}
    if "training" in sections:
        results["peak_matmul_flops"] = flops.matmul_peak_flops()
        results["training"] = []
        for name in models:
            logging.info("Benchmarking training of %s", name)
            results["training"].append(training.benchmark_training(
                name, batch_size=batch_size, steps=steps, repeats=repeats,
                peak_flops=results["peak_matmul_flops"], tune_for_steps=tune_for_steps))
    if "inference" in sections:
        results["inference_steps"] = inference.inference_step_times(models)
    if "serving" in sections:
        results["serving"] = serving.served_latency_report(serving_model)
    if "scaling" in sections:
        results["scaling"] = scaling.scaling_report(scaling_model)
    return results

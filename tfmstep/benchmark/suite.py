"""The whole benchmark: the chosen sections, measured one after another into one results dict."""

from __future__ import annotations

import json
import os
import platform

from absl import logging

from tfmstep import autotune, registry, saving
from tfmstep.benchmark import SECTIONS, inference, scaling, serving, training
from tfmstep.errors import UserError


def machine() -> dict:
    """What the figures depend on: CPU, cores, the low-precision flags and what auto-tuning makes of them."""
    model_name = ""
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    flags = sorted(autotune.cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                                           "amx_tile", "amx_int8", "fma"})
    return {"cpu": model_name, "cores": os.cpu_count(), "python": platform.python_version(),
            "cpu_flags": flags, "fast_low_precision": autotune.fast_low_precision() or "none"}


def load_targets(path: str) -> list:
    """The training entries of a suite file (benchmarks/suite.json): each a model with its preset,
    overrides and batch size, or a shipped recipe (its model, preset, --config values and batch size),
    plus the timing grid and goals."""
    try:
        with open(path) as f:
            entries = json.load(f)["training"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the benchmark suite {path}: {e}") from None
    targets = []
    for entry in entries:
        entry = dict(entry)
        if "recipe" in entry:
            args = dict(a[2:].split("=", 1) for a in saving.recipe_flags(entry["recipe"])
                        if a.startswith("--") and "=" in a and not a.startswith("--config="))
            config = registry.parse_overrides([a[len("--config="):] for a in saving.recipe_flags(
                entry["recipe"]) if a.startswith("--config=")])
            entry.setdefault("model", args["model"])
            entry.setdefault("preset", args.get("preset", "default"))
            entry.setdefault("batch_size", int(args.get("batch_size", 64)))
            entry["overrides"] = {**config, **entry.get("overrides", {})}
        registry.get_spec(entry["model"])  # an unknown name fails before anything is measured
        targets.append(entry)
    return targets


def run_benchmarks(sections=SECTIONS, models=None, *, batch_size: int = 128, steps: int = 50,
                   repeats: int = 3, tune_for_steps: int = 1000, serving_model: str = "cnn_classifier",
                   scaling_model: str = "cnn_classifier", served_source: str = "cnn_digits",
                   suite_file: str = "", only=(),
                   previous: dict | None = None) -> dict:
    """Training throughput and inference timing of ``models`` (default: every registered model), the
    served-path latency of ``serving_model``, the served precisions of the trained model ``served_source``
    (a workdir, saved model or preset) and the multi-worker scaling of ``scaling_model``.

    ``suite_file``: the training section measures its entries (real shapes, recipes, grids, goals)
    instead; ``only``: just the entries with these labels, the others kept from ``previous`` (an earlier
    results.json), so a long suite can run in parts that each hold the CPU for a few minutes."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise UserError(f"unknown benchmark sections {unknown}; sections: {', '.join(SECTIONS)}")
    models = list(models or registry.list_models())
    for name in models + [serving_model, scaling_model]:
        registry.get_spec(name)  # an unknown name fails before anything is measured
    results = {**(previous or {}), "machine": machine()}
    if "training" in sections and suite_file:
        kept = {e.get("label", e["model"]): e for e in results.get("training", [])}
        for target in load_targets(suite_file):
            label = target.get("label", target["model"])
            if only and label not in only:
                continue
            logging.info("Benchmarking training of %s", label)
            kept[label] = training.benchmark_training(
                target["model"], preset=target.get("preset", "default"),
                batch_size=target.get("batch_size", batch_size), steps=target.get("steps", steps),
                repeats=target.get("repeats", repeats), tune_for_steps=target.get("tune_for_steps",
                                                                                  tune_for_steps),
                overrides=target.get("overrides"), label=label,
                per_call_options=tuple(target.get("steps_per_call", (1, 10))),
                jit_options=tuple(target.get("jit_compile", (False, True))),
                include_eager=target.get("eager", False), goals=target.get("goals"))
            kept[label]["suite_entry"] = target
        order = [t.get("label", t["model"]) for t in load_targets(suite_file)]
        results["training"] = sorted(kept.values(), key=lambda e: order.index(e.get("label"))
                                     if e.get("label") in order else len(order))
    elif "training" in sections:
        results["training"] = []
        for name in models:
            logging.info("Benchmarking training of %s", name)
            results["training"].append(training.benchmark_training(
                name, batch_size=batch_size, steps=steps, repeats=repeats, tune_for_steps=tune_for_steps))
    if "inference" in sections:
        results["inference_steps"] = inference.inference_step_times(models)
    if "serving" in sections:
        results["serving"] = serving.served_latency_report(serving_model)
    if "served_precision" in sections:
        results["served_precision"] = serving.served_precision_report(served_source)
    if "scaling" in sections:
        results["scaling"] = scaling.scaling_report(scaling_model)
    return results

"""Per-step inference time of every family that registers an ``inference_timer`` hook: a CNN's layers,
an LM's tokens, a looped reasoner's iterations -- what a "step" is, the family says."""

from __future__ import annotations

from tfmstep import registry
from tfmstep.benchmark.training import fresh_model


def inference_step_times(models=None, preset: str = "default") -> dict:
    """``{name: rows}``: each family's ``inference_timer(model, config)`` on a fresh model of ``preset``.
    ``models``: names to time (default: every registered family with the hook)."""
    specs = [registry.get_spec(name) for name in (models or registry.list_models())]
    times = {}
    for spec in specs:
        if spec.inference_timer is not None:
            config = spec.config(preset)
            times[spec.name] = spec.inference_timer(fresh_model(spec, config), config)
    return times

"""One registry of model families: a builder, its config dataclass, presets, loss and data.

A family registers itself with ``@register(...)`` on its builder. Everything else -- ``tfmstep.build``,
the trainer, the export module, the tests -- looks models up here, so a new model is usable (and tested)
by being registered.

Families are found through the ``tfmstep.families`` entry-point group (setup.cfg lists the built-in
ones; another installed package can add its own the same way). They are imported on the first lookup, so
this module imports no family and a family importing ``register`` from here never meets a half-made module.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import types
import typing
from typing import Any, Callable, Mapping

from tfmstep.errors import UserError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the rest of the package needs to know about one model family.

    build:    config -> keras.Model (ordinary Keras model; ``model.fit`` works too).
    loss:     (labels, outputs) -> (per_example_loss [B], {metric: per_example_value [B]}).
              Per-example values let the shared step scale correctly across replicas.
    dataset:  (config, split, batch_size, seed, start_batch) -> tf.data.Dataset of (inputs, labels).
              The "train" split is infinite and batch k depends only on (seed, k): that is what makes
              resume exact. Other splits are finite and ordered.
    """

    name: str
    config_class: type
    build: Callable[[Any], Any]
    loss: Callable[[Any, Any], tuple]
    dataset: Callable[..., Any]
    presets: Mapping[str, Mapping[str, Any]]
    description: str = ""
    # jit_compile on CPU when the trainer does not measure (short or multi-process runs; see autotune)
    xla_on_cpu: bool = True
    # Whether mixed_precision=auto may train the family in a low precision (bf16/fp16) when it is faster
    # and its short loss check passes: False where a measured full run lost accuracy that check misses
    auto_low_precision: bool = True
    # Optional hooks a family fills in beside its builder; generic modules read these instead of
    # naming families (None: the generic behaviour, or "not supported" where there is none).
    # servable(name, model, config) -> tfmstep.export.signatures.Servable  (serving signatures, TF-Lite fn)
    servable: Callable | None = None
    # evaluate(runs, labels, output_dir, name, **options) -> report dict; runs are saving.load_trained
    # tuples (model, config, spec) with their workdirs: [(workdir, (model, config, spec)), ...]
    evaluate: Callable | None = None
    # inference_timer(model, config, *, repeats=...) -> rows of per-step inference timings (benchmark):
    # [{"step": label, **tfmstep.benchmark.timing.percentile_summary(seconds), "share": of one run}, ...];
    # model is a freshly initialised build of config. None: the family has no inference section.
    inference_timer: Callable | None = None
    # forward_flops(config) -> FLOPs of one forward pass of one training example (benchmark MFU);
    # None: counted by TF's graph profiler (which does not look inside while loops)
    forward_flops: Callable | None = None
    # validate_data(config) -> None: the data the config would train on, checked against it before
    # anything is written (label range vs classes, empty splits, shapes, ids vs vocabulary); one UserError
    validate_data: Callable | None = None
    # headline(config, eval_metrics) -> {name: value}: the family's headline numbers (summary, metrics.json,
    # model cards), e.g. bits per byte for a language model; None: the eval metrics themselves
    headline: Callable | None = None
    # generate(model, config, prompt, *, decoder, max_new_tokens, temperature, top_k, top_p, seed,
    # beam_width, length_penalty) -> (text, log-probability in nats): a family that continues text
    # (tfmstep-generate); one UserError for a bad option
    generate: Callable | None = None
    # token_corpus(config) -> tfmstep.data.text.TokenizedCorpus (train/validation token arrays, validation
    # bytes, tokenizer): a family whose data is one token sequence; the n-gram baseline (tfmstep-ngram)
    token_corpus: Callable | None = None
    # Config fields naming files the trained model needs (a vocabulary): copied into a saved model
    # (tfmstep.save) and pointed at from its config
    assets: tuple = ()
    # Config fields that change only how a trained model runs, not its weights (a halting rule, a loop
    # cap): what tfmstep-evaluate --config may override
    inference_fields: tuple = ()

    def config(self, preset: str = "default", **overrides: Any):
        """The family's config dataclass with ``preset`` applied, then ``overrides``."""
        if preset not in self.presets:
            raise UserError(f"unknown preset {preset!r} for model {self.name!r}; "
                            f"presets: {', '.join(sorted(self.presets))}")
        config = _apply_overrides(self.config_class(), self.presets[preset], f"preset {preset!r}")
        return _apply_overrides(config, overrides, f"model {self.name!r}")

    def inference_config(self, config, overrides: Mapping[str, Any]):
        """A trained model's ``config`` with ``overrides`` of its ``inference_fields`` only (one UserError
        naming a field that would change what the weights mean)."""
        fixed = sorted(set(overrides) - set(self.inference_fields))
        if fixed:
            allowed = ", ".join(self.inference_fields) or "none"
            raise UserError(f"--config={fixed[0]} cannot change at evaluation (the model was trained with it); "
                            f"fields {self.name!r} lets evaluation override: {allowed}")
        return _apply_overrides(config, overrides, f"model {self.name!r}")

    def headline_numbers(self, config, eval_metrics: dict) -> dict:
        """The family's headline numbers (its ``headline`` hook: bits/byte for the LM) else its eval
        metrics without the loss."""
        if self.headline is not None:
            return dict(self.headline(config, eval_metrics))
        return {k: v for k, v in eval_metrics.items() if k != "loss"} or dict(eval_metrics)


_REGISTRY: dict[str, ModelSpec] = {}
ENTRY_POINT_GROUP = "tfmstep.families"
_families_loaded = False


def _load_families() -> None:
    """Import every module of the ``tfmstep.families`` entry points once (each registers its family)."""
    global _families_loaded
    if _families_loaded:
        return
    _families_loaded = True  # first: a family module that looks a spec up while importing must not recurse
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()


def register(name: str, *, config_class: type, loss: Callable, dataset: Callable,
             presets: Mapping[str, Mapping[str, Any]] | None = None,
             xla_on_cpu: bool = True, **hooks: Callable) -> Callable:
    """Decorator: ``@register("cnn_classifier", config_class=..., loss=..., dataset=...)`` on a builder."""
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"config_class for {name!r} must be a dataclass")
    hook_names = {f.name for f in dataclasses.fields(ModelSpec)} - {
        "name", "config_class", "build", "loss", "dataset", "presets", "description", "xla_on_cpu"}
    unknown = set(hooks) - hook_names
    if unknown:
        raise TypeError(f"unknown hooks {sorted(unknown)} for {name!r}; hooks: {sorted(hook_names)}")

    def decorate(build_fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        presets_ = dict(presets or {})
        presets_.setdefault("default", {})
        for preset_name, values in presets_.items():  # presets are checked once, at import
            _apply_overrides(config_class(), values, f"preset {name}/{preset_name}")
        doc = (build_fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelSpec(name, config_class, build_fn, loss, dataset, presets_,
                                    doc[0] if doc else "", xla_on_cpu, **hooks)
        return build_fn

    return decorate


def list_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    _load_families()
    if name not in _REGISTRY:
        if not _REGISTRY:
            raise UserError(f"unknown model {name!r}: no model family is registered (no "
                            f"{ENTRY_POINT_GROUP!r} entry points: install tfmstep with pip)")
        raise UserError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def resolve(model: "str | ModelSpec") -> ModelSpec:
    """A ModelSpec handed on by a caller that already resolved it, or a registered name looked up."""
    return model if isinstance(model, ModelSpec) else get_spec(model)


def spec_of(config_class: type) -> ModelSpec:
    """The family whose config dataclass is ``config_class`` (a family's own tools find their spec from
    the class they import, not by a name string)."""
    _load_families()
    for spec in _REGISTRY.values():
        if spec.config_class is config_class:
            return spec
    raise UserError(f"no registered model has the config {config_class.__name__}")


def get_config(name: str, preset: str = "default", **overrides: Any):
    """The config dataclass of ``name`` with ``preset`` applied, then ``overrides``."""
    return get_spec(name).config(preset, **overrides)


def build(name: str, preset: str = "default", **overrides: Any):
    """Build registered model ``name`` (a ``keras.Model``) from its preset and overrides."""
    spec = get_spec(name)
    return spec.build(spec.config(preset, **overrides))


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["depth=3", "dropout=0.1"]`` -> ``{"depth": "3", "dropout": "0.1"}`` (values coerced later)."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"bad --config value {item!r}: expected key=value")
        overrides[key.strip()] = value.strip()
    return overrides


def _apply_overrides(config, overrides: Mapping[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    values = {}
    for key, value in overrides.items():
        if key not in fields:
            raise UserError(f"unknown config field {key!r} for {where}; valid fields: "
                            f"{', '.join(sorted(fields))}")
        values[key] = _coerce(value, hints[key], key, where)
    return dataclasses.replace(config, **values)


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check (and, for strings from the command line, parse) one override against its field type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    if origin is tuple:
        elem = args[0] if args else str
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"bad value {value!r} for {key!r} in {where}: expected a tuple of "
                            f"{elem.__name__}")
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, elem, key, where) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"bad value {value!r} for {key!r} in {where}: expected true/false")
    if hint in (int, float):
        if isinstance(value, bool):
            raise UserError(f"bad value {value!r} for {key!r} in {where}: expected {hint.__name__}")
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            converted = hint(value)
        except (TypeError, ValueError):
            raise UserError(f"bad value {value!r} for {key!r} in {where}: expected "
                            f"{hint.__name__}") from None
        return converted
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"bad value {value!r} for {key!r} in {where}: expected str")
        return value
    return value


"""Trained models on disk: ``save``/``load`` a model with its config, assets and card, and the shipped presets.

A saved model ("preset") is a directory::

  preset.json        format, the registered model name, the whole config (every field), the card's facts
                     (data, recipe, command, measured metrics, parameters, license, limits) and the
                     fingerprint of the evaluation data the metrics were measured on
  model.weights.h5   the weights (``model.save_weights``); the model is rebuilt by its registered builder
  assets/            files the config names that the model needs after training (the family's ``assets``
                     config fields, e.g. the LM's SentencePiece vocabulary); the config points at them
  README.md          the model card, written from preset.json

Shipped presets live in ``tfmstep/pretrained/<name>/`` (package data), one per recipe in
``tfmstep/recipes/`` that has been trained; ``list_presets()`` says which recipes have weights.
``load`` also takes a training workdir (``config.json`` + ``checkpoints/``): a user's own run loads like a
preset, and ``save(workdir_or_model, directory)`` turns it into one.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from typing import Any, Optional

from tfmstep.errors import UserError  # registry (and so TensorFlow) is imported when a model is touched:
# the recipe functions here serve tfmstep-train before it checks its flags

FORMAT = "tfmstep-preset"
FORMAT_VERSION = 1
PRESET_FILE = "preset.json"
WEIGHTS_FILE = "model.weights.h5"
CARD_FILE = "README.md"
ASSETS_DIR = "assets"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
PRETRAINED_DIR = os.path.join(PACKAGE_DIR, "pretrained")
RECIPES_DIR = os.path.join(PACKAGE_DIR, "recipes")
EVAL_BATCH_SIZE = 64
CARD_KEYS = ("summary", "data", "license", "limits", "recipe", "command")


@dataclasses.dataclass
class PresetInfo:
    """What ``load``/``from_preset`` attach to the model as ``model.preset_info``."""

    model: str  # registered family
    config: Any  # the family's config dataclass (asset paths point into ``directory``)
    directory: str
    card: dict  # preset.json (metrics, data, recipe, ...); for a workdir, its config.json and metrics.json

    @property
    def spec(self):
        from tfmstep import registry

        return registry.get_spec(self.model)


# --- recipes ----------------------------------------------------------------------------------------------

def list_recipes() -> list[str]:
    """Names of the shipped recipes (``tfmstep-train --recipe=<name>``); includes are not recipes."""
    if not os.path.isdir(RECIPES_DIR):
        return []
    return sorted(name[:-len(".flags")] for name in os.listdir(RECIPES_DIR)
                  if name.endswith(".flags") and "# Command:" in _read(os.path.join(RECIPES_DIR, name)))


def recipe_path(name: str) -> str:
    path = os.path.join(RECIPES_DIR, os.path.basename(name) + ("" if name.endswith(".flags") else ".flags"))
    if not os.path.isfile(path):
        raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(list_recipes()) or 'none installed'}")
    return path


def recipe_flags(name: str) -> list[str]:
    """The recipe's flags, its ``--flagfile=`` includes expanded: an include names another recipe file by
    its file name (``--flagfile=models/chain_base.flags`` is ``chain_base.flags`` beside it), so a recipe
    runs from any directory, also from an installed package."""
    return _expand(recipe_path(name), set())


def _expand(path: str, seen: set) -> list[str]:
    if path in seen:
        raise UserError(f"recipe {path} includes itself")
    seen = seen | {path}
    args = []
    for line in _read(path).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--flagfile="):
            args += _expand(recipe_path(line[len("--flagfile="):]), seen)
        else:
            args.append(line)
    return args


def _recipe_model(name: str) -> str:
    models = [a.split("=", 1)[1] for a in recipe_flags(name) if a.startswith("--model=")]
    return models[-1] if models else ""


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


# --- loading ----------------------------------------------------------------------------------------------

def list_presets() -> list[dict]:
    """Every shipped recipe and whether trained weights ship for it: ``[{"name", "model", "weights",
    "metrics"}, ...]`` (``metrics``: the card's headline numbers; empty without weights)."""
    names = set(list_recipes())
    if os.path.isdir(PRETRAINED_DIR):
        names |= {n for n in os.listdir(PRETRAINED_DIR) if _is_saved(os.path.join(PRETRAINED_DIR, n))}
    rows = []
    for name in sorted(names):
        directory = os.path.join(PRETRAINED_DIR, name)
        if _is_saved(directory):
            card = _read_preset(directory)
            rows.append({"name": name, "model": card["model"], "weights": True,
                         "metrics": card.get("headline") or card.get("eval", {})})
        else:
            rows.append({"name": name, "model": _recipe_model(name), "weights": False, "metrics": {}})
    return rows


def preset_dir(name: str) -> str:
    directory = os.path.join(PRETRAINED_DIR, name)
    if not _is_saved(directory):
        rows = list_presets()
        with_weights = [r["name"] for r in rows if r["weights"]]
        known = {r["name"] for r in rows}
        why = ("it is a recipe without shipped weights: train it with tfmstep-train --recipe="
               f"{name} --workdir=<dir>, then tfmstep.load(<dir>)") if name in known else "no such preset"
        raise UserError(f"cannot load preset {name!r}: {why}; presets with weights: "
                        f"{', '.join(with_weights) or 'none'}")
    return directory


def from_preset(name: str):
    """The shipped trained model ``name`` (see ``list_presets()``): a ready ``keras.Model`` with
    ``model.preset_info`` (config, card, directory)."""
    return load(preset_dir(name))


def build(name: str, preset: str = "default", weights: bool = False, **overrides):
    """``tfmstep.build``: the registered model ``name`` from a config preset and overrides; with
    ``weights=True``, ``preset`` names a shipped trained preset of that model (``from_preset``)."""
    from tfmstep import registry

    if not weights:
        return registry.build(name, preset, **overrides)
    if overrides:
        raise UserError(f"overrides {sorted(overrides)} cannot change a trained preset; build without "
                        f"weights=True to change the config")
    model = from_preset(preset)
    if model.preset_info.model != name:
        raise UserError(f"preset {preset!r} is a {model.preset_info.model} model, not {name}")
    return model


def load(path: str, restore_from: str = ""):
    """A trained model from a saved directory (``save``/a shipped preset), a training workdir, or the
    name of a shipped preset; ``model.preset_info`` carries its config and card."""
    model, config, spec, card, directory = load_parts(path, restore_from)
    model.preset_info = PresetInfo(spec.name, config, directory, card)
    return model


def load_trained(path: str, restore_from: str = ""):
    """(model, config, spec) of a saved model, a training workdir (its latest checkpoint, or
    ``restore_from``) or a shipped preset's name: what every tool that takes a workdir reads."""
    return load_parts(path, restore_from)[:3]


def load_parts(path: str, restore_from: str = ""):
    """(model, config, spec, card, directory) of ``path`` (see ``load``)."""
    from tfmstep import registry

    if not os.path.exists(path) and os.sep not in path and (
            os.path.isdir(os.path.join(PRETRAINED_DIR, path)) or path in list_recipes()):
        path = preset_dir(path)  # a shipped preset's name (a recipe without weights: says so)
    if _is_saved(path):
        if restore_from:
            raise UserError(f"{path} is a saved model with one set of weights; restore_from applies to "
                            f"training workdirs only")
        card = _read_preset(path)
        spec = registry.get_spec(card["model"])
        config = _config_from_record(card, path)
        model = spec.build(config)
        try:
            model.load_weights(os.path.join(path, WEIGHTS_FILE))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the weights in {os.path.join(path, WEIGHTS_FILE)}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return model, config, spec, card, path
    if os.path.isfile(os.path.join(path, "config.json")):
        from tfmstep import trainer

        model, config, spec = trainer.restore(path, restore_from)
        return model, config, spec, _workdir_card(path), path
    presets = ", ".join(r["name"] for r in list_presets() if r["weights"])
    raise UserError(f"{path} is neither a saved model ({PRESET_FILE}) nor a training workdir (config.json) "
                    f"nor a shipped preset ({presets or 'none shipped'})")


def is_saved(path: str) -> bool:
    """Whether ``path`` is a saved model directory (not a training workdir)."""
    return _is_saved(path)


def _is_saved(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PRESET_FILE))


def _read_preset(directory: str) -> dict:
    path = os.path.join(directory, PRESET_FILE)
    try:
        card = json.loads(_read(path))
        if card.get("format") != FORMAT or "model" not in card or "config" not in card:
            raise ValueError(f"not a {FORMAT} file")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if card.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has format version {card['format_version']}; this tfmstep reads "
                        f"<= {FORMAT_VERSION}: upgrade tfmstep")
    return card


def _config_from_record(card: dict, directory: str):
    """The config of a saved model; asset fields point at the copies in ``directory``."""
    from tfmstep import registry

    values = dict(card["config"])
    spec = registry.get_spec(card["model"])
    for field in spec.assets:
        if values.get(field):
            values[field] = os.path.join(directory, values[field])
    known = {f.name for f in dataclasses.fields(spec.config_class)}
    return registry.get_config(card["model"], "default", **{k: v for k, v in values.items() if k in known})


def _workdir_card(workdir: str) -> dict:
    card = {}
    for name, key in (("config.json", "run"), ("metrics.json", "metrics")):
        try:
            card[key] = json.loads(_read(os.path.join(workdir, name)))
        except (OSError, ValueError):
            pass
    return card


# --- evaluating -------------------------------------------------------------------------------------------

def evaluate(model, batch_size: int = EVAL_BATCH_SIZE, max_batches: int = 0) -> dict:
    """The model's metrics on its config's whole evaluation split, through the shared step's eval:
    ``{"eval": {loss, metric...}, "headline": {...}, "data_fingerprint": sha256 of every eval batch}``.
    A fingerprint different from the card's means the data differs (e.g. another Python's stdlib)."""
    import numpy as np
    import tensorflow as tf

    from tfmstep import step as step_lib

    started = time.perf_counter()
    info = _info(model)
    spec = info.spec
    steps = step_lib.make_steps(model, None, spec.loss, global_batch_size=batch_size)
    digest = hashlib.sha256()
    examples = [0]
    dataset = spec.dataset(info.config, "validation", batch_size, 0)

    def batch_sums():  # the eval step's sums per batch, fingerprinting each batch on the way
        for batch in dataset:
            for tensor in tf.nest.flatten(batch):
                array = np.ascontiguousarray(tensor.numpy())
                digest.update(str((array.dtype.str, array.shape)).encode())
                digest.update(array.tobytes())
            sums = steps.eval(batch)
            examples[0] += int(sums["count"])
            yield sums

    metrics = step_lib.mean_metrics(batch_sums(), max_batches)  # the one evaluation loop
    return {"eval": metrics, "headline": spec.headline_numbers(info.config, metrics),
            "examples": examples[0], "data_fingerprint": digest.hexdigest(),
            "eval_seconds": round(time.perf_counter() - started, 1)}


def _info(model) -> PresetInfo:
    info = getattr(model, "preset_info", None)
    if info is None:
        raise UserError("this model carries no config (model.preset_info): load it with tfmstep.load / "
                        "tfmstep.from_preset, or pass config= to tfmstep.save")
    return info


# --- saving -----------------------------------------------------------------------------------------------

def save(model, directory: str, *, config=None, overwrite: bool = False, evaluate_metrics: bool = True,
         **card: str) -> str:
    """Write ``model`` (a ``keras.Model`` from ``load``/``from_preset``, or any registered model with its
    ``config=`` dataclass, or the path of a training workdir) to ``directory`` as a saved model: the
    format a shipped preset has, loaded by ``load``. Returns ``directory``.

    ``evaluate_metrics``: measure the metrics on the whole evaluation split and put them on the card.
    ``card``: the card's text fields -- summary, data, license, limits, recipe, command (a workdir's
    command is derived from its config.json when not given).
    """
    from tfmstep import registry

    unknown = set(card) - set(CARD_KEYS)
    if unknown:
        raise UserError(f"unknown card fields {sorted(unknown)}; card fields: {', '.join(CARD_KEYS)}")
    if isinstance(model, (str, os.PathLike)):
        model = load(os.fspath(model))
    if config is not None:
        model.preset_info = PresetInfo(registry.spec_of(type(config)).name, config, "", {})
    info = _info(model)
    spec = info.spec
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise UserError(f"{directory} exists; pass overwrite=True to replace it")
    record = _card_record(model, info, card)
    if evaluate_metrics:
        record.update(evaluate(model))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.")
    try:  # built aside, then renamed into place: a reader never sees half a saved model
        values = _config_values(info.config)
        for field in spec.assets:
            source = values.get(field)
            if source:
                if not os.path.isfile(source):
                    raise UserError(f"config field {field}={source!r} names no file: nothing to save")
                os.makedirs(os.path.join(staging, ASSETS_DIR), exist_ok=True)
                values[field] = os.path.join(ASSETS_DIR, os.path.basename(source))
                shutil.copyfile(source, os.path.join(staging, values[field]))
        record["config"] = values
        model.save_weights(os.path.join(staging, WEIGHTS_FILE))
        with open(os.path.join(staging, PRESET_FILE), "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        with open(os.path.join(staging, CARD_FILE), "w") as f:
            f.write(model_card(record, os.path.basename(directory)))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide an installed preset from other users
        old = None
        if os.path.exists(directory):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.old.")
            os.rmdir(old)
            os.replace(directory, old)
        os.replace(staging, directory)
        staging = None
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise UserError(f"cannot save to {directory}: {e.strerror or e}") from None
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _config_values(config) -> dict:
    """Every config field as JSON values; a config that fills fields from its data (``resolved()``) is
    saved resolved, so loading needs no data."""
    resolved = getattr(config, "resolved", None)
    if callable(resolved):
        config = resolved()
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _card_record(model, info: PresetInfo, card: dict) -> dict:
    import keras
    import tensorflow as tf

    import tfmstep

    run = info.card.get("run") or {}
    metrics = info.card.get("metrics") or {}
    previous = {k: info.card[k] for k in CARD_KEYS if info.card.get(k)}  # re-saving a saved model
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": info.model,
              **previous, **{k: v for k, v in card.items() if v}}
    if run and "command" not in record:
        record["command"] = _command_of(run)
    record["parameters"] = int(model.count_params())
    training = {k: metrics[k] for k in ("step", "train_seconds_this_run", "step_settings", "dataset")
                if k in metrics}
    if run.get("train"):
        training["train_config"] = run["train"]
    if training:
        record["training"] = training
    elif info.card.get("training"):
        record["training"] = info.card["training"]
    record["saved_with"] = {"tfmstep": tfmstep.__version__, "tensorflow": tf.__version__,
                            "keras": keras.__version__, "python": platform.python_version(),
                            "date": datetime.date.today().isoformat()}
    return record


def _command_of(run: dict) -> str:
    """The tfmstep-train command of a workdir's config.json."""
    args = [f"--model={run['model']}", f"--preset={run.get('preset', 'default')}"]
    args += [f"--config={k}={v}" for k, v in sorted((run.get("overrides") or {}).items())]
    from tfmstep.train_config import TrainConfig

    defaults = dataclasses.asdict(TrainConfig())
    for key, value in sorted((run.get("train") or {}).items()):
        if defaults.get(key, object()) != value and value is not None:
            args.append(f"--{key}={str(value).lower() if isinstance(value, bool) else value}")
    return "tfmstep-train " + " ".join(args) + " --workdir=<dir>"


def _format_metrics(values: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def model_card(record: dict, name: str) -> str:
    """The README.md of a saved model, from its preset.json."""
    lines = [f"# {name}", ""]
    if record.get("summary"):
        lines += [record["summary"], ""]
    facts = [("model", f"`{record['model']}` ({record['parameters']:,} parameters)")]
    for key in ("data", "recipe", "command"):
        if record.get(key):
            facts.append((key, f"`{record[key]}`" if key in ("recipe", "command") else record[key]))
    if record.get("headline"):
        facts.append(("measured", f"{_format_metrics(record['headline'])} on the whole evaluation split "
                                  f"({record.get('examples', '?')} examples)"))
    if record.get("eval"):
        facts.append(("all eval metrics", _format_metrics(record["eval"])))
    training = record.get("training") or {}
    if training.get("step"):
        seconds = training.get("train_seconds_this_run")
        facts.append(("training", f"{training['step']} steps" + (f", {seconds:.0f} s (last run)" if seconds else "")))
    for key in ("license", "limits"):
        if record.get(key):
            facts.append((key, record[key]))
    saved = record.get("saved_with") or {}
    if saved:
        facts.append(("saved with", ", ".join(f"{k} {v}" for k, v in saved.items())))
    lines += [f"- **{key}**: {value}" for key, value in facts]
    lines += ["", "```python", "import tfmstep", "",
              f"model = tfmstep.load(\"<this directory>\")  # or tfmstep.from_preset(\"{name}\") when shipped",
              "model.preset_info.config  # the config; model.preset_info.card: preset.json", "```", "",
              f"Files: `{PRESET_FILE}` (config, metrics, this card's facts), `{WEIGHTS_FILE}`"
              + (f", `{ASSETS_DIR}/`" if any(str(v).startswith(ASSETS_DIR + "/")
                                              for v in record.get("config", {}).values()) else "") + ".",
              "", "The metrics are reproduced by `tests/test_presets.py` (same weights, same evaluation "
                  "split; the data fingerprint in preset.json says whether the data is the same).", ""]
    return "\n".join(lines)

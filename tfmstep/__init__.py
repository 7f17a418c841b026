"""tfmstep: a TensorFlow/Keras model zoo whose models all train through one shared XLA step.

  tfmstep.list_models()                      registered families
  tfmstep.build(name, preset="tiny")         an untrained keras.Model from a config preset
  tfmstep.list_presets()                     shipped recipes and which have trained weights
  tfmstep.from_preset("cnn_digits")          a trained keras.Model (= build(name, preset=..., weights=True))
  tfmstep.load(dir) / tfmstep.save(model, dir)   a saved model or a training workdir, with config and card

The names are imported on first use, so ``import tfmstep`` (and a command-line tool checking its flags)
does not import TensorFlow; the registry imports the families (``tfmstep.families`` entry points) on first lookup.
"""

import importlib

__version__ = "0.1.0"

from tfmstep.errors import UserError  # noqa: E402  (no TensorFlow)

_NAMES = {
    "build": "tfmstep.saving", "evaluate": "tfmstep.saving", "from_preset": "tfmstep.saving",
    "list_presets": "tfmstep.saving", "list_recipes": "tfmstep.saving", "load": "tfmstep.saving",
    "save": "tfmstep.saving",
    "get_config": "tfmstep.registry", "get_spec": "tfmstep.registry", "list_models": "tfmstep.registry",
    "register": "tfmstep.registry", "keras_loss": "tfmstep.losses",
}

__all__ = sorted(_NAMES) + ["UserError"]


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    else:  # a submodule: tfmstep.trainer, tfmstep.models, ...
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_NAMES))

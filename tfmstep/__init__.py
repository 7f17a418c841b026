"""tfmstep: a TensorFlow/Keras model zoo whose models all train through one shared XLA step."""

__version__ = "0.1.0"

from tfmstep.errors import UserError  # noqa: E402
from tfmstep.registry import build, get_config, get_spec, list_models, register  # noqa: E402

# Registers the built-in families. Here, not in the registry: the registry imports no family, so the
# families can import it without a circle (Python runs this file before any tfmstep.<module>).
from tfmstep import models  # noqa: E402,F401

__all__ = ["build", "get_config", "get_spec", "list_models", "register", "UserError"]

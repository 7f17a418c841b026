"""tfmstep: a TensorFlow/Keras model zoo whose models all train through one shared XLA step."""

from tfmstep.errors import UserError
from tfmstep.registry import build, get_config, get_spec, list_models, register

__all__ = ["build", "get_config", "get_spec", "list_models", "register", "UserError"]
__version__ = "0.1.0"

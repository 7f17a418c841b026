"""Model families. Importing this package registers every built-in family."""

from tfmstep.models import cnn_classifier  # noqa: F401

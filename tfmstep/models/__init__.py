"""Model families. Importing this package registers every built-in family."""

from tfmstep.models import cnn_classifier, lstm_lm  # noqa: F401
from tfmstep.models import chain_transformer  # noqa: F401

"""A registered family's loss as a Keras loss, for ``model.compile(...); model.fit(...)``:

  model.compile(optimizer="adam", loss=tfmstep.keras_loss("cnn_classifier"))

The family's loss returns per-example values (the shared step scales them across replicas); Keras reduces
them to the batch mean. A family whose model defines ``compute_loss`` itself (the chain reasoner) needs no
loss argument. Registered as serialisable, so a compiled model saved as ``.keras`` loads with its loss.
"""

import keras

from tfmstep import registry


@keras.saving.register_keras_serializable("tfmstep")
class FamilyLoss(keras.losses.Loss):
    def __init__(self, model_name: str, name=None, reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name or f"{model_name}_loss", reduction=reduction, dtype=dtype)
        self.model_name = model_name
        self._loss = registry.get_spec(model_name).loss

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Labels keep their dtype (class ids; token ids with -1 for unscored context): Keras' Loss.__call__
        # would cast them to float first. The reduction is the batch mean, as in the shared step.
        losses = keras.ops.cast(self.call(y_true, y_pred), "float32")
        if sample_weight is not None:
            losses = losses * keras.ops.cast(sample_weight, "float32")
        return keras.ops.mean(losses)

    def call(self, y_true, y_pred):
        return self._loss(y_true, y_pred)[0]

    def get_config(self):
        return {**super().get_config(), "model_name": self.model_name}


def keras_loss(model_name: str) -> FamilyLoss:
    """The loss of registered model ``model_name`` as a ``keras.losses.Loss``."""
    return FamilyLoss(model_name)

"""Every registered model (tiny preset; the LM also with tied weights) follows the Keras conventions:
``get_config``/``from_config``, ``model.save("x.keras")`` + ``keras.saving.load_model`` (custom objects
registered as serialisable, no ``custom_objects=`` needed), ``model.fit`` with the registry's loss
(``tfmstep.keras_loss``) lowering the loss, and ``model.export()`` to a SavedModel that answers like Keras.
A new family is covered by being registered."""

import numpy as np
import keras
import pytest
import tensorflow as tf

import tfmstep
from tfmstep import registry

CASES = [(name, {}) for name in tfmstep.list_models()] + [("lstm_lm", {"tie_weights": True})]
IDS = [name + "".join(f"-{k}" for k in overrides) for name, overrides in CASES]


def _model_and_batch(name, overrides, batch_size=8):
    keras.utils.set_random_seed(0)
    spec = registry.get_spec(name)
    config = tfmstep.get_config(name, "tiny", **overrides)
    model = spec.build(config)
    batch = next(iter(spec.dataset(config, "train", batch_size, 0)))
    return model, batch


def _compile(model, name, learning_rate=1e-2):
    own_loss = type(model).compute_loss is not keras.Model.compute_loss  # the model computes its loss
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=None if own_loss else tfmstep.keras_loss(name), jit_compile=False)


def _flat(outputs):
    return [np.asarray(tf.cast(t, tf.float32)) for t in tf.nest.flatten(outputs)]


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_get_config_from_config_and_keras_file_round_trip(name, overrides, tmp_path):
    model, (inputs, _) = _model_and_batch(name, overrides)
    clone = type(model).from_config(model.get_config())
    clone(inputs, training=False)  # a subclassed model builds on its first call
    assert clone.count_params() == model.count_params()
    _compile(model, name)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for a, b in zip(_flat(model(inputs, training=False)), _flat(loaded(inputs, training=False))):
        np.testing.assert_array_equal(a, b)


def _fit_cases():
    """The chain reasoner's fit traces its looped training graph (~20 s); its default-run fit test is
    tests/test_chain_transformer.py, so here it runs with the slow tests."""
    return [pytest.param(name, overrides, id=case_id,
                         marks=[pytest.mark.slow] if name == "chain_transformer" else [])
            for (name, overrides), case_id in zip(CASES, IDS)]


@pytest.mark.parametrize("name,overrides", _fit_cases())
def test_model_fit_with_the_registry_loss_lowers_it(name, overrides):
    model, batch = _model_and_batch(name, overrides)
    _compile(model, name)
    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    losses = model.fit(dataset, epochs=3, steps_per_epoch=8, verbose=0).history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0], losses


def _export_and_compare(model, inputs, path, **kwargs):
    expected = model(inputs, training=False)
    model.export(path, verbose=False, **kwargs)
    served = tf.saved_model.load(path)
    for a, b in zip(_flat(expected), _flat(served.serve(inputs))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_model_export_without_arguments_answers_like_keras(name, overrides, tmp_path):
    model, (inputs, _) = _model_and_batch(name, overrides, batch_size=4)
    _export_and_compare(model, inputs, str(tmp_path / "exported"))


def test_chain_reasoner_export_takes_problems_of_any_length(tmp_path):
    model, (inputs, _) = _model_and_batch("chain_transformer", {}, batch_size=4)
    model.export(str(tmp_path / "exported"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "exported"))
    longer = tf.concat([tf.fill([4, 5], 20), tf.cast(inputs["tokens"], tf.int32)], axis=1)
    np.testing.assert_allclose(served.serve({"tokens": longer})["logits"],
                               model({"tokens": longer}, training=False)["logits"], rtol=1e-5, atol=1e-5)

"""Every registered model, on its tiny preset: builds, runs forward, keeps the data contract, and learns
through the shared step. A new family is covered here by being registered."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep import step as step_lib

MODELS = tfmstep.list_models()


def _first_batch(name, batch_size=8, **kwargs):
    spec = tfmstep.get_spec(name)
    config = tfmstep.get_config(name, "tiny")
    return next(iter(spec.dataset(config, "train", batch_size, **kwargs)))


@pytest.mark.parametrize("name", MODELS)
def test_model_builds_and_runs_forward_on_its_own_data(name):
    model = tfmstep.build(name, "tiny")
    inputs, labels = _first_batch(name)
    outputs = model(inputs, training=False)
    for value in tf.nest.flatten(outputs):
        assert np.isfinite(tf.cast(value, tf.float32).numpy()).all()
    per_example_loss, metrics = tfmstep.get_spec(name).loss(labels, outputs)
    assert per_example_loss.shape == (8,)
    assert all(v.shape == (8,) for v in metrics.values())


@pytest.mark.parametrize("name", MODELS)
def test_train_stream_batch_depends_only_on_seed_and_index(name):
    spec = tfmstep.get_spec(name)
    config = tfmstep.get_config(name, "tiny")
    from_start = list(spec.dataset(config, "train", 4, seed=3, start_batch=0).take(4))
    resumed = next(iter(spec.dataset(config, "train", 4, seed=3, start_batch=3)))
    other_seed = next(iter(spec.dataset(config, "train", 4, seed=4, start_batch=3)))
    for a, b in zip(tf.nest.flatten(from_start[3]), tf.nest.flatten(resumed)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert any(not np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(tf.nest.flatten(resumed), tf.nest.flatten(other_seed)))


@pytest.mark.parametrize("name", MODELS)
def test_loss_falls_on_a_fixed_batch_through_the_shared_xla_step(name):
    keras.utils.set_random_seed(0)
    spec = tfmstep.get_spec(name)
    model = tfmstep.build(name, "tiny")
    optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                                                 total_steps=10_000, weight_decay=0.0))
    optimizer.build(model.trainable_variables)
    steps = step_lib.make_steps(model, optimizer, spec.loss, global_batch_size=8, jit_compile=True)
    batch = _first_batch(name)
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    losses = steps.train(iterator, tf.constant(40))["loss"].numpy()
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.7 * losses[0], losses

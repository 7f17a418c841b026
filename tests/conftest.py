"""Test setup: two logical CPU devices (for MirroredStrategy tests) before TensorFlow initialises."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def repo_root():
    return REPO


@pytest.fixture
def isolated_registry(monkeypatch):
    """The registry, for one test: what the test registers is gone afterwards."""
    from tfmstep import registry

    registry.list_models()  # the installed families first, so the copy holds them
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry


@pytest.fixture(scope="session")
def exported_tiny(tmp_path_factory):
    """name -> (model, config, servable, version_dir, loaded): each registered model's tiny preset
    (seed 0) exported once per test session, shared by the export tests."""
    import keras

    import tfmstep
    from tfmstep.export import saved_model, signatures

    cache = {}

    def get(name):
        if name not in cache:
            keras.utils.set_random_seed(0)
            model, config = tfmstep.build(name, "tiny"), tfmstep.get_config(name, "tiny")
            servable = signatures.servable(name, model, config)
            base = str(tmp_path_factory.mktemp(f"export_{name}"))
            path = saved_model.export_saved_model(model, name, config, base, servable=servable)
            cache[name] = (model, config, servable, path, saved_model.load(path))
        return cache[name]

    return get

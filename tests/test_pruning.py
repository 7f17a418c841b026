"""Magnitude pruning with a polynomial schedule on Keras 3, through the shared step, then TF-Lite export."""

import gzip

import keras
import numpy as np
import pytest

import tfmstep
from tfmstep import pruning
from tfmstep.errors import UserError
from tfmstep.export import tflite

MODELS = tfmstep.list_models()


def test_polynomial_schedule_starts_at_initial_and_reaches_the_target():
    config = pruning.PruningConfig(target_sparsity=0.8, initial_sparsity=0.1, begin_step=10, end_step=110)
    assert pruning.polynomial_sparsity(0, config) == 0.0
    assert pruning.polynomial_sparsity(10, config) == pytest.approx(0.1)
    assert pruning.polynomial_sparsity(60, config) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5 ** 3)
    assert pruning.polynomial_sparsity(110, config) == pytest.approx(0.8)
    assert pruning.polynomial_sparsity(500, config) == pytest.approx(0.8)
    values = [pruning.polynomial_sparsity(t, config) for t in range(10, 111)]
    assert all(b >= a for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("name", MODELS)
def test_every_model_has_prunable_kernels(name):
    weights = pruning.prunable_weights(tfmstep.build(name, "tiny"))
    assert weights and all(len(w.shape) >= 2 for w in weights)


def test_fine_tuning_reaches_the_target_and_pruned_weights_stay_zero():
    keras.utils.set_random_seed(0)
    model, config = tfmstep.build("cnn_classifier", "tiny"), tfmstep.get_config("cnn_classifier", "tiny")
    schedule = pruning.PruningConfig(target_sparsity=0.6, end_step=20, frequency=5)
    result = pruning.fine_tune_with_pruning(model, "cnn_classifier", config, schedule, steps=30,
                                            batch_size=16, learning_rate=1e-2)
    weights = pruning.prunable_weights(model)
    for variable in weights:
        zeros = float((variable.numpy() == 0).mean())
        assert zeros == pytest.approx(0.6, abs=1.0 / np.prod(variable.shape) + 1e-6), variable.path
    assert result["sparsity"] == pytest.approx(0.6, abs=0.01)
    sparsities = [h["sparsity"] for h in result["history"]]
    assert sparsities[0] < sparsities[-1] and all(b >= a - 1e-9 for a, b in zip(sparsities, sparsities[1:]))
    assert np.isfinite(result["eval"]["loss"]) and 0.0 <= result["eval"]["accuracy"] <= 1.0


def test_masks_survive_optimizer_updates():
    keras.utils.set_random_seed(0)
    model = tfmstep.build("cnn_classifier", "tiny")
    pruner = pruning.MagnitudePruner(model)
    pruner.update(0.5)
    pruned = [v.numpy() == 0 for v in pruner.weights]
    for variable in pruner.weights:  # what an optimizer step does to every weight
        variable.assign(variable.numpy() + 0.1)
    pruner.apply()
    for variable, mask in zip(pruner.weights, pruned):
        assert (variable.numpy()[mask] == 0).all()
    pruner.update(0.25)  # a lower sparsity never un-prunes
    assert pruner.sparsity() >= 0.5 - 1e-6


def test_pruned_model_compresses_better_after_export():
    keras.utils.set_random_seed(0)
    name = "cnn_classifier"
    config = tfmstep.get_config(name, "tiny", filters=(32, 32))  # enough weights for gzip to see it
    dense = tfmstep.build(name, "tiny", filters=(32, 32))
    pruned = tfmstep.build(name, "tiny", filters=(32, 32))
    pruned.set_weights(dense.get_weights())
    pruning.MagnitudePruner(pruned).update(0.9)
    dense_file = tflite.convert(dense, name, config, "fp32")
    pruned_file = tflite.convert(pruned, name, config, "fp32")
    assert len(pruned_file) == len(dense_file)  # the same tensors...
    assert len(gzip.compress(pruned_file)) < 0.6 * len(gzip.compress(dense_file))  # ...mostly zeros


def test_bad_pruning_config_fails_with_one_line():
    with pytest.raises(UserError, match="target_sparsity < 1"):
        pruning.PruningConfig(target_sparsity=1.0)
    with pytest.raises(UserError, match="begin_step < end_step"):
        pruning.PruningConfig(begin_step=50, end_step=10)
    model, config = tfmstep.build("cnn_classifier", "tiny"), tfmstep.get_config("cnn_classifier", "tiny")
    with pytest.raises(UserError, match="must be >= the pruning end_step"):
        pruning.fine_tune_with_pruning(model, "cnn_classifier", config, pruning.PruningConfig(end_step=100),
                                       steps=10)


def test_sweep_hands_models_to_the_exporter(tmp_path):
    """pruning_sweep exports nothing; export.export_pruned writes and measures the models it hands back."""
    from tfmstep import export

    keras.utils.set_random_seed(0)
    model, config = tfmstep.build("cnn_classifier", "tiny"), tfmstep.get_config("cnn_classifier", "tiny")
    sweep = pruning.pruning_sweep(model, "cnn_classifier", config, [0.5], steps=3, batch_size=8)
    assert [row["tag"] for row in sweep.report["rows"]] == ["trained", "s0", "s0.5"]
    assert set(sweep.models) == {"trained", "s0", "s0.5"} and sweep.models["trained"] is model
    assert not (tmp_path / "pruned").exists()
    report = export.export_pruned(sweep, str(tmp_path), formats=("fp32",))
    for row in report["rows"]:
        assert (tmp_path / "pruned" / row["tag"] / "cnn_classifier_fp32.tflite").exists()
        assert row["tflite_fp32"]["gzip_bytes"] > 0
    assert "fine-tuned, sparsity 0.5" in pruning.pruning_table(report)

"""Saved models and shipped presets: ``tfmstep.save``/``load`` round-trip every registered model (weights,
config, assets, card), a training workdir loads and saves like a preset, recipes run by name, and every
shipped preset loads and reproduces the metrics on its card.

Tolerance of the reproduction: the same weights on the same evaluation data (checked by the card's data
fingerprint) through the same eval step; only float summation order can differ, so 1e-4 absolute on
every metric (accuracy and exact match move in steps of 1/examples, far coarser).
"""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep import registry, saving, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = tfmstep.list_models()
REPRODUCE_TOLERANCE = 1e-4
SHIPPED = [row["name"] for row in tfmstep.list_presets() if row["weights"]]


def _outputs(model, inputs):
    return [np.asarray(t) for t in tf.nest.flatten(model(inputs, training=False))]


def _validation_batch(model, batch_size=4):
    info = model.preset_info
    return next(iter(info.spec.dataset(info.config, "validation", batch_size)))


@pytest.mark.parametrize("name", MODELS)
def test_save_then_load_gives_the_same_model_config_and_card(name, tmp_path):
    config = tfmstep.get_config(name, "tiny")
    model = registry.get_spec(name).build(config)
    path = tfmstep.save(model, str(tmp_path / "saved"), config=config, summary="a tiny test model",
                        evaluate_metrics=False)
    loaded = tfmstep.load(path)
    assert loaded.preset_info.model == name
    inputs, _ = _validation_batch(loaded)
    for a, b in zip(_outputs(model, inputs), _outputs(loaded, inputs)):
        np.testing.assert_array_equal(a, b)
    card = json.loads((tmp_path / "saved" / saving.PRESET_FILE).read_text())
    assert card["model"] == name and card["parameters"] == model.count_params()
    assert "a tiny test model" in (tmp_path / "saved" / saving.CARD_FILE).read_text()
    # Saving the loaded model again keeps the card's text.
    again = tfmstep.save(loaded, str(tmp_path / "again"), evaluate_metrics=False)
    assert json.loads(open(os.path.join(again, saving.PRESET_FILE)).read())["summary"] == "a tiny test model"


def test_the_vocabulary_travels_with_a_saved_language_model(tmp_path):
    vocab = tmp_path / "train" / "vocab.spm"
    config = tfmstep.get_config("lstm_lm", "tiny", tokenizer="sentencepiece", vocab_size=400,
                                vocab_file=str(vocab))
    model = registry.get_spec("lstm_lm").build(config)
    registry.get_spec("lstm_lm").validate_data(config)  # trains and writes the vocabulary
    path = tfmstep.save(model, str(tmp_path / "saved"), config=config, evaluate_metrics=False)
    vocab.unlink()  # the saved model must not need the training directory any more
    loaded = tfmstep.load(path)
    assert loaded.preset_info.config.vocab_file == os.path.join(path, saving.ASSETS_DIR, "vocab.spm")
    from tfmstep.models import lstm_lm

    tokenizer = lstm_lm.make_tokenizer(loaded.preset_info.config)
    assert tokenizer.decode(tokenizer.encode(b"def f(x):\n    return x")) == "def f(x):\n    return x"


def test_a_training_workdir_loads_saves_and_reloads_as_a_preset(tmp_path):
    workdir = str(tmp_path / "run")
    config = trainer.TrainConfig(steps=4, batch_size=8, log_every=2, checkpoint_every=4, eval_every=0,
                                 eval_batches=2, warmup_steps=0, jit_compile=False, steps_per_call=1)
    final = trainer.train("cnn_classifier", workdir, preset="tiny", config=config)
    assert final["headline"] == {"accuracy": final["eval"]["accuracy"]}
    from_workdir = tfmstep.load(workdir)
    saved = tfmstep.save(workdir, str(tmp_path / "saved"), data="digits (scikit-learn)")
    card = json.loads(open(os.path.join(saved, saving.PRESET_FILE)).read())
    assert card["command"].startswith("tfmstep-train --model=cnn_classifier --preset=tiny")
    assert card["training"]["step"] == 4 and card["examples"] == 360  # the whole test split
    reloaded = tfmstep.load(saved)
    inputs, _ = _validation_batch(reloaded)
    np.testing.assert_array_equal(_outputs(from_workdir, inputs)[0], _outputs(reloaded, inputs)[0])
    # Every tool that takes --workdir takes a saved model too.
    model, model_config, spec = saving.load_trained(saved)
    assert spec.name == "cnn_classifier" and model_config == reloaded.preset_info.config


def test_a_rerun_of_a_finished_run_says_complete_and_rewrites_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    config = trainer.TrainConfig(steps=2, batch_size=8, log_every=1, checkpoint_every=2, eval_every=0,
                                 eval_batches=1, warmup_steps=0, jit_compile=False, steps_per_call=1)
    first = trainer.train("cnn_classifier", workdir, preset="tiny", config=config)
    before = open(os.path.join(workdir, "metrics.json")).read()
    again = trainer.train("cnn_classifier", workdir, preset="tiny", config=config)
    assert again["already_complete"] and again["eval"] == first["eval"]
    assert open(os.path.join(workdir, "metrics.json")).read() == before
    assert "was already complete at step 2" in trainer.summary(again, workdir)


def test_a_recipe_by_name_expands_its_includes_and_later_flags_override_it():
    from tfmstep.cli import train as train_cli

    args = train_cli.expand_recipe(["--recipe=chain_lego", "--steps=5"])
    assert "--model=chain_transformer" in args  # from chain_base.flags, included by chain_lookup.flags
    # chain_lookup.flags' steps, then chain_lego.flags' own, then the command line's: the last one wins
    assert args.index("--steps=1000") < args.index("--steps=6000") < args.index("--steps=5")
    with pytest.raises(tfmstep.UserError, match="unknown recipe 'nope'; recipes: .*cnn_digits"):
        train_cli.expand_recipe(["--recipe", "nope"])


def test_list_presets_names_every_recipe_and_says_which_have_weights():
    rows = {row["name"]: row for row in tfmstep.list_presets()}
    assert set(tfmstep.list_recipes()) <= set(rows)
    assert rows["cnn_digits"]["model"] == "cnn_classifier" and rows["cnn_digits"]["weights"]
    for row in rows.values():
        assert row["model"] in MODELS and row["weights"] == bool(row["metrics"])
    without = [name for name, row in rows.items() if not row["weights"]]
    for name in without[:1]:
        with pytest.raises(tfmstep.UserError, match="recipe without shipped weights"):
            tfmstep.from_preset(name)


def test_build_with_weights_is_from_preset():
    model = tfmstep.build("cnn_classifier", preset="cnn_digits", weights=True)
    assert model.preset_info.directory == saving.preset_dir("cnn_digits")
    with pytest.raises(tfmstep.UserError, match="is a cnn_classifier model, not lstm_lm"):
        tfmstep.build("lstm_lm", preset="cnn_digits", weights=True)
    with pytest.raises(tfmstep.UserError, match="cannot change a trained preset"):
        tfmstep.build("cnn_classifier", preset="cnn_digits", weights=True, dropout=0.5)


def _card(name):
    return json.loads(open(os.path.join(saving.preset_dir(name), saving.PRESET_FILE)).read())


def _shipped_params():
    """Presets whose evaluation took more than ~20 s when saved are slow tests."""
    params = []
    for name in SHIPPED:
        slow = _card(name).get("eval_seconds", 0) > 20
        params.append(pytest.param(name, marks=[pytest.mark.slow] if slow else []))
    return params


@pytest.mark.parametrize("name", _shipped_params())
def test_shipped_preset_loads_and_reproduces_its_card(name):
    card = _card(name)
    for key in ("data", "recipe", "command", "license", "limits", "eval", "headline"):
        assert card.get(key), f"the card of {name} has no {key}"
    model = tfmstep.from_preset(name)
    assert model.count_params() == card["parameters"]
    measured = tfmstep.evaluate(model)
    if measured["data_fingerprint"] != card["data_fingerprint"]:
        pytest.skip(f"{name}: this machine's evaluation data differs from the card's ({card['data']})")
    assert measured["examples"] == card["examples"]
    for group in ("eval", "headline"):
        for key, value in card[group].items():
            assert abs(measured[group][key] - value) <= REPRODUCE_TOLERANCE, (group, key, measured[group])


def test_the_wheel_holds_the_recipes_presets_and_license(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "-q", "-w", str(tmp_path), ROOT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    for recipe in tfmstep.list_recipes():
        assert f"tfmstep/recipes/{recipe}.flags" in names
    assert "tfmstep/recipes/chain_base.flags" in names  # includes ship too
    for name in SHIPPED:
        for file in (saving.PRESET_FILE, saving.WEIGHTS_FILE, saving.CARD_FILE):
            assert f"tfmstep/pretrained/{name}/{file}" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)

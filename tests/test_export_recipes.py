"""Every CNN preset, both LSTM recipes -- byte and subword, tied and untied output -- and every chain task
export to every format (SavedModel + the four TF-Lite files), on tiny sizes, through the export the tool
runs; the servable's info file carries no machine paths."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep import export
from tfmstep.data import chains
from tfmstep.export import saved_model
from tfmstep.models import lstm_lm

# The recipes' structure (models/lstm_stdlib*.flags) at tiny sizes: units 32; embedding_dim 16 ties through
# a projection (as the subword recipe's 256 vs 512 does), 32 ties directly.
LSTM_VARIANTS = {
    "byte-untied (lstm_stdlib)": {},
    "byte-tied-direct": {"tie_weights": True, "embedding_dim": 32},
    "subword-tied-projection (lstm_stdlib_subword)": {"tokenizer": "sentencepiece", "tie_weights": True},
    "subword-untied": {"tokenizer": "sentencepiece"},
}
CNN_PRESETS = {"tiny": {}, "default (cnn_digits)": {}, "cifar10 (on digits)": {"dataset": "digits",
                                                                               "augment": False}}


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vocab") / "vocab.spm")
    lstm_lm.tokenized_corpus(tfmstep.get_config("lstm_lm", "tiny", tokenizer="sentencepiece", vocab_size=400,
                                                vocab_file=path))
    return path


def _export_everything(name, config, base, formats=export.FORMATS):
    keras.utils.set_random_seed(0)
    model = tfmstep.get_spec(name).build(config)
    report = export.export_all(model, name, config, base, formats, max_eval_batches=1)
    assert sorted(report["artifacts"]) == sorted(formats)
    saved = report["artifacts"]["saved_model"]
    assert saved["reloaded_mismatched_outputs"] == [] and saved["reloaded_max_abs_diff"] < 1e-4, saved
    assert report["artifacts"]["tflite_fp32"]["agreement"] == 1.0
    with open(os.path.join(saved["path"], saved_model.INFO_FILE)) as f:
        info_text = f.read()
    assert str(base) not in info_text and os.path.expanduser("~") + os.sep not in info_text
    return report, json.loads(info_text)


# The two recipes run by default; the other variants (and presets) are marked slow to keep the suite short.
RECIPES = ("byte-untied (lstm_stdlib)", "subword-tied-projection (lstm_stdlib_subword)", "tiny")


def _params(names):
    return [name if name in RECIPES else pytest.param(name, marks=pytest.mark.slow) for name in names]


@pytest.mark.parametrize("variant", _params(LSTM_VARIANTS))
def test_every_lstm_recipe_exports_to_every_format(variant, vocab_file, tmp_path):
    overrides = dict(LSTM_VARIANTS[variant])
    if overrides.get("tokenizer") == "sentencepiece":
        overrides.update(vocab_size=400, vocab_file=vocab_file)
    config = tfmstep.get_config("lstm_lm", "tiny", **overrides)
    _, info = _export_everything("lstm_lm", config, tmp_path)
    if "vocab_file" in overrides:
        assert info["config"]["vocab_file"] == info["vocab_asset"] == "assets/vocab.spm"


@pytest.mark.parametrize("preset", _params(CNN_PRESETS))
def test_every_cnn_preset_exports_to_every_format(preset, tmp_path):
    config = tfmstep.get_config("cnn_classifier", preset.split()[0], **CNN_PRESETS[preset])
    _export_everything("cnn_classifier", config, tmp_path)


def test_saved_model_alone_never_builds_the_tflite_copy(tmp_path, monkeypatch):
    """The unrolled LSTM copy is TF-Lite's alone: exporting only the SavedModel must not build it (it
    crashed the tied LM's SavedModel export before)."""
    from tfmstep.models.lstm_lm import serving as lm_serving

    def fail(*args):
        raise AssertionError("the unrolled TF-Lite copy was built for a SavedModel export")

    monkeypatch.setattr(lm_serving, "unrolled_copy", fail)
    model = tfmstep.build("lstm_lm", "tiny", tie_weights=True)
    config = tfmstep.get_config("lstm_lm", "tiny", tie_weights=True)
    report = export.export_all(model, "lstm_lm", config, str(tmp_path), ["saved_model"])
    assert report["artifacts"]["saved_model"]["reloaded_mismatched_outputs"] == []


def test_export_info_has_relative_names_only(tmp_path):
    data = tmp_path / "data" / "corpus.txt"
    data.parent.mkdir()
    data.write_text("def f(x):\n    return x\n" * 400)
    config = tfmstep.get_config("lstm_lm", "tiny", text_file=str(data))
    model = tfmstep.get_spec("lstm_lm").build(config)
    path = saved_model.export_saved_model(model, "lstm_lm", config, str(tmp_path / "export"))
    with open(os.path.join(path, saved_model.INFO_FILE)) as f:
        info = json.load(f)
    assert info["config"]["text_file"] == "corpus.txt"
    assert str(tmp_path) not in json.dumps(info)


# Chain tasks (tfmstep/data/chains.py TASKS; models/chain_<task>.flags) on the tiny preset: every task to
# every format is the slow sweep (~35 s a task on 2 busy cores, most of it int8 calibration through the
# loop). The default run keeps one fast representative: registers, whose answer is 3 tokens (every other
# task answers 1, as lego does, which test_export_saved_model.py and test_export_tflite.py export to every
# format on the tiny preset), as a SavedModel and fp32 TF-Lite.
FAST_CHAIN_TASK = "registers"
FAST_CHAIN_FORMATS = ("saved_model", "tflite_fp32")


@pytest.fixture(scope="session")
def chain_task_export(tmp_path_factory):
    """(task, formats) -> (report, info, config): the tiny chain reasoner of that task exported, once per
    session."""
    cache = {}

    def get(task, formats):
        if (task, formats) not in cache:
            config = tfmstep.get_config("chain_transformer", "tiny", task=task)
            base = tmp_path_factory.mktemp(f"chain_{task}")
            cache[task, formats] = (*_export_everything("chain_transformer", config, base, formats), config)
        return cache[task, formats]

    return get


def _check_chain_export(task, report, info, config):
    assert info["config"]["task"] == task
    loaded = saved_model.load(report["artifacts"]["saved_model"]["path"])
    problem, answer = chains.generate_problem(task, 2, np.random.default_rng(0), modulus=config.modulus)
    out = loaded.signatures["answer_text"](text=tf.constant([problem]))
    assert out["answers"].shape == (1, config.answers) == (1, len(answer)), (task, problem, answer)
    assert len(out["answer_text"].numpy()[0]) <= config.answers


def test_a_chain_task_with_a_multi_token_answer_exports(chain_task_export):
    task = FAST_CHAIN_TASK
    _check_chain_export(task, *chain_task_export(task, FAST_CHAIN_FORMATS))


# models/chain_lookup.flags' architecture (convolutions, the same-token bonus, learned halting), tiny.
LOOKUP_OPTIONS = dict(conv_kernel=5, block_conv_kernel=3, token_match=4.0, window=0, causal=False,
                      prelude_layers=0, length_scaled_softmax=True, answer_lag=1, halting="learned")


def test_the_lookup_chain_model_exports_to_a_saved_model_and_fp32_tflite(tmp_path):
    config = tfmstep.get_config("chain_transformer", "tiny", task="pointer", **LOOKUP_OPTIONS)
    report, info = _export_everything("chain_transformer", config, tmp_path, FAST_CHAIN_FORMATS)
    _check_chain_export("pointer", report, info, config)


@pytest.mark.slow
@pytest.mark.parametrize("task", chains.TASKS)
def test_every_chain_task_exports_to_every_format(task, chain_task_export):
    _check_chain_export(task, *chain_task_export(task, tuple(export.FORMATS)))

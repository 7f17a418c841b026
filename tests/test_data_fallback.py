"""A requested dataset that is not prepared locally is an error for a training run unless it allows the
offline fallback (``--allow_fallback``); metrics.json names the data actually read."""

import json
import os

import pytest

import tfmstep
from tfmstep import trainer
from tfmstep.data import common, images

CONFIG = trainer.TrainConfig(steps=2, batch_size=8, log_every=1, checkpoint_every=2, eval_every=0,
                             eval_batches=1, warmup_steps=0, jit_compile=False, steps_per_call=1)
SMALL = {"filters": (4,), "convs_per_stage": 1, "augment": False}


@pytest.fixture
def cifar10_not_prepared(monkeypatch):
    def not_prepared(name, **kwargs):
        raise common.NotAvailableLocally(f"{name} is not prepared in ~/tensorflow_datasets")

    monkeypatch.setattr(images, "load_tfds", not_prepared)
    monkeypatch.setattr(images, "_cache", {})


def test_falling_back_is_an_error_unless_the_run_allows_it(tmp_path, cifar10_not_prepared):
    workdir = tmp_path / "run"
    with pytest.raises(tfmstep.UserError, match="'cifar10' is not available.*--allow_fallback"):
        trainer.train("cnn_classifier", str(workdir), preset="cifar10", overrides=SMALL, config=CONFIG)
    assert not os.path.exists(workdir / "config.json")  # refused before anything was written


def test_an_allowed_fallback_is_named_in_metrics_json(tmp_path, cifar10_not_prepared):
    workdir = tmp_path / "run"
    config = trainer.TrainConfig(**{**CONFIG.__dict__, "allow_fallback": True})
    trainer.train("cnn_classifier", str(workdir), preset="cifar10", overrides=SMALL, config=config)
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["data"] == {"cifar10": "digits (the offline scikit-learn digits images)"}


def test_metrics_json_names_the_data_of_a_run_without_fallback(tmp_path):
    workdir = tmp_path / "run"
    trainer.train("cnn_classifier", str(workdir), preset="tiny", config=CONFIG)
    assert json.loads((workdir / "metrics.json").read_text())["data"] == {"digits": "digits"}

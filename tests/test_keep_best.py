"""keep_best=eval_loss: the checkpoint with the lowest validation loss is kept, the run ends restored to
it (and says so), early stopping counts evaluations without a new best -- also across a resume."""

import json
import os

import numpy as np
import pytest

from tfmstep import saving, trainer
from tfmstep.errors import UserError

# Validation losses the scripted evaluation reports, in call order: best at the 2nd evaluation (step 20).
SCRIPT = [3.0, 2.0, 2.5, 2.6, 2.7, 2.8]


def _scripted_evaluate(monkeypatch):
    real, calls = trainer.evaluate, []

    def evaluate(*args, **kwargs):
        metrics = real(*args, **kwargs)
        calls.append(metrics["loss"])
        return {**metrics, "loss": SCRIPT[len(calls) - 1] if len(calls) <= len(SCRIPT) else metrics["loss"]}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    return calls


def _config(**changes):
    return trainer.TrainConfig(**{**dict(steps=80, batch_size=16, learning_rate=3e-3, warmup_steps=0,
                                         checkpoint_every=10, eval_every=10, eval_batches=1, steps_per_call=10,
                                         log_every=10, jit_compile=False, keep_best="eval_loss"), **changes})


def test_early_stop_restores_the_checkpoint_with_the_lowest_validation_loss(tmp_path, monkeypatch):
    _scripted_evaluate(monkeypatch)
    workdir = str(tmp_path / "run")
    final = trainer.train("cnn_classifier", workdir, "tiny", config=_config(early_stop_evals=2))
    assert final["stopped_early"] and final["step"] == 40  # evaluations at 30 and 40 did not beat 20's
    assert final["restored_best"]["step"] == 20 and final["restored_best"]["eval_loss"] == 2.0
    assert "stopped early" in trainer.summary(final, workdir) and "step 20, restored" in trainer.summary(
        final, workdir)
    # The run's latest checkpoint now holds the best model: what export and generation load.
    latest = saving.load_trained(workdir)[0]
    best = saving.load_trained(workdir, restore_from="best")[0]
    for a, b in zip(latest.weights, best.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    with open(os.path.join(workdir, "checkpoints", "best", "best.json")) as f:
        record = json.load(f)
    assert record["step"] == 20 and [s for s, _ in record["evals"]] == [10, 20, 30, 40]
    # A rerun of the early-stopped run trains nothing more.
    again = trainer.train("cnn_classifier", workdir, "tiny", config=_config(early_stop_evals=2))
    assert again.get("already_complete") and again["step"] == 40


def test_resumed_run_forgets_evaluations_after_its_checkpoint(tmp_path):
    best_dir = tmp_path / "best"
    best_dir.mkdir()
    (best_dir / "checkpoint").write_text('model_checkpoint_path: "ckpt-20"\n')
    (best_dir / "ckpt-20.index").write_bytes(b"")
    record = {"step": 20, "checkpoint": "x", "eval_loss": 2.0, "evals": [[10, 3.0], [20, 2.0], [30, 2.5],
                                                                          [40, 2.6]]}
    (best_dir / "best.json").write_text(json.dumps(record))
    tracker = trainer._LossTracker(str(best_dir), "eval_loss")
    assert tracker.evals_since_best == 2
    tracker.truncate_evals(30)  # resumed from ckpt-30: the evaluation at 40 is redone
    assert tracker.evals_since_best == 1
    assert not tracker.add_eval(40, 2.6) and tracker.evals_since_best == 2


def test_early_stopping_needs_validation_loss_and_evaluations():
    with pytest.raises(UserError, match="early_stop_evals=3 needs keep_best=eval_loss"):
        trainer.TrainConfig(early_stop_evals=3)
    with pytest.raises(UserError, match="keep_best must be one of"):
        trainer.TrainConfig(keep_best="accuracy")

"""The trainer and tools/train.py: exact resume after SIGKILL, NaN guard, bad input handling."""

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep import registry, saving, trainer
from tfmstep.errors import UserError

# A small CNN with BatchNorm *and* dropout, so moving statistics and the dropout RNG are part of what
# must resume exactly.
CNN = dict(filters="8,16", convs_per_stage="1", dropout="0.5")
TRAIN_ARGS = ["--model=cnn_classifier", "--preset=default", "--batch_size=16", "--learning_rate=3e-3",
              "--warmup_steps=20", "--steps_per_call=4", "--log_every=20", "--eval_every=0",
              "--eval_batches=2", "--jit_compile=false"] + [f"--config={k}={v}" for k, v in CNN.items()]


def _train_cli(repo, *args, wait=True, env_extra=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env_extra or {}))
    cmd = [sys.executable, os.path.join(repo, "tools", "train.py"), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _log(workdir):
    with open(os.path.join(workdir, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_run_killed_mid_training_resumes_bit_exact(tmp_path, repo_root):
    steps = ["--steps=400", "--checkpoint_every=8"]
    straight = tmp_path / "straight"
    result = _train_cli(repo_root, *TRAIN_ARGS, *steps, f"--workdir={straight}")
    assert result.returncode == 0, result.stderr[-2000:]

    killed = tmp_path / "killed"
    process = _train_cli(repo_root, *TRAIN_ARGS, *steps, f"--workdir={killed}", wait=False)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "checkpoint").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    killed_at = len(_log(killed))
    assert 0 < killed_at < 400

    result = _train_cli(repo_root, *TRAIN_ARGS, *steps, f"--workdir={killed}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resumed from" in result.stderr
    resumed_log, straight_log = _log(killed), _log(straight)
    assert [e["step"] for e in resumed_log] == list(range(1, 401))  # no replayed, no lost steps
    assert resumed_log == straight_log  # losses equal bit for bit (JSON keeps float64 repr)

    resumed_model = saving.load_trained(str(killed))[0]
    straight_model = saving.load_trained(str(straight))[0]
    for a, b in zip(resumed_model.weights, straight_model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    config = trainer.TrainConfig(steps=40, batch_size=16, learning_rate=1.0, warmup_steps=0,
                                 clip_norm=0.0, checkpoint_every=10, eval_every=0, eval_batches=1,
                                 steps_per_call=10, log_every=10, jit_compile=False)
    workdir = str(tmp_path / "run")
    trainer.train("cnn_classifier", workdir, "tiny", config=config)  # a good run to step 40
    good = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    # The same workdir continued with an absurd learning rate: the loss overflows.
    blown = trainer.TrainConfig(**{**config.__dict__, "steps": 200, "learning_rate": 1e30})
    with pytest.raises(trainer.TrainingDiverged, match=r"loss became (nan|inf).*ckpt-40.*was kept"
                                                        r".*rerunning the same command restores it"):
        trainer.train("cnn_classifier", workdir, "tiny", config=blown)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == good


def test_workdir_of_another_model_config_is_refused_untouched(tmp_path):
    workdir = str(tmp_path / "run")
    config = trainer.TrainConfig(steps=4, batch_size=8, eval_batches=1, jit_compile=False)
    trainer.train("cnn_classifier", workdir, "tiny", config=config)
    before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(tfmstep.UserError, match="holds a run with overrides"):
        trainer.train("cnn_classifier", workdir, "tiny", {"dropout": 0.3}, config=config)
    assert open(os.path.join(workdir, "config.json")).read() == before


def test_a_changed_default_does_not_change_a_trained_run(tmp_path, monkeypatch):
    # config.json records every model field: evaluating, exporting or resuming a workdir rebuilds the
    # model it trained, even after the preset (or a dataclass default) changed under it.
    workdir = str(tmp_path / "run")
    config = trainer.TrainConfig(steps=2, batch_size=8, eval_batches=1, eval_every=0, jit_compile=False,
                                 steps_per_call=1, mixed_precision="float32")
    trainer.train("cnn_classifier", workdir, "tiny", config=config)
    trained, _, _ = trainer.restore(workdir)
    spec = registry.get_spec("cnn_classifier")
    monkeypatch.setitem(spec.presets, "tiny", {**spec.presets["tiny"], "filters": (4, 4)})
    model, model_config, _ = trainer.restore(workdir)
    assert model_config.filters == (8, 16)
    for a, b in zip(model.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(a, b)
    resumed = trainer.train("cnn_classifier", workdir, "tiny", config=dataclasses.replace(config, steps=3))
    assert resumed["step"] == 3
    assert json.load(open(os.path.join(workdir, "config.json")))["model_config"]["filters"] == [8, 16]
    # A new run takes today's preset.
    trainer.train("cnn_classifier", str(tmp_path / "new"), "tiny", config=config)
    assert trainer.restore(str(tmp_path / "new"))[1].filters == (4, 4)


def _tree_digest(path):
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


def test_bad_input_gives_one_error_line_exit_2_and_changes_nothing_saved(tmp_path, repo_root):
    """Through tools/train.py for the two kinds of failure (a flag, a damaged workdir); the other bad
    inputs in-process (the same UserError reaches the same one-line handler), to keep the suite fast."""
    workdir = tmp_path / "run"
    small = trainer.TrainConfig(steps=4, batch_size=8, eval_batches=1, jit_compile=False)
    trainer.train("cnn_classifier", str(workdir), "tiny", config=small)
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["step"] == 4 and 0.0 <= metrics["eval"]["accuracy"] <= 1.0
    # Corrupt the latest checkpoint's data file.
    data_file = next(p for p in (workdir / "checkpoints").iterdir() if ".data-" in p.name)
    data_file.write_bytes(b"garbage" * 10)
    saved = _tree_digest(workdir)

    base = ["--model=cnn_classifier", "--preset=tiny", "--batch_size=8", "--jit_compile=false",
            f"--workdir={workdir}"]
    for args, message in ((["--model=resnet9000"], "unknown model 'resnet9000'"),
                          (["--steps=8"], "is corrupt or belongs to another model")):
        result = _train_cli(repo_root, *base, *args)
        assert result.returncode == 2, (args, result.stderr[-1500:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], (args, result.stderr[-1500:])

    other = str(tmp_path / "other")
    for overrides, message in (({"widht": 3}, "unknown config field 'widht'"),
                               ({"dataset": "npz", "data_file": f"{tmp_path}/none.npz"}, "data file not found"),
                               ({"num_classes": 0}, "num_classes must be >= 1"),
                               ({"num_classes": 3}, "but num_classes=3")):
        with pytest.raises(tfmstep.UserError, match=re.escape(message)):
            trainer.train("cnn_classifier", other, "tiny", overrides, config=small)
    assert _tree_digest(workdir) == saved  # nothing already saved was changed
    assert not (tmp_path / "other").exists()  # data errors come before anything is written

    bad_flag = _train_cli(repo_root, "--steps=many", f"--workdir={workdir}")
    assert bad_flag.returncode != 0 and "--steps" in bad_flag.stderr


def test_mixed_bfloat16_training_runs_and_restores_the_global_policy(tmp_path):
    import keras

    config = trainer.TrainConfig(steps=6, batch_size=8, eval_batches=1, steps_per_call=3,
                                 mixed_precision="mixed_bfloat16", jit_compile=True)
    metrics = trainer.train("cnn_classifier", str(tmp_path / "run"), "tiny", config=config)
    assert np.isfinite(metrics["eval"]["loss"])
    assert keras.mixed_precision.global_policy().name == "float32"


def test_unknown_precision_is_refused_naming_the_choices():
    with pytest.raises(tfmstep.UserError, match="mixed_bfloat16"):
        trainer.TrainConfig(mixed_precision="float8")


def test_min_lr_ratio_reaches_the_optimizer_and_is_checked(tmp_path):
    config = trainer.TrainConfig(steps=50, warmup_steps=0, learning_rate=1e-2, min_lr_ratio=1.0)
    spec = registry.get_spec("cnn_classifier")
    run = trainer._Run(spec, spec.config("tiny"), config, str(tmp_path), tf.distribute.get_strategy())
    assert float(run.optimizer._learning_rate(50)) == pytest.approx(1e-2)  # constant: no decay
    with pytest.raises(UserError, match="min_lr_ratio must be in"):
        trainer.TrainConfig(min_lr_ratio=1.5)


def test_cooldown_steps_reach_the_optimizer_and_are_checked(tmp_path):
    config = trainer.TrainConfig(steps=50, warmup_steps=0, learning_rate=1e-2, min_lr_ratio=1.0,
                                 cooldown_steps=10)
    spec = registry.get_spec("cnn_classifier")
    run = trainer._Run(spec, spec.config("tiny"), config, str(tmp_path), tf.distribute.get_strategy())
    assert float(run.optimizer._learning_rate(40)) == pytest.approx(1e-2)
    assert float(run.optimizer._learning_rate(45)) == pytest.approx(5e-3)
    with pytest.raises(UserError, match="cooldown_steps must be in"):
        trainer.TrainConfig(steps=50, cooldown_steps=51)


@pytest.mark.parametrize("name", tfmstep.list_models())
def test_init_from_copies_every_weight_of_every_family(tmp_path, name):
    # Blocks kept in a Python list (the chain reasoner's looped core) are not in tf.train.Checkpoint's
    # graph of the model; init_from once left them at their random start without a word.
    config = trainer.TrainConfig(steps=1, batch_size=4, eval_batches=1, eval_every=0, jit_compile=False,
                                 steps_per_call=1, mixed_precision="float32")
    first = str(tmp_path / "first")
    trainer.train(name, first, preset="tiny", config=config)
    trained, _, _ = trainer.restore(first)
    spec = registry.get_spec(name)
    fresh = trainer._Run(spec, spec.config("tiny"), config, str(tmp_path / "second"), tf.distribute.get_strategy())
    fresh.init_weights(first)
    assert len(fresh.model.variables) == len(trained.variables)
    for new, old in zip(fresh.model.variables, trained.variables):
        assert new.path.split("/", 1)[1] == old.path.split("/", 1)[1]
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old), err_msg=new.path)
    # A checkpoint from before the variable list (model and optimizer only) still gives every trained weight.
    run = trainer._Run(spec, spec.config("tiny"), config, first, tf.distribute.get_strategy())
    run.restore()
    older = tf.train.Checkpoint(model=run.model, optimizer=run.optimizer).write(str(tmp_path / "older" / "ckpt-1"))
    again = trainer._Run(spec, spec.config("tiny"), config, str(tmp_path / "third"), tf.distribute.get_strategy())
    again.init_weights(older)
    for new, old in zip(again.model.trainable_variables, trained.trainable_variables):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old), err_msg=new.path)
    assert int(again.optimizer.iterations.numpy()) == 0


def test_init_from_starts_a_new_run_from_another_runs_weights_and_refuses_a_mismatch(tmp_path):
    config = trainer.TrainConfig(steps=2, batch_size=8, eval_batches=1, jit_compile=False, steps_per_call=1,
                                 mixed_precision="float32")
    first = str(tmp_path / "first")
    trainer.train("cnn_classifier", first, preset="tiny", config=config)
    trained, _, _ = trainer.restore(first)
    spec = registry.get_spec("cnn_classifier")
    fresh = trainer._Run(spec, spec.config("tiny"), config, str(tmp_path / "second"), tf.distribute.get_strategy())
    assert not all(np.array_equal(a, b) for a, b in zip(fresh.model.get_weights(), trained.get_weights()))
    fresh.init_weights(first)
    for a, b in zip(fresh.model.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(fresh.optimizer.iterations.numpy()) == 0 and int(fresh.step.numpy()) == 0
    # A run started so trains on from those weights; a model of another shape is one clear error.
    second = trainer.train("cnn_classifier", str(tmp_path / "second"), preset="tiny",
                           config=dataclasses.replace(config, init_from=first))
    assert second["step"] == 2
    with pytest.raises(UserError, match="does not hold this model's weights"):
        trainer.train("cnn_classifier", str(tmp_path / "wider"), preset="tiny", overrides={"filters": (4, 8)},
                      config=dataclasses.replace(config, init_from=first))
    assert not os.path.exists(tmp_path / "wider" / "config.json")  # refused before anything was written
    with pytest.raises(UserError, match="neither a workdir nor a checkpoint"):
        trainer.train("cnn_classifier", str(tmp_path / "third"), preset="tiny",
                      config=dataclasses.replace(config, init_from=str(tmp_path / "nothing_here")))


def test_progress_eta_follows_the_recent_pace_not_the_run_average():
    pace = trainer.ProgressRate(step=0, now=0.0, window=120.0)
    for second in range(10, 301, 10):  # 25 steps/s for 5 minutes (a short-problem stage)...
        pace.update(step=25 * second, now=float(second))
    assert pace.rate() == pytest.approx(25.0)
    for second in range(310, 601, 10):  # ...then 10 steps/s for 5 minutes
        pace.update(step=7500 + 10 * (second - 300), now=float(second))
    assert pace.rate() == pytest.approx(10.0)  # the run average would say 17.5
    assert pace.text(total_steps=10500 + 6000) == "10.0 steps/s, ETA 10m00s"


def test_progress_eta_is_unknown_before_any_step():
    pace = trainer.ProgressRate(step=0, now=0.0)
    pace.update(step=0, now=5.0)
    assert pace.text(total_steps=100) == "0.0 steps/s, ETA ?"


def test_progress_says_nothing_is_left_once_the_last_step_is_done():
    pace = trainer.ProgressRate(step=100, now=0.0)
    pace.update(step=100, now=5.0)  # a run whose only call was the first (its pace starts after it)
    assert pace.text(total_steps=100) == "0.0 steps/s, ETA 0m00s"

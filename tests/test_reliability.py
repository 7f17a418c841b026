"""Fault injection: every fault and bad input of the reliability probe (issue 16), as one table.

Each fault is injected at an exact point, never by racing a timer: a child process patches the function
that is running at that moment and ``os._exit``s there (what SIGKILL does: no cleanup, no flush), or an
in-process hook raises / sends the signal at an exact call. After each fault the test checks that nothing
already saved was lost (every complete checkpoint byte for byte, every log line up to the latest
checkpoint), then recovers and checks the result against an uninterrupted run bit for bit. Each bad input
must give one ``UserError`` line (the CLI prints it as ``error: ...`` with exit code 2) and leave the
workdir as it was.

The module prints the table when it is done (``pytest tests/test_reliability.py -q``); the README's
"Reliability" section has it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep import fileio, saving, step as step_lib, trainer

# Dropout and BatchNorm: the RNG state and the moving statistics are part of what must resume exactly.
CNN = dict(filters=(4, 8), dropout=0.5)
CONFIG = trainer.TrainConfig(steps=48, batch_size=8, learning_rate=3e-3, warmup_steps=4, steps_per_call=4,
                             log_every=8, checkpoint_every=16, eval_every=0, eval_batches=1,
                             jit_compile=False)
KILLED = 137  # what a shell reports for SIGKILL; the child's os._exit code at the fault point

ROWS: list = []  # (kind, case, outcome, data lost)


def _row(kind, case, outcome, lost=0):
    ROWS.append((kind, case, outcome, lost))


@pytest.fixture(scope="module", autouse=True)
def _print_table(request):
    yield
    if not ROWS:
        return
    faults = [r for r in ROWS if r[0] == "fault"]
    inputs = [r for r in ROWS if r[0] == "bad input"]
    lines = ["", "| kind | case | outcome | data lost |", "|---|---|---|---|"]
    lines += [f"| {kind} | {case} | {outcome} | {lost} |" for kind, case, outcome, lost in ROWS]
    lines.append(f"\nfaults tried / survived: {len(faults)} / "
                 f"{sum(r[2].startswith('survived') for r in faults)}; bad inputs tried / clear errors: "
                 f"{len(inputs)} / {sum(r[2].startswith('clear error') for r in inputs)}; data lost: "
                 f"{sum(r[3] for r in ROWS)}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines))


# --- helpers ----------------------------------------------------------------------------------------------

def _train(workdir, config=CONFIG, overrides=None, **kwargs):
    return trainer.train("cnn_classifier", str(workdir), "tiny", CNN if overrides is None else overrides,
                         config=config, **kwargs)


def _log(workdir, lenient=False):
    path = os.path.join(workdir, "train_log.jsonl")
    entries = []
    with open(path) as f:
        for line in f:
            try:
                entries.append(json.loads(line))
            except ValueError:
                if not lenient:
                    raise
    return entries


def _weights(workdir):
    return [v.numpy() for v in saving.load_trained(str(workdir))[0].weights]


def _digest(path):
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                digest.update(os.path.relpath(os.path.join(root, name), path).encode() + f.read())
    return digest.hexdigest()


def _latest_step(workdir):
    state = tf.train.get_checkpoint_state(os.path.join(workdir, "checkpoints"))
    return int(state.model_checkpoint_path.rsplit("-", 1)[1]) if state else 0


def _saved(workdir):
    """What a fault must not lose: the bytes of every complete checkpoint (listed in the state file) and
    the log lines up to the latest one."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    state = tf.train.get_checkpoint_state(ckpt_dir)
    files = {}
    for prefix in (state.all_model_checkpoint_paths if state else []):
        prefix = os.path.join(ckpt_dir, os.path.basename(prefix))
        for name in os.listdir(ckpt_dir):
            path = os.path.join(ckpt_dir, name)
            if name.startswith(os.path.basename(prefix) + ".") and os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = hashlib.sha256(f.read()).hexdigest()
    latest = _latest_step(workdir)
    log = [e for e in _log(workdir, lenient=True) if e["step"] <= latest] if os.path.exists(
        os.path.join(workdir, "train_log.jsonl")) else []
    return files, log


def _lost(workdir, straight, before=None):
    """Saved items a fault lost, counted right after it: checkpoints the state file lists whose files
    are gone, log lines up to the latest checkpoint missing or unlike the uninterrupted run's, and (given
    a snapshot from just before the fault) checkpoint files or log lines that changed."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    state = tf.train.get_checkpoint_state(ckpt_dir)
    lost = sum(not os.path.exists(os.path.join(ckpt_dir, os.path.basename(p) + ".index"))
               for p in (state.all_model_checkpoint_paths if state else []))
    try:
        now_log = {e["step"]: e for e in _log(workdir, lenient=True)}
    except OSError:
        now_log = {}
    lost += sum(now_log.get(e["step"]) != e for e in straight["log"][:_latest_step(workdir)])
    if before is not None:
        files, log = before
        for name, digest in files.items():
            path = os.path.join(ckpt_dir, name)
            if not os.path.exists(path):
                lost += 1
                continue
            with open(path, "rb") as f:
                lost += hashlib.sha256(f.read()).hexdigest() != digest
        lost += sum(now_log.get(e["step"]) != e for e in log)
    return lost


class _Crash(Exception):
    """An in-process stand-in for a crash at an exact call."""


def _after_each_call(monkeypatch, after):
    """Pass every compiled call's per-step values through ``after(call_number, values) -> values`` (call k
    ends at step 4k here): how a fault is injected at an exact call."""
    real = step_lib.make_steps
    calls = [0]

    def make_steps(*args, **kwargs):
        steps = real(*args, **kwargs)
        train = steps.train

        def counted(iterator, num):
            out = train(iterator, num)
            calls[0] += 1
            return after(calls[0], out)

        steps.train = counted
        return steps

    monkeypatch.setattr(step_lib, "make_steps", make_steps)


def _at_call(monkeypatch, number, action):
    """Run ``action()`` right after the trainer's ``number``-th compiled call returns."""
    def after(call, out):
        if call == number:
            action()
        return out

    _after_each_call(monkeypatch, after)


def _crash_at_call(monkeypatch, workdir, number, config=CONFIG, **kwargs):
    """A run that dies inside its ``number``-th call, after ``number - 1`` calls of 4 steps (8: the log at
    step 28, the latest checkpoint at 16)."""
    with monkeypatch.context() as m:
        _at_call(m, number, lambda: (_ for _ in ()).throw(_Crash()))
        with pytest.raises(_Crash):
            _train(workdir, config, **kwargs)


_CHILD = r"""
import json, os, sys
fault, workdir, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
from tfmstep import trainer, step as step_lib
from tfmstep.cli import exit_on_user_error

def die():
    os._exit(%(killed)d)

if fault == "between_checkpoints":  # inside call 7: 6 calls (24 steps) done, checkpoint at 16
    real = step_lib.make_steps
    def make_steps(*a, **k):
        steps = real(*a, **k)
        train, calls = steps.train, [0]
        def counted(it, n):
            out = train(it, n)
            calls[0] += 1
            if calls[0] == 7:
                die()
            return out
        steps.train = counted
        return steps
    step_lib.make_steps = make_steps
elif fault == "sigterm":  # SIGTERM at the end of call 7 (steps 25-28), through the CLI's error path
    import signal
    real = step_lib.make_steps
    def make_steps(*a, **k):
        steps = real(*a, **k)
        train, calls = steps.train, [0]
        def counted(it, n):
            out = train(it, n)
            calls[0] += 1
            if calls[0] == 7:
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        steps.train = counted
        return steps
    step_lib.make_steps = make_steps
elif fault in ("log_rewrite", "config_write"):  # inside the atomic write: temp file done, not renamed
    target = {"log_rewrite": "train_log.jsonl", "config_write": "config.json"}[fault]
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith(target):
            die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
elif fault == "checkpoint_write":  # TF wrote ckpt-32's shards to ckpt-32_temp/, before merging them
    from tensorflow.python.checkpoint import functional_saver
    real_merge = functional_saver.gen_io_ops.merge_v2_checkpoints
    def merge(prefixes, destination, *a, **k):
        name = destination.numpy().decode() if hasattr(destination, "numpy") else str(destination)
        if name.endswith("checkpoints/ckpt-32"):
            die()
        return real_merge(prefixes, destination, *a, **k)
    functional_saver.gen_io_ops.merge_v2_checkpoints = merge
with exit_on_user_error():
    trainer.train("cnn_classifier", workdir, "tiny", config["overrides"],
                  config=trainer.TrainConfig(**config["train"]))
""" % {"killed": KILLED}


def _child(fault, workdir, config=CONFIG):
    payload = json.dumps({"train": dataclasses.asdict(config), "overrides": CNN})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-c", _CHILD, fault, str(workdir), payload], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every recovered run must equal bit for bit."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    _train(workdir)
    return {"log": _log(workdir), "weights": _weights(workdir)}


def _assert_like_straight(workdir, straight):
    log = _log(workdir)
    assert [e["step"] for e in log] == list(range(1, CONFIG.steps + 1))  # no step lost or doubled
    assert log == straight["log"]  # JSON keeps float64 reprs: bit for bit
    for a, b in zip(_weights(workdir), straight["weights"]):
        np.testing.assert_array_equal(a, b)


def _one_line(error):
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


# --- faults: kills at exact points, signals, broken files -------------------------------------------------

def test_kill_between_checkpoints_resumes_bit_exact(tmp_path, straight):
    workdir = tmp_path / "run"
    result = _child("between_checkpoints", workdir)
    assert result.returncode == KILLED, result.stderr[-2000:]
    assert _latest_step(workdir) == 16
    lost = _lost(workdir, straight)
    _train(workdir)
    _assert_like_straight(workdir, straight)
    _row("fault", "SIGKILL between checkpoints (in step 25-28; replays <= checkpoint_every)",
         "survived: bit-exact resume", lost)


def test_kill_inside_the_log_rewrite_keeps_the_whole_log(tmp_path, monkeypatch, straight):
    workdir = tmp_path / "run"
    _crash_at_call(monkeypatch, workdir, 8)  # log at 28 lines, checkpoint at 16: the resume rewrites it
    assert len(_log(workdir)) == 28
    before = _saved(workdir)
    result = _child("log_rewrite", workdir)
    assert result.returncode == KILLED, result.stderr[-2000:]
    assert len(_log(workdir)) == 28  # the old log, whole (the probe lost it 2 times in 8)
    lost = _lost(workdir, straight, before)
    _train(workdir)
    _assert_like_straight(workdir, straight)
    _row("fault", "SIGKILL inside the train_log.jsonl rewrite on resume", "survived: log intact", lost)


def test_kill_inside_the_config_write_keeps_config_json(tmp_path, monkeypatch, straight):
    workdir = tmp_path / "run"
    _crash_at_call(monkeypatch, workdir, 8)
    config_before = (workdir / "config.json").read_text()
    before = _saved(workdir)
    result = _child("config_write", workdir)
    assert result.returncode == KILLED, result.stderr[-2000:]
    assert (workdir / "config.json").read_text() == config_before  # not 0 bytes
    lost = _lost(workdir, straight, before)
    _train(workdir)
    _assert_like_straight(workdir, straight)
    assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]  # the temp file was cleaned
    _row("fault", "SIGKILL inside the config.json rewrite on resume", "survived: config.json intact", lost)


def test_kill_inside_a_checkpoint_write_cleans_the_temp_dir_and_resumes(tmp_path, straight):
    workdir = tmp_path / "run"
    result = _child("checkpoint_write", workdir)
    assert result.returncode == KILLED, result.stderr[-2000:]
    ckpt_dir = workdir / "checkpoints"
    assert (ckpt_dir / "ckpt-32_temp").is_dir()  # what TF leaves: its shards, not merged
    assert _latest_step(workdir) == 16
    lost = _lost(workdir, straight)
    _train(workdir)
    assert not [n for n in os.listdir(ckpt_dir) if n.endswith("_temp")]
    _assert_like_straight(workdir, straight)
    _row("fault", "SIGKILL inside a checkpoint write (ckpt-32_temp/ left)",
         "survived: _temp removed on start, bit-exact resume", lost)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_then_stop_and_lose_nothing(tmp_path, monkeypatch, straight, signum):
    workdir = tmp_path / "run"
    handler_before = signal.getsignal(signum)
    with monkeypatch.context() as m:
        _at_call(m, 7, lambda: os.kill(os.getpid(), signum))  # arrives at the end of step 25-28's call
        with pytest.raises(trainer.TrainingInterrupted) as caught:
            _train(workdir)
    message = _one_line(caught.value)
    assert f"stopped by {signal.Signals(signum).name} at step 28" in message and "ckpt-28" in message
    assert _latest_step(workdir) == 28 and len(_log(workdir)) == 28  # nothing to replay
    assert signal.getsignal(signum) == handler_before  # the trainer's handler is gone again
    lost = _lost(workdir, straight)
    _train(workdir)
    _assert_like_straight(workdir, straight)
    _row("fault", f"{signal.Signals(signum).name} mid-run (step 28)",
         "survived: checkpoint at 28, exit, 0 steps replayed", lost)


def test_sigterm_through_the_cli_is_one_line_and_exit_code_2(tmp_path, straight):
    workdir = tmp_path / "run"
    result = _child("sigterm", workdir)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "stopped by SIGTERM at step 28" in errors[0] and "rerun the same command" in errors[0]
    assert "Traceback" not in result.stderr
    lost = _lost(workdir, straight)
    assert _latest_step(workdir) == 28
    _train(workdir)
    _assert_like_straight(workdir, straight)
    _row("fault", "SIGTERM to the train command (step 28)",
         "survived: `error:` line, exit 2, checkpoint at 28, exact resume", lost)


def test_time_based_checkpoints_bound_the_replay_to_one_call(tmp_path, monkeypatch, straight):
    workdir = tmp_path / "run"
    now = [0.0]

    def clock():  # every reading is 10 s later: each call ends more than checkpoint_every_secs later
        now[0] += 10.0
        return now[0]

    monkeypatch.setattr(trainer, "_clock", clock)
    _crash_at_call(monkeypatch, workdir, 8, checkpoint_every_secs=5.0)  # dies in step 29-32's call
    assert _latest_step(workdir) == 28  # a step-based-only run would be back at 16
    lost = _lost(workdir, straight)
    monkeypatch.undo()
    _train(workdir)
    _assert_like_straight(workdir, straight)
    _row("fault", "crash with checkpoint_every_secs elapsed (step 29-32)",
         "survived: replays <= 1 call (4 steps)", lost)


def _partial_run(monkeypatch, workdir):
    """A run stopped at step 36 with checkpoints 16 and 32."""
    _crash_at_call(monkeypatch, workdir, 10)
    assert _latest_step(workdir) == 32


@pytest.mark.parametrize("content", [b"garbage\n", b""], ids=["garbled", "empty"])
def test_unreadable_checkpoint_state_is_an_error_not_a_restart(tmp_path, monkeypatch, straight, content):
    workdir = tmp_path / "run"
    _partial_run(monkeypatch, workdir)
    (workdir / "checkpoints" / "checkpoint").write_bytes(content)
    digest = _digest(workdir)
    with pytest.raises(tfmstep.UserError) as caught:
        _train(workdir)
    message = _one_line(caught.value)
    assert "checkpoints/checkpoint cannot be read" in message and "--restore_from=ckpt-32" in message
    assert _digest(workdir) == digest  # nothing changed: no restart from 0, no overwritten checkpoint
    _train(workdir, restore_from="ckpt-32")  # the way out the message names
    _assert_like_straight(workdir, straight)
    _row("fault", f"{'garbled' if content else 'empty'} checkpoints/checkpoint",
         "survived: error names --restore_from, then exact resume", 0)


def test_unreadable_newest_checkpoint_names_an_older_one(tmp_path, monkeypatch, straight):
    workdir = tmp_path / "run"
    _partial_run(monkeypatch, workdir)
    data = next(p for p in (workdir / "checkpoints").iterdir() if p.name.startswith("ckpt-32.data"))
    data.write_bytes(b"garbage" * 10)
    digest = _digest(workdir)
    with pytest.raises(tfmstep.UserError) as caught:
        _train(workdir)
    message = _one_line(caught.value)
    assert "ckpt-32 is corrupt" in message and "--restore_from=ckpt-16" in message
    assert _digest(workdir) == digest
    _train(workdir, restore_from="ckpt-16")
    _assert_like_straight(workdir, straight)
    _row("fault", "newest checkpoint's data file garbled",
         "survived: error names ckpt-16, then exact resume", 0)


def test_empty_config_json_says_how_to_recover(tmp_path, monkeypatch, straight):
    workdir = tmp_path / "run"
    _partial_run(monkeypatch, workdir)
    (workdir / "config.json").write_bytes(b"")
    digest = _digest(workdir)
    with pytest.raises(tfmstep.UserError) as caught:
        _train(workdir)
    message = _one_line(caught.value)
    assert "config.json" in message and "remove it and rerun the same command" in message
    assert _digest(workdir) == digest
    (workdir / "config.json").unlink()
    _train(workdir)
    _assert_like_straight(workdir, straight)
    _row("fault", "0-byte config.json", "survived: error says remove it and rerun; exact resume", 0)


def test_torn_last_log_line_is_dropped_on_resume(tmp_path, monkeypatch, straight):
    workdir = tmp_path / "run"
    _partial_run(monkeypatch, workdir)
    before = _saved(workdir)
    with open(workdir / "train_log.jsonl", "a") as f:
        f.write('{"step": 37, "lo')  # a kill in the middle of an append
    lost = _lost(workdir, straight, before)
    _train(workdir)
    _assert_like_straight(workdir, straight)
    _row("fault", "torn last line in train_log.jsonl", "survived: dropped, exact resume", lost)


def test_disk_full_while_checkpointing_is_one_line_and_removes_the_partial_files(tmp_path, monkeypatch,
                                                                                   straight):
    from tensorflow.python.checkpoint import functional_saver

    workdir = tmp_path / "run"
    real_merge = functional_saver.gen_io_ops.merge_v2_checkpoints

    def disk_full(prefixes, destination, *args, **kwargs):
        path = destination.numpy().decode() if hasattr(destination, "numpy") else str(destination)
        if path.endswith("checkpoints/ckpt-32"):  # the shards are in ckpt-32_temp/; merging runs out
            open(path + ".index", "wb").close()  # the 0-byte index the probe saw
            raise tf.errors.ResourceExhaustedError(None, None, f"{path}.index; No space left on device")
        return real_merge(prefixes, destination, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(functional_saver.gen_io_ops, "merge_v2_checkpoints", disk_full)
        with pytest.raises(tfmstep.UserError) as caught:
            _train(workdir)
    message = _one_line(caught.value)
    assert "cannot write checkpoint" in message and "No space left" in message and "ckpt-16" in message
    assert not [n for n in os.listdir(workdir / "checkpoints") if n.startswith("ckpt-32")]
    lost = _lost(workdir, straight)
    _train(workdir)
    _assert_like_straight(workdir, straight)
    _row("fault", "disk full while writing a checkpoint",
         "survived: one line, partial ckpt-32 files removed, exact resume", lost)


def _read_only(monkeypatch, root):
    """Python-level writes under ``root`` fail as on a read-only mount (root ignores chmod)."""
    root = os.path.abspath(root)
    real_makedirs, real_mkstemp, real_open = os.makedirs, tempfile.mkstemp, open

    def under(path):
        return path is not None and os.path.abspath(os.fspath(path)).startswith(root)

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    def makedirs(path, *args, **kwargs):
        if under(path) and not os.path.isdir(path):
            refuse(path)
        return real_makedirs(path, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):
        if under(dir):
            refuse(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and under(file) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr("builtins.open", open_)


@pytest.mark.parametrize("resumed", [False, True], ids=["new", "resumed"])
def test_read_only_workdir_is_one_line(tmp_path, monkeypatch, straight, resumed):
    workdir = tmp_path / "run"
    if resumed:
        _partial_run(monkeypatch, workdir)
    digest = _digest(workdir) if resumed else None
    with monkeypatch.context() as m:
        _read_only(m, tmp_path)
        with pytest.raises(tfmstep.UserError) as caught:
            _train(workdir)
    message = _one_line(caught.value)
    assert "Read-only file system" in message and str(workdir) in message
    if resumed:
        assert _digest(workdir) == digest
        _train(workdir)
        _assert_like_straight(workdir, straight)
    else:
        assert not workdir.exists()
    _row("bad input", f"read-only workdir ({'resumed' if resumed else 'new'} run)", "clear error", 0)


def test_nan_guard_keeps_the_best_and_the_last_finite_checkpoint_and_says_which(tmp_path, monkeypatch):
    """The probe's case: the last finite checkpoint held a loss of 1e18. The losses the loop sees are
    scaled deterministically: x1e18 from step 17 on (finite, so steps 24 and 32 are checkpointed), NaN in
    steps 33-36."""
    workdir = tmp_path / "run"

    def exploding(call, out):
        out = dict(out)
        if call >= 5:
            out["loss"] = out["loss"] * (float("nan") if call == 9 else 1e18)
        return out

    config = dataclasses.replace(CONFIG, checkpoint_every=8)
    with monkeypatch.context() as m:
        _after_each_call(m, exploding)
        with pytest.raises(trainer.TrainingDiverged) as caught:
            _train(workdir, config)
    message = _one_line(caught.value)
    assert "loss became nan at step 33" in message
    assert "last good checkpoint (" in message and "ckpt-32, smoothed train loss" in message
    assert "rerunning the same command restores it" in message
    best = json.loads((workdir / "checkpoints" / "best" / "best.json").read_text())
    assert best["step"] in (8, 16) and best["smoothed_train_loss"] < 10  # before the 1e18 losses
    assert ("best one so far" in message and f"step {best['step']}" in message
            and "--restore_from=best" in message)
    restored = _train(workdir, dataclasses.replace(config, steps=best["step"]), restore_from="best")
    assert restored["step"] == best["step"]
    assert [e["step"] for e in _log(workdir)] == list(range(1, best["step"] + 1))
    _row("fault", "loss 1e18 from step 17, NaN at step 33",
         "survived: last finite (ckpt-32) + best (lowest smoothed loss) kept, message says which a rerun "
         "restores", 0)


# --- bad inputs: one line naming the file, the field and the value; nothing written ------------------------

def _npz(tmp_path, name, **arrays):
    rng = np.random.default_rng(0)
    base = dict(x_train=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), y_train=np.arange(40) % 4,
                x_test=rng.integers(0, 255, (12, 8, 8), dtype=np.uint8), y_test=np.arange(12) % 4)
    base.update(arrays)
    base = {k: v for k, v in base.items() if v is not None}
    path = tmp_path / f"{name}.npz"
    np.savez(path, **base)
    return str(path)


BAD_INPUTS = {
    "num_classes=0": (lambda p: dict(num_classes=0), "num_classes must be >= 1"),
    "num_classes=3 on digits (labels up to 9)": (lambda p: dict(num_classes=3),
                                                 "y_train[11] = 9 but num_classes=3"),
    "negative label in .npz": (lambda p: dict(dataset="npz", data_file=_npz(
        p, "neg", y_train=np.r_[np.arange(39) % 4, -1])), "y_train[39] = -1"),
    "empty .npz": (lambda p: dict(dataset="npz", data_file=_npz(
        p, "empty", x_train=np.zeros((0, 8, 8), np.uint8), y_train=np.zeros(0, np.int64))),
        "x_train/y_train are empty"),
    ".npz labels 50-59 (a 60-class head)": (lambda p: dict(dataset="npz", data_file=_npz(
        p, "offset", y_train=50 + np.arange(40) % 10, y_test=50 + np.arange(12) % 10)),
        "head would have 60 outputs"),
    ".npz float pixels 0..255": (lambda p: dict(dataset="npz", data_file=_npz(
        p, "float", x_train=np.full((40, 8, 8), 200.0))), "float images must be in [0, 1]"),
    ".npz missing y_test": (lambda p: dict(dataset="npz", data_file=_npz(p, "partial", y_test=None)),
                            "y_test"),
    "image_shape with 2 channels": (lambda p: dict(image_shape=(8, 8, 2)), "asks for 2"),
    "mistyped TFDS name": (lambda p: dict(dataset="cifar01"), "unknown TFDS dataset 'cifar01'"),
    "missing .npz file": (lambda p: dict(dataset="npz", data_file=str(p / "none.npz")),
                          "data file not found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_image_data_is_one_line_and_writes_nothing(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    overrides = {**CNN, **make(tmp_path)}
    workdir = tmp_path / "run"
    with pytest.raises(tfmstep.UserError) as caught:
        _train(workdir, overrides=overrides)
    assert expected in _one_line(caught.value)
    assert not workdir.exists()  # nothing written: the corrected command is not refused later
    _row("bad input", case, "clear error")


def test_a_typo_in_text_file_does_not_lock_the_workdir(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200)))
    workdir = str(tmp_path / "run")
    config = trainer.TrainConfig(steps=2, batch_size=4, eval_batches=1, checkpoint_every=2, steps_per_call=2,
                                 jit_compile=False)
    with pytest.raises(tfmstep.UserError) as caught:
        trainer.train("lstm_lm", workdir, "tiny", {"text_file": str(tmp_path / "corpsu.txt")}, config=config)
    assert "text file not found" in _one_line(caught.value)
    assert not os.path.exists(os.path.join(workdir, "config.json"))
    metrics = trainer.train("lstm_lm", workdir, "tiny", {"text_file": str(text)}, config=config)
    assert metrics["step"] == 2  # the corrected command runs in the same workdir
    with pytest.raises(tfmstep.UserError) as caught:  # a sequence longer than the text allows
        trainer.train("lstm_lm", str(tmp_path / "other"), "tiny", {"text_file": str(text), "seq_len": 20000},
                      config=config)
    assert "seq_len=20000" in _one_line(caught.value)
    _row("bad input", "typo in --config=text_file, then the corrected command",
         "clear error; corrected command runs")
    _row("bad input", "seq_len longer than the text", "clear error")


def test_a_workdir_of_another_config_is_refused_untouched(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    _partial_run(monkeypatch, workdir)
    digest = _digest(workdir)
    with pytest.raises(tfmstep.UserError) as caught:
        _train(workdir, overrides={**CNN, "dropout": 0.3})
    assert "holds a run with overrides" in _one_line(caught.value)
    with pytest.raises(tfmstep.UserError) as caught:
        _train(workdir, restore_from="ckpt-99")
    assert "there is no checkpoint" in _one_line(caught.value)
    assert _digest(workdir) == digest
    _row("bad input", "workdir of another config", "clear error")
    _row("bad input", "--restore_from of a missing checkpoint", "clear error")


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    fileio.atomic_write_json(str(path), {"old": 1})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(tfmstep.UserError, match="No space left on device.*untouched"):
        fileio.atomic_write_json(str(path), {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]  # no temp file left
    _row("fault", "disk full while rewriting a JSON file", "survived: old file intact, one line", 0)


def test_a_figure_saved_atomically_is_the_png_savefig_writes_and_a_failed_save_keeps_the_old_one(tmp_path,
                                                                                                  monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    path, direct = tmp_path / "curve.png", tmp_path / "direct.png"
    fileio.atomic_save_figure(fig, str(path), dpi=50)
    fig.savefig(direct, dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size == direct.stat().st_size
    old = path.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(tfmstep.UserError, match="No space left.*untouched"):
        fileio.atomic_save_figure(fig, str(path), dpi=50)
    plt.close(fig)
    assert path.read_bytes() == old and sorted(os.listdir(tmp_path)) == ["curve.png", "direct.png"]

"""The programs: every main is a console script over tfmstep.cli, tools/*.py are shims of them, and bad
input ends a program with one ``error: ...`` line and exit code 2."""

import ast
import configparser
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _console_scripts() -> dict:
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines)


SCRIPTS = _console_scripts()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_is_a_run_function_of_a_cli_module(script):
    module_name, function = SCRIPTS[script].split(":")
    assert module_name.startswith("tfmstep.cli.") and function == "run"
    # Read, not imported: every main defines its absl flags globally, so two mains clash in one process.
    spec = importlib.util.find_spec(module_name)
    assert spec is not None, f"{script}: no module {module_name}"
    with open(spec.origin) as f:
        tree = ast.parse(f.read())
    assert any(isinstance(node, ast.FunctionDef) and node.name == function for node in tree.body)


SHIMS = {"train.py": "train", "generate.py": "generate", "ngram_baseline.py": "ngram_baseline",
         "benchmark.py": "benchmark", "profile_step.py": "profile", "export.py": "export",
         "evaluate.py": "evaluate"}


@pytest.mark.parametrize("shim", sorted(SHIMS))
def test_tools_script_is_a_shim_of_its_console_script(shim):
    with open(os.path.join(ROOT, "tools", shim)) as f:
        code = [line for line in f.read().split('"""')[-1].splitlines() if line.strip()]
    assert code == [f"from tfmstep.cli.{SHIMS[shim]} import run", 'if __name__ == "__main__":', "    run()"]
    assert f"tfmstep.cli.{SHIMS[shim]}:run" in SCRIPTS.values()


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


@pytest.mark.parametrize("module,args,message", [
    ("tfmstep.cli.benchmark", ["--sections=training", "--models=nope"], "error: unknown model 'nope'"),
    ("tfmstep.cli.profile", ["--models=nope"], "error: unknown model 'nope'"),
    ("tfmstep.cli.ngram_baseline", ["--preset=nope"], "error: unknown preset 'nope'"),
    ("tfmstep.cli.export", ["--model=nope"], "error: unknown model 'nope'"),
    ("tfmstep.cli.evaluate", [], "error: give at least one --workdirs entry"),
    ("tfmstep.cli.evaluate", ["--workdirs=chain_parity", "--config=width=32"],
     "error: --config=width cannot change at evaluation"),
    ("tfmstep.cli.generate", ["--workdir=cnn_digits"],
     "error: cnn_digits holds a cnn_classifier model, which does not generate text"),
    ("tfmstep.cli.generate", ["--workdir=lstm_stdlib_subword", "--decoder=nucleus"], "error: unknown decoder"),
    ("tfmstep.cli.train", ["--model=chain_transformer", "--preset=tiny", "--workdir=/nonexistent/run",
                           "--steps=5", "--restore_from=ckpt-3"], "error: "),
])
def test_bad_input_is_one_error_line_and_exit_2(module, args, message):
    result = _run(module, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]


def test_ngram_baseline_on_the_tiny_lm_corpus(tmp_path):
    out = tmp_path / "ngram.json"
    result = _run("tfmstep.cli.ngram_baseline", "--preset=tiny", "--max_order=2", f"--output={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "best: order" in result.stdout and out.exists()


def test_train_help_lists_its_own_flags_models_presets_and_fields():
    result = _run("tfmstep.cli.train", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("--recipe", "--[no]allow_fallback", "--workdir", "cnn_classifier", "presets: cifar10, default, tiny",
                 "dropout: float = 0.1"):
        assert text in result.stdout, text
    assert "--xla_" not in result.stdout and "--tt_" not in result.stdout  # not TensorFlow's flags


_CHECK_WITHOUT_TF = """
import importlib, sys
program = sys.argv[1]
sys.argv = [program, *sys.argv[2:]]
try:
    importlib.import_module("tfmstep.cli." + program).run()
except SystemExit as e:
    print("exit", e.code, "tensorflow imported:", "tensorflow" in sys.modules)
"""


@pytest.mark.parametrize("program,args,message", [
    ("train", [], "error: flag --workdir=None: Flag --workdir must have a value"),
    ("train", ["--workdir=/tmp/x", "--steps=-3"], "error: flag --steps=-3"),
    ("train", ["--workdir=/tmp/x", "--stepz=3"], "error: Unknown command line flag 'stepz'"),
    ("train", ["--recipe=nope"], "error: unknown recipe 'nope'; recipes: "),
    ("generate", ["--workdir=x", "--top_p=2"], "error: flag --top_p=2"),
    ("benchmark", ["--repeats=0"], "error: flag --repeats=0"),
    ("profile", ["--calls=0"], "error: flag --calls=0"),
    ("ngram_baseline", ["--bogus=1"], "error: Unknown command line flag 'bogus'"),
    ("export", ["--bogus=1"], "error: Unknown command line flag 'bogus'"),
    ("evaluate", ["--bogus=1"], "error: Unknown command line flag 'bogus'"),
    ("serve", ["--bogus=1"], "error: Unknown command line flag 'bogus'"),
])
def test_a_bad_flag_fails_before_tensorflow_is_imported(program, args, message):
    result = subprocess.run([sys.executable, "-c", _CHECK_WITHOUT_TF, program, *args], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert result.stdout.strip() == "exit 2 tensorflow imported: False", result.stdout

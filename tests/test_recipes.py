"""Every recipe in models/ parses against the training program's current flags and its model's config.

A recipe is a flagfile whose header names its command (``# Command: ... --flagfile=models/<it>.flags``);
a flagfile without one is an include (``--flagfile=`` nests) and must be included by some recipe.
"""

import copy
import glob
import os
import re

import pytest
from absl import flags

import tfmstep
from tfmstep import registry
from tfmstep.cli import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "models", "*.flags")))
COMMAND = re.compile(r"^# Command: .*--flagfile=(\S+)", re.MULTILINE)


def _command_target(path):
    with open(os.path.join(ROOT, path)) as f:
        match = COMMAND.search(f.read())
    return match.group(1) if match else None


RECIPES = [p for p in FLAGFILES if _command_target(p)]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # nested --flagfile paths are relative to the working directory, as in the README


def _parse(path):
    """The recipe's flags, includes expanded, parsed by a copy of the training program's flags."""
    args = flags.FLAGS.read_flags_from_files([f"--flagfile={path}"], force_gnu=True)
    values = copy.deepcopy(flags.FLAGS)
    values.unparse_flags()
    values(["tfmstep-train", *args])
    return args, values


def test_models_folder_has_recipes():
    assert RECIPES and all(p.startswith("models/") for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_parses_against_the_flags_and_its_model_config(path, in_repo):
    assert _command_target(path) == path, "the header's command must run this recipe"
    _, values = _parse(path)
    assert values.model in tfmstep.list_models()
    config = tfmstep.get_config(values.model, values.preset, **registry.parse_overrides(values.config))
    assert config is not None
    train_config = train_cli.train_config_from_flags(values)
    assert train_config.steps >= 1 and values.workdir


@pytest.mark.parametrize("path", sorted(set(FLAGFILES) - set(RECIPES)))
def test_include_is_included_by_a_recipe(path, in_repo):
    included = set()
    for recipe in RECIPES:
        with open(recipe) as f:
            included |= set(re.findall(r"^--flagfile=(\S+)", f.read(), re.MULTILINE))
    assert path in included, f"{path} has no '# Command:' header and no recipe includes it"


def test_a_mistyped_flag_or_config_field_fails_the_parse(tmp_path, in_repo):
    bad_flag = tmp_path / "bad_flag.flags"
    bad_flag.write_text("--flagfile=models/cnn_digits.flags\n--stepz=3\n")
    with pytest.raises(flags.Error, match="stepz"):
        _parse(str(bad_flag))
    bad_field = tmp_path / "bad_field.flags"
    bad_field.write_text("--flagfile=models/cnn_digits.flags\n--config=dropuot=0.1\n")
    _, values = _parse(str(bad_field))
    with pytest.raises(tfmstep.UserError, match="dropuot"):
        tfmstep.get_config(values.model, values.preset, **registry.parse_overrides(values.config))

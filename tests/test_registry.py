"""The registry: lookup, presets, overrides and their errors."""

import ast
import dataclasses

import pytest

import tfmstep
from tfmstep import registry


def test_list_models_includes_every_family():
    assert "cnn_classifier" in tfmstep.list_models()


def test_unknown_model_error_lists_registered_models():
    with pytest.raises(tfmstep.UserError, match=r"unknown model 'nope'.*cnn_classifier"):
        tfmstep.build("nope")


def test_unknown_override_error_lists_valid_fields():
    with pytest.raises(tfmstep.UserError, match=r"unknown config field 'depthh'.*dropout"):
        tfmstep.get_config("cnn_classifier", depthh=3)


def test_unknown_preset_is_rejected():
    with pytest.raises(tfmstep.UserError, match="unknown preset 'huge'"):
        tfmstep.get_config("cnn_classifier", "huge")


@pytest.mark.parametrize("field,value", [("dropout", "lots"), ("convs_per_stage", 2.5),
                                         ("augment", "maybe"), ("filters", "8,x")])
def test_ill_typed_override_is_rejected(field, value):
    with pytest.raises(tfmstep.UserError, match=f"bad value .* for '{field}'"):
        tfmstep.get_config("cnn_classifier", **{field: value})


def test_config_validation_rejects_bad_choice():
    with pytest.raises(tfmstep.UserError, match="bad norm 'layer'"):
        tfmstep.get_config("cnn_classifier", norm="layer")


def test_command_line_strings_are_coerced_by_field_type():
    overrides = registry.parse_overrides(["filters=16,32", "dropout=0.25", "augment=true",
                                          "image_shape=None", "num_classes=7"])
    config = tfmstep.get_config("cnn_classifier", **overrides)
    assert config.filters == (16, 32) and config.dropout == 0.25 and config.augment is True
    assert config.image_shape is None and config.num_classes == 7


def test_malformed_override_item_is_rejected():
    with pytest.raises(tfmstep.UserError, match="expected key=value"):
        registry.parse_overrides(["dropout"])


@dataclasses.dataclass(frozen=True)
class _UnionConfig:  # PEP 604 unions (``int | None``), which typing.get_origin reports as types.UnionType
    limit: int | None = None
    rate: float | None = 0.5
    shape: tuple[int, ...] | None = None


@pytest.fixture
def union_family(isolated_registry):
    """A toy family registered for one test only (the real registry is restored afterwards)."""
    registry.register("toy_unions", config_class=_UnionConfig, loss=None, dataset=None,
                      presets={"capped": {"limit": 3}})(lambda config: config)
    return "toy_unions"


def test_pep604_union_fields_are_coerced_from_strings(union_family):
    config = tfmstep.get_config(union_family, **registry.parse_overrides(
        ["limit=7", "rate=0.25", "shape=2,3"]))
    assert config == _UnionConfig(limit=7, rate=0.25, shape=(2, 3))
    assert tfmstep.get_config(union_family, "capped").limit == 3
    assert tfmstep.get_config(union_family, "capped", limit="none").limit is None
    assert tfmstep.get_config(union_family, rate=None).rate is None


@pytest.mark.parametrize("field,value", [("limit", "many"), ("limit", 2.5), ("rate", "fast"),
                                         ("shape", "2,x")])
def test_pep604_union_fields_reject_ill_typed_values(union_family, field, value):
    with pytest.raises(tfmstep.UserError, match=f"bad value .* for '{field}'"):
        tfmstep.get_config(union_family, **{field: value})


def test_registry_imports_no_family():
    # Families come in through entry points; the registry importing them was an import circle.
    tree = ast.parse(open(registry.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    assert not any(name.startswith("tfmstep.models") for name in imported), imported


def test_every_builtin_family_module_is_an_entry_point():
    import importlib.metadata
    import pkgutil

    import tfmstep.models

    modules = {f"tfmstep.models.{m.name}" for m in pkgutil.iter_modules(tfmstep.models.__path__)}
    entry_points = importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
    assert {ep.value for ep in entry_points} == modules
    assert {ep.name for ep in entry_points} == set(registry.list_models())


def test_spec_of_finds_a_family_by_its_config_class(union_family):
    assert registry.spec_of(_UnionConfig).name == union_family
    with pytest.raises(tfmstep.UserError, match="no registered model has the config"):
        registry.spec_of(dict)

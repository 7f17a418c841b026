"""The registry: lookup, presets, overrides and their errors."""

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

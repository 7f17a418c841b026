"""TF-Lite for every registered model x format (tiny presets): builtin ops only, runs with LiteRT, and
agrees with the Keras model on the validation split."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep.errors import UserError
from tfmstep.export import signatures, tflite
from tfmstep.models.lstm_lm import serving as lm_serving

MODELS = tfmstep.list_models()
# fp32 is the same float graph (op-order round-off only); the quantised formats change the numbers, so
# they are held to the family's own loss on validation batches instead.
FP32_MAX_ABS_DIFF = 1e-4
QUANTISED_LOSS_RELATIVE_CHANGE = {"dynamic_range": 0.02, "fp16": 0.01, "int8": 0.05}


@pytest.fixture(scope="module")
def servables():
    cache = {}

    def get(name):
        if name not in cache:
            keras.utils.set_random_seed(0)
            model, config = tfmstep.build(name, "tiny"), tfmstep.get_config(name, "tiny")
            cache[name] = (model, config, signatures.servable(name, model, config))
        return cache[name]

    return get


@pytest.mark.parametrize("fmt", tflite.FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_tflite_uses_builtin_ops_only_and_matches_keras(name, fmt, servables):
    model, config, servable = servables(name)
    flatbuffer = tflite.convert(model, name, config, fmt, servable=servable, representative_examples=16)
    names = tflite.check_builtin_ops(flatbuffer, name)
    assert not [n for n in names if n.startswith("CUSTOM:")]
    assert "WHILE" not in names or name != "lstm_lm"  # LSTMs are unrolled
    report = tflite.compare_with_keras(model, name, config, flatbuffer, servable=servable, max_batches=2)
    keras_loss, lite_loss = report["keras"]["loss"], report["tflite"]["loss"]
    assert np.isfinite(lite_loss)
    if fmt == "fp32":
        assert report["max_abs_diff"] < FP32_MAX_ABS_DIFF, report
        assert report["agreement"] == 1.0, report
    else:
        assert abs(lite_loss - keras_loss) <= QUANTISED_LOSS_RELATIVE_CHANGE[fmt] * abs(keras_loss), report


def test_full_integer_model_takes_and_returns_int8_for_float_inputs(servables):
    model, config, servable = servables("cnn_classifier")
    flatbuffer = tflite.convert(model, "cnn_classifier", config, "int8", servable=servable,
                                representative_examples=16)
    lite = tflite.LiteModel(flatbuffer)
    assert [d["dtype"] for d in lite.input_details.values()] == [np.int8]
    assert [d["dtype"] for d in lite.output_details.values()] == [np.int8]
    fp32 = tflite.convert(model, "cnn_classifier", config, "fp32", servable=servable)
    assert len(flatbuffer) < len(fp32)


def test_select_tf_ops_are_detected_and_refused():
    module = tf.Module()
    module.f = tf.function(lambda text: {"length": tf.strings.length(text)},
                           input_signature=[tf.TensorSpec([None], tf.string)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.f.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    flatbuffer = converter.convert()
    with pytest.raises(UserError, match="FlexStringLength"):
        tflite.check_builtin_ops(flatbuffer, "strings")


def test_unknown_format_fails_with_the_choices(servables):
    model, config, servable = servables("cnn_classifier")
    with pytest.raises(UserError, match="choose from fp32, dynamic_range, fp16, int8"):
        tflite.convert(model, "cnn_classifier", config, "int4", servable=servable)


def test_export_tflite_writes_the_file(tmp_path, servables):
    model, config, servable = servables("cnn_classifier")
    path = tflite.export_tflite(model, "cnn_classifier", config, "fp16", str(tmp_path), servable=servable)
    assert path.endswith("cnn_classifier_fp16.tflite")
    assert open(path, "rb").read(8)[4:8] == b"TFL3"  # the flatbuffer file identifier


def test_unrolled_lstm_copy_computes_what_the_model_computes():
    keras.utils.set_random_seed(0)
    model, config = tfmstep.build("lstm_lm", "tiny"), tfmstep.get_config("lstm_lm", "tiny")
    unrolled = lm_serving.unrolled_copy(model, config.seq_len)
    assert all(layer.unroll for layer in unrolled.layers if isinstance(layer, keras.layers.LSTM))
    tokens = np.random.default_rng(0).integers(0, 256, size=(3, config.seq_len)).astype(np.int32)
    np.testing.assert_allclose(unrolled(tokens).numpy(), model(tokens).numpy(), rtol=1e-5, atol=1e-5)


def test_an_lstm_left_as_a_loop_is_refused_with_the_op_name():
    model, config = tfmstep.build("lstm_lm", "tiny"), tfmstep.get_config("lstm_lm", "tiny")
    servable = signatures.servable("lstm_lm", model, config)
    servable.tflite_fn = lambda tokens: {"logits": model(tokens, training=False)}  # not unrolled
    with pytest.raises(UserError, match="no TF-Lite builtin \\(TensorList"):
        tflite.convert(model, "lstm_lm", config, "fp32", servable=servable)

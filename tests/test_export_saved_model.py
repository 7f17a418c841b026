"""TF Serving SavedModels for every registered model (tiny presets): layout, named signatures without XLA,
reloaded outputs equal Keras, warmup records that run, REST bodies, bad requests, atomic versioning."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep.errors import UserError
from tfmstep.export import saved_model, serving, signatures, warmup

MODELS = tfmstep.list_models()
FLOAT_TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # same float32 graph, reloaded: only op-order round-off


def _assert_outputs_equal(actual: dict, expected: dict, where: str):
    assert set(expected) <= set(actual), (where, sorted(actual), sorted(expected))
    for key, want in expected.items():
        got = np.asarray(actual[key])
        want = np.asarray(want)
        assert got.shape == want.shape, (where, key, got.shape, want.shape)
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, want, err_msg=f"{where}/{key}", **FLOAT_TOLERANCE)
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{where}/{key}")


@pytest.mark.parametrize("name", MODELS)
def test_version_directory_has_the_tf_serving_layout(name, exported_tiny):
    _, _, servable, path, _ = exported_tiny(name)
    assert os.path.basename(path) == "1"
    for entry in ("saved_model.pb", "variables/variables.index", "assets", warmup.WARMUP_FILE,
                  saved_model.INFO_FILE):
        assert os.path.exists(os.path.join(path, entry)), entry
    info = json.load(open(os.path.join(path, saved_model.INFO_FILE)))
    assert info["model"] == name and info["signatures"] == sorted(servable.signatures)


def _saved_model_cli_show_all(path, capsys):
    """What `saved_model_cli show --all` prints, run in-process (the CLI itself is checked once below)."""
    from tensorflow.python.tools import saved_model_cli

    capsys.readouterr()
    saved_model_cli._show_all(path)
    return capsys.readouterr().out


def test_saved_model_cli_command_shows_the_signatures(exported_tiny):
    path = exported_tiny("cnn_classifier")[3]
    shown = subprocess.run(["saved_model_cli", "show", "--dir", path, "--all"], capture_output=True,
                           text=True, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).stdout
    assert "signature_def['serving_default']" in shown and "outputs['probabilities']" in shown


@pytest.mark.parametrize("name", MODELS)
def test_saved_model_cli_lists_named_signatures_and_outputs(name, exported_tiny, capsys):
    _, _, _, path, loaded = exported_tiny(name)
    shown = _saved_model_cli_show_all(path, capsys)
    for signature_name, function in loaded.signatures.items():
        assert f"signature_def['{signature_name}']" in shown
        for output_name in function.structured_outputs:
            assert f"outputs['{output_name}']" in shown
    assert "output_0" not in shown
    assert "shape: (-1" in shown  # dynamic batch


@pytest.mark.parametrize("name", MODELS)
def test_serving_functions_carry_no_xla_must_compile(name, exported_tiny):
    assert saved_model.has_xla_must_compile(exported_tiny(name)[3]) == []


def test_xla_must_compile_detector_finds_a_jitted_function(tmp_path):
    module = tf.Module()
    module.f = tf.function(lambda x: x * 2.0, jit_compile=True,
                           input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.f})
    assert saved_model.has_xla_must_compile(str(tmp_path))


@pytest.mark.parametrize("name", MODELS)
def test_reloaded_signatures_give_the_keras_outputs(name, exported_tiny):
    _, _, servable, _, loaded = exported_tiny(name)
    for signature_name, inputs in servable.warmup_inputs.items():
        outputs = loaded.signatures[signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        expected = servable.keras_reference(signature_name, inputs)
        _assert_outputs_equal({k: v.numpy() for k, v in outputs.items()}, expected, signature_name)


@pytest.mark.parametrize("name", MODELS)
def test_generic_default_path_exports_any_model(name, tmp_path):
    """The path a newly registered family gets before it registers a ``servable`` hook."""
    keras.utils.set_random_seed(0)
    model, config = tfmstep.build(name, "tiny"), tfmstep.get_config(name, "tiny")
    generic = signatures.generic_servable(name, model, config)
    path = saved_model.export_saved_model(model, name, config, str(tmp_path), servable=generic)
    loaded = tf.saved_model.load(path)
    inputs = generic.warmup_inputs["serving_default"]
    outputs = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in inputs.items()})
    assert not any(key.startswith("output_") for key in outputs)
    _assert_outputs_equal({k: v.numpy() for k, v in outputs.items()},
                          {k: np.asarray(v) for k, v in generic.keras_reference("serving_default", inputs).items()},
                          "generic")


@pytest.mark.parametrize("name", MODELS)
def test_warmup_file_parses_as_prediction_logs_that_run(name, exported_tiny):
    _, _, servable, path, loaded = exported_tiny(name)
    requests = warmup.read_warmup_requests(os.path.join(path, warmup.WARMUP_FILE))
    assert [s for s, _ in requests] == list(servable.warmup_inputs)
    results = saved_model.run_warmup_requests(path, loaded)
    for signature_name, outputs in results.items():
        assert set(outputs) == set(loaded.signatures[signature_name].structured_outputs)


@pytest.mark.parametrize("name", MODELS)
def test_rest_json_body_round_trips_through_the_default_signature(name, exported_tiny):
    _, _, servable, _, loaded = exported_tiny(name)
    signature = loaded.signatures["serving_default"]
    inputs = servable.warmup_inputs.get("serving_default") or next(iter(servable.warmup_inputs.values()))
    expected = {k: v.numpy() for k, v in signature(**{k: tf.constant(v) for k, v in inputs.items()}).items()}
    as_json = {k: (v.tolist() if v.dtype != object else [s.decode() for s in v]) for k, v in inputs.items()}
    if len(as_json) == 1:
        row_body = {"instances": next(iter(as_json.values()))}
    else:
        batch = len(next(iter(as_json.values())))
        row_body = {"instances": [{k: v[i] for k, v in as_json.items()} for i in range(batch)]}
    columnar_body = {"inputs": as_json}
    row = json.loads(json.dumps(serving.predict_rest(signature, json.dumps(row_body))))
    columnar = json.loads(json.dumps(serving.predict_rest(signature, json.dumps(columnar_body))))
    for key, want in expected.items():
        got_columnar = np.asarray(columnar["outputs"][key])
        if len(expected) == 1:
            got_row = np.asarray(row["predictions"])
        else:
            got_row = np.asarray([p[key] for p in row["predictions"]])
        for got in (got_columnar, got_row):
            if want.dtype.kind == "f":
                np.testing.assert_allclose(got, want, **FLOAT_TOLERANCE)
            elif want.dtype == object:  # string outputs come back from JSON as text
                np.testing.assert_array_equal(got, np.vectorize(bytes.decode)(want))
            else:
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", MODELS)
def test_bad_requests_fail_with_a_clear_error(name, exported_tiny):
    _, _, servable, _, loaded = exported_tiny(name)
    signature = loaded.signatures["serving_default"]
    specs = serving.signature_inputs(signature)
    input_name, spec = sorted(specs.items())[0]
    good = {k: v for k, v in servable.warmup_inputs["serving_default"].items()} \
        if "serving_default" in servable.warmup_inputs else next(iter(servable.warmup_inputs.values()))
    good = {k: (v.tolist() if v.dtype != object else [s.decode() for s in v]) for k, v in good.items()}

    wrong_dtype = [[["x"]]] if spec.dtype != tf.string else [[1.5, 2.5]]
    with pytest.raises(serving.BadRequest, match=f"input '{input_name}' must be"):
        serving.parse_rest_request({"inputs": dict(good, **{input_name: wrong_dtype})}, signature)
    with pytest.raises(serving.BadRequest, match=f"input '{input_name}' must have rank {spec.shape.rank}"):
        serving.parse_rest_request({"inputs": dict(good, **{input_name: [good[input_name]]})}, signature)
    with pytest.raises(serving.BadRequest, match="empty batch"):
        serving.parse_rest_request({"instances": []}, signature)
    with pytest.raises(serving.BadRequest, match="empty batch"):
        serving.parse_rest_request({"inputs": dict(good, **{input_name: []})}, signature)
    with pytest.raises(serving.BadRequest, match="unknown: nonsense"):
        serving.parse_rest_request({"inputs": dict(good, nonsense=[1])}, signature)
    # The signature itself (what TF Serving runs) refuses an empty batch with the same words.
    empty = {k: tf.zeros([0] + [d or 1 for d in s.shape.as_list()[1:]], s.dtype) for k, s in specs.items()}
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty batch"):
        signature(**empty)


@pytest.mark.parametrize("name", [n for n in MODELS if n == "lstm_lm"])
def test_generate_signature_rejects_bad_arguments(name, exported_tiny):
    _, _, _, _, loaded = exported_tiny(name)
    generate = loaded.signatures["generate"]
    with pytest.raises(serving.BadRequest, match="input 'beam_width' must be one of 1, 2, 4, 8, got 3"):
        serving.predict_rest(generate, {"inputs": {"text": ["def "], "max_length": 4, "beam_width": 3}})
    with pytest.raises(serving.BadRequest, match=r"input 'max_length' must be in \[1, 1024\], got 0"):
        serving.predict_rest(generate, {"inputs": {"text": ["def "], "max_length": 0, "beam_width": 1}})
    with pytest.raises(serving.BadRequest, match="at least 1 byte"):
        serving.predict_rest(generate, {"inputs": {"text": ["def ", ""], "max_length": 4, "beam_width": 1}})
    body = {"signature_name": "generate", "inputs": {"text": ["def ", "x"], "max_length": 5, "beam_width": 4}}
    reply = serving.predict_rest(loaded, json.dumps(body))  # picked by signature_name, as the server does
    assert np.asarray(reply["outputs"]["tokens"]).shape == (2, 5)
    assert [len(t) for t in reply["outputs"]["tokens"]] == [5, 5]
    with pytest.raises(serving.BadRequest, match="unknown signature_name 'nope'"):
        serving.predict_rest(loaded, {"signature_name": "nope", "inputs": {"text": ["a"]}})


def test_versions_increase_and_old_ones_are_kept(tmp_path):
    model, config = tfmstep.build("cnn_classifier", "tiny"), tfmstep.get_config("cnn_classifier", "tiny")
    first = saved_model.export_saved_model(model, "cnn_classifier", config, str(tmp_path))
    second = saved_model.export_saved_model(model, "cnn_classifier", config, str(tmp_path))
    assert [os.path.basename(first), os.path.basename(second)] == ["1", "2"]
    assert saved_model.list_versions(str(tmp_path / "cnn_classifier")) == [1, 2]
    assert os.path.exists(os.path.join(first, "saved_model.pb"))
    with pytest.raises(UserError, match="version 2 of cnn_classifier already exists"):
        saved_model.export_saved_model(model, "cnn_classifier", config, str(tmp_path), version=2)
    seventh = saved_model.export_saved_model(model, "cnn_classifier", config, str(tmp_path), version=7)
    assert os.path.basename(seventh) == "7"


def test_a_failure_during_export_leaves_no_version_directory(tmp_path, monkeypatch):
    model, config = tfmstep.build("cnn_classifier", "tiny"), tfmstep.get_config("cnn_classifier", "tiny")
    saved_model.export_saved_model(model, "cnn_classifier", config, str(tmp_path))

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure while writing warmup requests")

    monkeypatch.setattr(saved_model, "_write_warmup", fail)
    with pytest.raises(RuntimeError, match="injected"):
        saved_model.export_saved_model(model, "cnn_classifier", config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "cnn_classifier")) == ["1"]  # no "2", no temp directory
    assert os.path.exists(tmp_path / "cnn_classifier" / "1" / "saved_model.pb")


def test_a_killed_export_leaves_nothing_tf_serving_would_load(tmp_path, repo_root):
    script = textwrap.dedent(f"""
        import os, signal
        import tfmstep
        from tfmstep.export import saved_model
        # SIGKILL just before the rename: everything is written except the version directory itself.
        saved_model._rename_to_next_version = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        model, config = tfmstep.build("cnn_classifier", "tiny"), tfmstep.get_config("cnn_classifier", "tiny")
        saved_model.export_saved_model(model, "cnn_classifier", config, {str(tmp_path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == -9, result.stderr[-2000:]
    model_dir = tmp_path / "cnn_classifier"
    leftovers = os.listdir(model_dir)
    assert saved_model.list_versions(str(model_dir)) == []
    assert leftovers and all(n.startswith(saved_model.TEMP_PREFIX) for n in leftovers)
    # The next export cleans up after the dead process and writes version 1.
    model, config = tfmstep.build("cnn_classifier", "tiny"), tfmstep.get_config("cnn_classifier", "tiny")
    saved_model.export_saved_model(model, "cnn_classifier", config, str(tmp_path))
    assert os.listdir(model_dir) == ["1"]


def test_bad_export_arguments_fail_with_one_line(tmp_path):
    model, config = tfmstep.build("cnn_classifier", "tiny"), tfmstep.get_config("cnn_classifier", "tiny")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        saved_model.export_saved_model(model, "cnn_classifier", config, str(a_file))
    with pytest.raises(UserError, match="positive integer"):
        saved_model.export_saved_model(model, "cnn_classifier", config, str(tmp_path), version=0)
    with pytest.raises(UserError, match="unknown model 'no_such_model'"):
        signatures.servable("no_such_model", model, config)
    from tfmstep import export

    with pytest.raises(UserError, match="unknown export format"):
        export.check_formats(["saved_model", "onnx"])
    with pytest.raises(UserError, match="no export format"):
        export.check_formats([])


@pytest.mark.parametrize("name", [n for n in MODELS if n == "lstm_lm"])
def test_next_token_logits_rejects_an_empty_text(name, exported_tiny):
    _, _, _, _, loaded = exported_tiny(name)
    for _ in range(3):  # the check must win every time, not race the gather it guards
        with pytest.raises(serving.BadRequest, match="at least 1 byte"):
            serving.predict_rest(loaded.signatures["next_token_logits"], {"instances": ["abc", ""]})


def test_lm_byte_codec_in_the_graph_equals_the_training_tokenizer():
    """One byte tokenizer: the serving graph's text <-> tokens is the training ByteTokenizer's, byte for
    byte, also for NUL, non-UTF-8 bytes and characters cut in the middle (what the codec must keep)."""
    from tfmstep.data import text as text_data
    from tfmstep.models.lstm_lm import serving as lm_serving

    tokenizer = text_data.ByteTokenizer()
    texts = [b"def main(\n    return 0", "h\u00e9llo \u2713".encode(), b"\x00\xff\xfe", "\u2713".encode()[:2], b"x"]
    graph_tokens = lm_serving.text_to_tokens(tf.constant(texts)).to_list()
    assert graph_tokens == [tokenizer.encode(t).tolist() for t in texts]
    codec = lm_serving.byte_codec()
    assert codec.encode is not None and codec.decode(tokenizer.encode(texts[2])) == texts[2]
    width = max(len(t) for t in texts)
    padded = np.array([list(t) + [ord("x")] * (width - len(t)) for t in texts], np.int32)
    graph_texts = lm_serving.tokens_to_text(tf.constant(padded)).numpy().tolist()
    assert graph_texts == [tokenizer.decode_bytes(row) for row in padded]

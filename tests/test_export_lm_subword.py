"""TF Serving export of the SentencePiece (subword) LSTM language model: in-graph tokenisation with the
model's own vocabulary, which ships in the version's assets/ and is all the reloaded model needs."""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep import trainer
from tfmstep.data import text as text_data
from tfmstep.export import saved_model, serving, signatures, warmup
from tfmstep.models import lstm_lm

FLOAT_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# 300 is too few for the tiny corpus: it needs 353 (256 byte-fallback pieces + its characters).
VOCAB_SIZE = 400
# Two prompts that tokenise to different lengths, so the batched signatures pad one of them.
PROMPTS = np.array([b"def main(", b"import os\nclass Parser:\n    def parse(self, text):\n"], dtype=object)


def subword_config(vocab_file: str, **overrides):
    return tfmstep.get_config("lstm_lm", "tiny", **{"tokenizer": "sentencepiece", "vocab_size": VOCAB_SIZE,
                                                    "vocab_file": vocab_file, **overrides})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(servable, version_dir, loaded, vocab proto): exported, then the workdir holding the vocabulary
    deleted before the SavedModel is loaded."""
    workdir = tmp_path_factory.mktemp("workdir")
    config = subword_config(str(workdir / "vocab.spm"))
    lstm_lm.tokenized_corpus(config)  # trains the vocabulary on the train split and writes vocab_file
    with open(config.vocab_file, "rb") as f:
        proto = f.read()
    keras.utils.set_random_seed(0)
    model = tfmstep.get_spec("lstm_lm").build(config)
    servable = signatures.servable("lstm_lm", model, config)
    path = saved_model.export_saved_model(model, "lstm_lm", config, str(tmp_path_factory.mktemp("export")),
                                          servable=servable)
    shutil.rmtree(workdir)
    return servable, path, tf.saved_model.load(path), proto


def _call(loaded, signature_name, inputs):
    outputs = loaded.signatures[signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}


def _assert_outputs_equal(actual: dict, expected: dict, where: str):
    for key, want in expected.items():
        got, want = np.asarray(actual[key]), np.asarray(want)
        assert got.shape == want.shape, (where, key, got.shape, want.shape)
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, want, err_msg=f"{where}/{key}", **FLOAT_TOLERANCE)
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{where}/{key}")


def test_vocabulary_ships_in_assets_and_is_the_one_the_graph_tokenises_with(exported):
    _, path, loaded, proto = exported
    with open(os.path.join(path, "assets", "vocab.spm"), "rb") as f:
        assert f.read() == proto
    with open(os.path.join(path, saved_model.INFO_FILE)) as f:
        assert json.load(f)["vocab_asset"] == "assets/vocab.spm"
    # Tracked as an Asset: its path is the copy inside this version, wherever the version is.
    assert loaded.vocab_file.asset_path.numpy().decode() == os.path.join(path, "assets", "vocab.spm")
    from tensorflow.core.protobuf import saved_model_pb2

    graph = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        graph.ParseFromString(f.read())
    embedded = [node.attr["model"].s for meta in graph.meta_graphs
                for function in meta.graph_def.library.function
                for node in function.node_def if node.op == "SentencepieceOp"]
    assert embedded and all(model == proto for model in embedded)


def test_reloaded_signatures_equal_keras_with_the_python_tokenizer(exported):
    servable, _, loaded, proto = exported
    python_tokenizer = text_data.SentencePieceTokenizer(proto)
    lengths = {len(python_tokenizer.encode(prompt)) for prompt in PROMPTS}
    assert len(lengths) == 2 and min(lengths) > 1, lengths
    requests = {"next_token_logits": {"text": PROMPTS}}
    for beam_width in (1, 2):
        requests[f"generate/beam{beam_width}"] = {"text": PROMPTS, "max_length": np.array(6, np.int32),
                                                  "beam_width": np.array(beam_width, np.int32)}
    for where, inputs in requests.items():
        signature_name = where.split("/")[0]
        got = _call(loaded, signature_name, inputs)
        _assert_outputs_equal(got, servable.keras_reference(signature_name, inputs), where)
        if signature_name == "generate":  # the text output is the generated pieces, detokenised
            assert list(got["text"]) == [python_tokenizer.decode(ids).encode() for ids in got["tokens"]]


def test_warmup_requests_are_written_and_run(exported):
    servable, path, loaded, _ = exported
    requests = warmup.read_warmup_requests(os.path.join(path, warmup.WARMUP_FILE))
    assert [name for name, _ in requests] == ["next_token_logits", "generate"]
    results = saved_model.run_warmup_requests(path, loaded)
    for signature_name, outputs in results.items():
        _assert_outputs_equal(outputs, servable.keras_reference(signature_name,
                                                                servable.warmup_inputs[signature_name]),
                              signature_name)


def test_an_empty_text_fails_with_a_clear_error(exported):
    _, _, loaded, _ = exported
    with pytest.raises(serving.BadRequest, match="every text must have at least 1 SentencePiece token"):
        serving.predict_rest(loaded.signatures["next_token_logits"], {"instances": ["abc", ""]})
    with pytest.raises(serving.BadRequest, match="every text must have at least 1 SentencePiece token"):
        serving.predict_rest(loaded, {"signature_name": "generate",
                                      "inputs": {"text": [""], "max_length": 4, "beam_width": 2}})


def test_a_missing_or_mismatched_vocabulary_is_a_clear_error(tmp_path):
    model = tfmstep.build("lstm_lm", "tiny", tokenizer="sentencepiece", vocab_size=VOCAB_SIZE,
                          vocab_file=str(tmp_path / "vocab.spm"))
    missing = subword_config(str(tmp_path / "gone.spm"))
    with pytest.raises(tfmstep.UserError, match="vocabulary .*gone.spm.* is missing"):
        signatures.servable("lstm_lm", model, missing)
    (tmp_path / "junk.spm").write_bytes(b"not a model")
    with pytest.raises(tfmstep.UserError, match="junk.spm is not a SentencePiece model"):
        signatures.servable("lstm_lm", model, subword_config(str(tmp_path / "junk.spm")))
    lstm_lm.tokenized_corpus(subword_config(str(tmp_path / "vocab.spm")))
    other_size = subword_config(str(tmp_path / "vocab.spm"), vocab_size=VOCAB_SIZE + 100)
    with pytest.raises(tfmstep.UserError, match=f"has {VOCAB_SIZE} pieces but the model's vocab_size is"):
        signatures.servable("lstm_lm", model, other_size)


def test_export_tool_exports_a_trained_subword_workdir(tmp_path, repo_root):
    workdir = str(tmp_path / "run")
    trainer.train("lstm_lm", workdir, preset="tiny",
                  overrides=dict(tokenizer="sentencepiece", vocab_size=VOCAB_SIZE,
                                 vocab_file=os.path.join(workdir, "vocab.spm")),
                  config=trainer.TrainConfig(steps=1, batch_size=2, eval_batches=1, checkpoint_every=1))
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, f"{repo_root}/tools/export.py", f"--workdir={workdir}",
                             "--formats=saved_model", f"--export_base={tmp_path / 'export'}",
                             f"--report={report}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    entry = json.loads(report.read_text())["artifacts"]["saved_model"]
    assert entry["reloaded_mismatched_outputs"] == [] and entry["reloaded_max_abs_diff"] < 1e-4
    assert os.listdir(os.path.join(entry["path"], "assets")) == ["vocab.spm"]
    # Moved elsewhere, without the workdir, loaded by a process with only TensorFlow and TF Text's ops
    # (what a model server has): it tokenises, generates and finds its vocabulary in its own assets/.
    moved = str(tmp_path / "moved" / "1")
    shutil.copytree(entry["path"], moved)
    shutil.rmtree(workdir)
    shutil.rmtree(tmp_path / "export")
    script = (f"import tensorflow as tf, tensorflow_text\n"
              f"m = tf.saved_model.load({moved!r})\n"
              f"out = m.signatures['generate'](text=tf.constant(['def ']), max_length=tf.constant(3), "
              f"beam_width=tf.constant(2))\n"
              f"print(out['tokens'].shape, m.vocab_file.asset_path.numpy().decode())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == os.path.join(moved, "assets", "vocab.spm")
    assert "(1, 3)" in result.stdout

"""tfmstep-serve on localhost: KServe's ModelServer over a TF Serving model base (tiny CNN, byte LM and
chain reasoner).

The README's requests over HTTP (classify, next token, generate greedy and beam, chain answers from text
and from tokens), the bad-request table (each a 400 with one line, the server up after all of them), TF
Serving's gRPC Predict and GetModelMetadata, the latest complete version loaded (never a partial or temp
directory), a new version picked up live, a short load test with zero failures; the slow tests: a 30 s
load test against the in-process SavedModel, and a kill -9 mid-load and restart that loses nothing.

  python -m pytest tests/test_serve.py -m slow -k load -s     # the measured table of export/README.md
"""

import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from bad_requests import README_REQUESTS, REST_CASES
from tfmstep.export import saved_model, serving

pytest.importorskip("kserve")

STARTUP_TIMEOUT = 240  # seconds; loading + warmup of three tiny models on a busy 2-core machine
MODELS = ("cnn_classifier", "lstm_lm", "chain_transformer")
NOT_STRICT_JSON = re.compile(r"NaN|Infinity|1e400")  # Python's json takes these, KServe's orjson does not


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, export_base, repo_root, poll_seconds=1.0):
        self.rest_port, self.grpc_port = _free_port(), _free_port()
        self.log = open(os.path.join(export_base, f".server-{self.rest_port}.log"), "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tfmstep.cli.serve", f"--export_base={export_base}",
             f"--rest_api_port={self.rest_port}", f"--grpc_port={self.grpc_port}",
             f"--poll_seconds={poll_seconds}"],
            cwd=repo_root, stdout=self.log, stderr=subprocess.STDOUT,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        deadline = time.time() + STARTUP_TIMEOUT
        while time.time() < deadline:
            assert self.process.poll() is None, open(self.log.name).read()[-3000:]
            try:
                if all(self.get(f"/v1/models/{m}")[0] == 200 for m in MODELS):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError("server did not start:\n" + open(self.log.name).read()[-3000:])

    def request(self, method, path, body=None, connection=None):
        conn = connection or http.client.HTTPConnection("127.0.0.1", self.rest_port, timeout=60)
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
        response = conn.getresponse()
        data = response.read()
        if connection is None:
            conn.close()
        return response.status, json.loads(data) if data else None

    def get(self, path):
        return self.request("GET", path)

    def predict(self, model, body, connection=None):
        return self.request("POST", f"/v1/models/{model}:predict", body, connection)

    def stop(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _export(name, base, version=None):
    keras.utils.set_random_seed(0)
    model, config = tfmstep.build(name, "tiny"), tfmstep.get_config(name, "tiny")
    return saved_model.export_saved_model(model, name, config, str(base), version=version)


@pytest.fixture(scope="module")
def export_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    for name in MODELS:
        _export(name, base)
    # What the server must never load: a partial version (no variables index) with a higher number, and
    # an export in progress.
    partial = base / "cnn_classifier" / "2"
    shutil.copytree(base / "cnn_classifier" / "1", partial)
    os.remove(partial / "variables" / "variables.index")
    temp = base / "lstm_lm" / ".tmp-export-999999-deadbeef"
    shutil.copytree(base / "lstm_lm" / "1", temp)
    return base


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server(export_base):
    running = Server(str(export_base), REPO)
    yield running
    running.stop()


def _version(server, model):
    status, reply = server.get(f"/v1/models/{model}/metadata")
    assert status == 200, reply
    return int(reply["model_spec"]["version"])


def test_serves_the_latest_complete_version_only(server):
    assert _version(server, "cnn_classifier") == 1  # "2" is partial
    assert _version(server, "lstm_lm") == 1
    status, reply = server.get("/v1/models")
    assert status == 200 and sorted(reply["models"]) == sorted(MODELS)
    status, reply = server.get("/v1/models/lstm_lm/metadata")
    assert reply["metadata"]["signature_def"]["generate"]["inputs"]["max_length"] == {"dtype": "int32",
                                                                                      "tensor_shape": []}


@pytest.mark.parametrize("case_id,name,body", README_REQUESTS, ids=[case[0] for case in README_REQUESTS])
def test_readme_requests(case_id, name, body, server, export_base):
    status, reply = server.predict(name, body)
    assert status == 200, reply
    expected = serving.predict_rest(saved_model.load(str(export_base / name / "1")), body)
    if case_id == "classify":
        assert [p["classes"] for p in reply["predictions"]] == [p["classes"] for p in expected["predictions"]]
        np.testing.assert_allclose([p["probabilities"] for p in reply["predictions"]],
                                   [p["probabilities"] for p in expected["predictions"]], rtol=1e-5)
    elif case_id.startswith("generate"):
        assert reply["outputs"]["tokens"] == expected["outputs"]["tokens"]
        assert np.asarray(reply["outputs"]["tokens"]).shape == (1, 40)
    elif case_id.startswith("chain"):
        assert reply["predictions"] == expected["predictions"]
        assert len(reply["predictions"]) == len(body["instances"])
        for prediction in reply["predictions"]:
            assert len(prediction["answers"]) == 1 and prediction["steps_used"] >= 1, prediction
    else:
        assert [p["next_token"] for p in reply["predictions"]] == [p["next_token"] for p in
                                                                   expected["predictions"]]


def test_bad_requests_are_400s_with_one_line_and_the_server_stays_up(server):
    for case_id, name, body, message in REST_CASES:
        status, reply = server.predict(name, body)
        assert status == 400, (case_id, status, reply)
        error = reply["error"]
        assert "\n" not in error, (case_id, error)
        pattern = f"({message}|Unrecognized request format)" if NOT_STRICT_JSON.search(body) else message
        assert re.search(pattern, error), (case_id, error)
    assert server.process.poll() is None
    status, reply = server.predict("cnn_classifier", README_REQUESTS[0][2])
    assert status == 200, reply
    assert server.predict("no_such_model", {"instances": [1]})[0] == 404


def test_grpc_prediction_service(server):
    grpc = pytest.importorskip("grpc")
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "lstm_lm"
    request.model_spec.signature_name = "generate"
    request.inputs["text"].CopyFrom(tf.make_tensor_proto(np.array([b"def main("])))
    request.inputs["max_length"].CopyFrom(tf.make_tensor_proto(5, dtype=tf.int32))
    request.inputs["beam_width"].CopyFrom(tf.make_tensor_proto(4, dtype=tf.int32))
    reply = stub.Predict(request, timeout=60)
    assert tf.make_ndarray(reply.outputs["tokens"]).shape == (1, 5)
    assert reply.model_spec.version.value == 1
    bad = predict_pb2.PredictRequest()
    bad.model_spec.name = "cnn_classifier"
    bad.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros([2, 8, 8], np.float32)))  # rank 3
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(bad, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'images' must have shape [batch, 8, 8, 1], got [2, 8, 8]" in error.value.details()
    chain = predict_pb2.PredictRequest()
    chain.model_spec.name = "chain_transformer"
    chain.model_spec.signature_name = "answer_text"
    chain.inputs["text"].CopyFrom(tf.make_tensor_proto(np.array([b"b=-a+2;a=3;?b"])))
    reply = stub.Predict(chain, timeout=60)
    assert tf.make_ndarray(reply.outputs["answers"]).shape == (1, 1)
    chain.inputs["text"].CopyFrom(tf.make_tensor_proto(np.array(["b=\u00e9;?b".encode()])))
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(chain, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside printable ASCII" in error.value.details() and "\n" not in error.value.details()
    assert server.process.poll() is None


def test_grpc_model_metadata_is_tf_servings_signature_def_map(server, export_base):
    """GetModelMetadata as TF Serving answers it: metadata["signature_def"] packs a SignatureDefMap holding
    the version's own SignatureDefs (those of its saved_model.pb); no or unknown metadata fields are
    INVALID_ARGUMENT, an unknown model NOT_FOUND."""
    grpc = pytest.importorskip("grpc")
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    for name in MODELS:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = name
        reply = stub.GetModelMetadata(request, timeout=60)
        assert reply.model_spec.name == name and reply.model_spec.version.value == _version(server, name)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        assert reply.metadata["signature_def"].Unpack(signatures)
        saved = saved_model_pb2.SavedModel()
        with open(export_base / name / str(reply.model_spec.version.value) / "saved_model.pb", "rb") as f:
            saved.ParseFromString(f.read())
        assert dict(signatures.signature_def) == dict(saved.meta_graphs[0].signature_def), name
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "lstm_lm"
    lm = get_model_metadata_pb2.SignatureDefMap()
    stub.GetModelMetadata(request, timeout=60).metadata["signature_def"].Unpack(lm)
    max_length = lm.signature_def["generate"].inputs["max_length"]
    assert max_length.dtype == tf.int32.as_datatype_enum and len(max_length.tensor_shape.dim) == 0
    assert set(lm.signature_def["generate"].outputs) == {"text", "tokens", "log_prob"}
    for fields, model, code, message in [([], "lstm_lm", grpc.StatusCode.INVALID_ARGUMENT, "at least one"),
                                         (["signature_def", "nope"], "lstm_lm", grpc.StatusCode.INVALID_ARGUMENT,
                                          "'nope' is not supported"),
                                         (["signature_def"], "no_such_model", grpc.StatusCode.NOT_FOUND,
                                          "unknown model")]:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
        request.model_spec.name = model
        with pytest.raises(grpc.RpcError) as error:
            stub.GetModelMetadata(request, timeout=60)
        assert error.value.code() == code and message in error.value.details(), error.value.details()
    assert server.process.poll() is None


# ---------------------------------------------------------------------------------------------------------
# Load.

LOAD_REQUESTS = {
    "cnn_classifier classify (1 image)": ("cnn_classifier", README_REQUESTS[0][2]),
    "lstm_lm next-token (2 texts)": ("lstm_lm", README_REQUESTS[1][2]),
    "lstm_lm generate greedy 16": ("lstm_lm", {"signature_name": "generate",
                                               "inputs": {"text": ["def main("], "max_length": 16,
                                                          "beam_width": 1}}),
    "chain_transformer answer_text (2 problems)": ("chain_transformer", README_REQUESTS[5][2]),
}


def _run_load(call, clients: int, seconds: float) -> dict:
    """``clients`` threads calling ``call(connection_state)`` for ``seconds``: requests/s, p50/p99 (ms),
    failures."""
    latencies, failures, stop = [], [], time.time() + seconds
    lock = threading.Lock()

    def client():
        state = {}
        while time.time() < stop:
            started = time.perf_counter()
            try:
                ok = call(state)
            except Exception as e:  # counted, not raised: the test asserts zero
                ok = repr(e)
            elapsed = time.perf_counter() - started
            with lock:
                (latencies.append(elapsed) if ok is True else failures.append(ok))

    call({})  # untimed: a freshly loaded signature optimises its graph on the first call (the server
    # did it at load, replaying the warmup requests)
    stop = time.time() + seconds
    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.time() - started
    ms = np.asarray(latencies) * 1e3
    return {"requests": len(latencies), "failures": len(failures), "first_failures": failures[:3],
            "requests_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)) if len(ms) else 0.0,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else 0.0}


def _http_call(server, model, body):
    payload = json.dumps(body)

    def call(state):
        if "connection" not in state:
            state["connection"] = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=60)
        status, _ = server.predict(model, payload, state["connection"])
        return True if status == 200 else f"HTTP {status}"

    return call


def _in_process_call(loaded, body):
    signature = loaded.signatures[body.get("signature_name", "serving_default")]
    feeds, _ = serving.parse_rest_request(body, signature)
    tensors = {k: tf.constant(v) for k, v in feeds.items()}

    def call(state):
        signature(**tensors)
        return True

    return call


def _load_table(server, export_base, clients, seconds, in_process=True) -> list:
    rows = []
    for label, (model, body) in LOAD_REQUESTS.items():
        rows.append({"request": label, "path": f"tfmstep-serve REST, {clients} clients",
                     **_run_load(_http_call(server, model, body), clients, seconds)})
        if in_process:
            loaded = saved_model.load(str(export_base / model / str(_version(server, model))))
            rows.append({"request": label, "path": f"SavedModel in-process, {clients} threads",
                         **_run_load(_in_process_call(loaded, body), clients, seconds)})
    print("\n| request | path | requests/s | p50 ms | p99 ms | requests | failed |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['request']} | {r['path']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['requests']} | {r['failures']} |")
    return rows


def test_short_load_has_no_failures(server, export_base):
    rows = _load_table(server, export_base, clients=4, seconds=2.0, in_process=False)
    for row in rows:
        assert row["failures"] == 0 and row["requests"] > 0, row
    assert server.process.poll() is None


@pytest.mark.slow
def test_load_8_clients_30_seconds_against_in_process(server, export_base):
    """The measured table in export/README.md: 8 concurrent clients, 5 s per request type and path (40 s)."""
    rows = _load_table(server, export_base, clients=8, seconds=5.0)
    for row in rows:
        assert row["failures"] == 0 and row["requests"] > 0, row


# ---------------------------------------------------------------------------------------------------------
# Versions while serving; restart.


def test_a_new_version_is_picked_up_live(server, export_base):
    before = server.predict("cnn_classifier", README_REQUESTS[0][2])[1]
    path = _export("cnn_classifier", export_base)  # the next number after the partial "2"
    assert os.path.basename(path) == "3"
    deadline = time.time() + 120
    while _version(server, "cnn_classifier") != 3:
        assert time.time() < deadline, "version 3 was not loaded"
        time.sleep(0.5)
    status, after = server.predict("cnn_classifier", README_REQUESTS[0][2])
    assert status == 200 and after["predictions"][0]["classes"] == before["predictions"][0]["classes"]


@pytest.mark.slow
def test_kill_during_load_and_restart_loses_nothing(export_base):
    """kill -9 in the middle of a load: the model base is untouched (the server only reads it), and a
    restarted server serves the same latest versions with the same answers."""
    first = Server(str(export_base), REPO, poll_seconds=0)
    versions = {m: _version(first, m) for m in MODELS}
    answers = {label: first.predict(model, body)[1] for label, (model, body) in LOAD_REQUESTS.items()}
    files = sorted(os.path.relpath(os.path.join(r, f), export_base) for r, _, fs in os.walk(export_base)
                   for f in fs if not f.startswith(".server-"))
    killer = threading.Timer(1.5, lambda: first.process.send_signal(signal.SIGKILL))
    killer.start()
    load = _run_load(_http_call(first, *LOAD_REQUESTS["lstm_lm next-token (2 texts)"]), 4, 3.0)
    killer.join()
    first.stop()
    assert load["requests"] > 0  # some answered before the kill; the rest failed to connect
    assert files == sorted(os.path.relpath(os.path.join(r, f), export_base) for r, _, fs in
                           os.walk(export_base) for f in fs if not f.startswith(".server-"))
    second = Server(str(export_base), REPO, poll_seconds=0)
    try:
        assert {m: _version(second, m) for m in versions} == versions
        for label, (model, body) in LOAD_REQUESTS.items():
            assert second.predict(model, body)[1] == answers[label], label
    finally:
        second.stop()

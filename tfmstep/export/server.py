"""A real model server over a TF Serving model base, for local use and tests: ``tfmstep-serve``.

  tfmstep-serve --export_base=export/artifacts --rest_api_port=8501 --grpc_port=8500

- REST: KServe's Python ``ModelServer`` (PyPI ``kserve``, the ``[serve]`` extra), whose V1 protocol is TF
  Serving's REST API: ``POST /v1/models/<name>:predict`` with ``instances`` (row) or ``inputs``
  (columnar) and ``signature_name``; ``GET /v1/models/<name>`` (ready), ``GET /v1/models`` and, added
  here as in TF Serving, ``GET /v1/models/<name>/metadata`` (signatures). Bodies are parsed and checked by
  ``tfmstep.export.serving`` (the same code the in-process tests use); a bad request is a 400 with
  ``{"error": "<one line>"}``.
- gRPC: TF Serving's own ``tensorflow.serving.PredictionService`` (the protos of ``tensorflow-serving-api``),
  a thin servicer over the same loaded signatures: ``Predict``, and ``GetModelMetadata`` with TF Serving's
  contract (``metadata_field: "signature_def"`` -> a ``SignatureDefMap`` packed in ``metadata``: the
  version's own ``SignatureDef`` protos, as in its ``saved_model.pb``). KServe's own gRPC (its V2 protocol)
  is switched off.

Each model directory under ``export_base`` serves its highest integer version that is complete
(``saved_model.pb``, and its variables index when it has variables); temp directories of an export in
progress (``.tmp-export-*``) and anything not named by an integer are never loaded. The version's warmup
requests (``assets.extra/tf_serving_warmup_requests``) are replayed at load, as TF Serving does, before the
model is marked ready. With ``poll_seconds`` a newer version exported while the server runs is loaded,
warmed up and swapped in; requests in flight finish on the version they started on.

TF Serving (``tensorflow/serving``) stays the production target; this server answers the same requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import threading
import time
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from tfmstep.errors import UserError
from tfmstep.export import saved_model, serving, warmup


@dataclasses.dataclass
class Version:
    """One loaded version of one model."""

    name: str
    version: int
    path: str
    loaded: Any  # the tf.saved_model.load object
    warmup_requests: int
    signature_defs: dict = dataclasses.field(default_factory=dict)  # {name: SignatureDef proto}


def is_complete(version_dir: str) -> bool:
    """A SavedModel that can be loaded: its graph, and its variables' index when it has variables."""
    if not os.path.isfile(os.path.join(version_dir, "saved_model.pb")):
        return False
    variables = os.path.join(version_dir, "variables")
    return not os.path.isdir(variables) or os.path.isfile(os.path.join(variables, "variables.index"))


def latest_versions(export_base: str) -> dict:
    """{model_name: (version, version_dir)}: each model's highest complete integer version."""
    if not os.path.isdir(export_base):
        raise UserError(f"export_base {export_base} is not a directory (export a model first: "
                        f"tools/export.py --export_base={export_base})")
    found = {}
    for name in sorted(os.listdir(export_base)):
        model_dir = os.path.join(export_base, name)
        if name.startswith(".") or not os.path.isdir(model_dir):
            continue
        for version in reversed(saved_model.list_versions(model_dir)):
            path = os.path.join(model_dir, str(version))
            if is_complete(path):
                found[name] = (version, path)
                break
            logging.warning("Skipping %s: not a complete SavedModel", path)
    return found


def load_version(name: str, version: int, path: str) -> Version:
    """Load one version and replay its warmup requests (a failing warmup request fails the load)."""
    loaded = saved_model.load(path)
    count = 0
    if os.path.exists(os.path.join(path, warmup.WARMUP_FILE)):
        count = len(saved_model.run_warmup_requests(path, loaded))
    logging.info("Loaded %s version %d from %s (%d warmup requests replayed)", name, version, path, count)
    return Version(name, version, path, loaded, count, read_signature_defs(path))


def read_signature_defs(version_dir: str) -> dict:
    """{name: SignatureDef} of the version's serving MetaGraph, read from its ``saved_model.pb`` (what TF
    Serving's GetModelMetadata returns: tensor names, dtypes, shapes, method names)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    for meta_graph in proto.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    return {}


def signature_metadata(loaded) -> dict:
    """TF Serving's ``/metadata`` body: every signature's inputs and outputs with dtype and shape."""

    def describe(specs):
        return {key: {"dtype": spec.dtype.name,
                      "tensor_shape": None if spec.shape.rank is None else
                      [-1 if d is None else d for d in spec.shape.as_list()]}
                for key, spec in specs.items()}

    result = {}
    for name, function in loaded.signatures.items():
        outputs = {k: tf.TensorSpec(v.shape, v.dtype) for k, v in function.structured_outputs.items()}
        result[name] = {"inputs": describe(serving.signature_inputs(function)), "outputs": describe(outputs)}
    return result


def _kserve():
    try:
        import kserve
    except ImportError as e:  # optional dependency
        raise UserError("tfmstep-serve needs KServe's model server: pip install 'tfmstep[serve]'") from e
    return kserve


def make_model_class():
    """The kserve.Model subclass (defined on first use: kserve is an optional dependency)."""
    kserve = _kserve()
    from kserve.errors import InvalidInput

    class ServedModel(kserve.Model):
        """One model name; ``current`` is the version requests run on (swapped whole on reload)."""

        def __init__(self, version: Version):
            super().__init__(version.name)
            self.current = version
            self.ready = True

        def load(self) -> bool:
            self.ready = True
            return True

        async def predict(self, payload, headers=None):
            version = self.current  # one version for the whole request, even if a reload swaps it
            loop = asyncio.get_running_loop()
            try:  # TF releases the GIL: requests run in parallel in the server's thread pool
                return await loop.run_in_executor(None, serving.predict_rest, version.loaded, payload)
            except serving.BadRequest as e:
                raise InvalidInput(str(e)) from None

    return ServedModel


# ---------------------------------------------------------------------------------------------------------
# gRPC: TF Serving's PredictionService.


def _grpc_predict(models: dict, request):
    """(PredictResponse, None) or (None, (grpc.StatusCode, message)) for a PredictRequest."""
    import grpc
    from tensorflow_serving.apis import predict_pb2

    model = models.get(request.model_spec.name)
    if model is None:
        return None, (grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_spec.name!r}; serving "
                                                 f"{', '.join(sorted(models))}")
    version = model.current
    signature_name = request.model_spec.signature_name or "serving_default"
    if signature_name not in version.loaded.signatures:
        return None, (grpc.StatusCode.INVALID_ARGUMENT,
                      f"unknown signature_name {signature_name!r}; the model serves "
                      f"{', '.join(sorted(version.loaded.signatures))}")
    signature = version.loaded.signatures[signature_name]
    specs = serving.signature_inputs(signature)
    if set(request.inputs) != set(specs):
        return None, (grpc.StatusCode.INVALID_ARGUMENT,
                      f"signature inputs are {', '.join(sorted(specs))}; got {', '.join(sorted(request.inputs))}")
    feeds = {}
    for name, proto in request.inputs.items():
        array = tf.make_ndarray(proto)
        if tf.as_dtype(proto.dtype) != specs[name].dtype:
            return None, (grpc.StatusCode.INVALID_ARGUMENT,
                          f"input {name!r} must be {specs[name].dtype.name}, got {tf.as_dtype(proto.dtype).name}")
        feeds[name] = tf.constant(array, specs[name].dtype)
    try:
        outputs = signature(**feeds)
    except tf.errors.InvalidArgumentError as e:
        return None, (grpc.StatusCode.INVALID_ARGUMENT, serving.graph_error_line(e))
    response = predict_pb2.PredictResponse()
    response.model_spec.name = version.name
    response.model_spec.version.value = version.version
    response.model_spec.signature_name = signature_name
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
    return response, None


SIGNATURE_DEF = "signature_def"  # the only metadata field TF Serving knows


def _grpc_metadata(models: dict, request):
    """(GetModelMetadataResponse, None) or (None, (grpc.StatusCode, message)), as TF Serving answers:
    at least one ``metadata_field``, only ``signature_def``, which holds a ``SignatureDefMap``."""
    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2

    model = models.get(request.model_spec.name)
    if model is None:
        return None, (grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_spec.name!r}; serving "
                                                 f"{', '.join(sorted(models))}")
    version = model.current
    if request.model_spec.HasField("version") and request.model_spec.version.value != version.version:
        return None, (grpc.StatusCode.NOT_FOUND, f"model {version.name!r} serves version {version.version}, "
                                                 f"not {request.model_spec.version.value}")
    fields = list(request.metadata_field)
    if not fields:
        return None, (grpc.StatusCode.INVALID_ARGUMENT,
                      f"GetModelMetadataRequest must specify at least one metadata_field ({SIGNATURE_DEF!r})")
    unknown = [f for f in fields if f != SIGNATURE_DEF]
    if unknown:
        return None, (grpc.StatusCode.INVALID_ARGUMENT, f"metadata field {unknown[0]!r} is not supported; "
                                                        f"the only one is {SIGNATURE_DEF!r}")
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = version.name
    response.model_spec.version.value = version.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature_def in version.signature_defs.items():
        signature_map.signature_def[name].CopyFrom(signature_def)
    response.metadata[SIGNATURE_DEF].Pack(signature_map)
    return response, None


def start_grpc(models: dict, host: str, port: int, threads: int = 4):
    """TF Serving's PredictionService (Predict, GetModelMetadata) on ``host:port``; returns the started
    grpc server."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            response, error = _grpc_predict(models, request)
            if error:
                context.abort(*error)
            return response

        def GetModelMetadata(self, request, context):
            response, error = _grpc_metadata(models, request)
            if error:
                context.abort(*error)
            return response

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=threads))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(), server)
    if not server.add_insecure_port(f"{host}:{port}"):
        raise UserError(f"cannot listen for gRPC on {host}:{port}")
    server.start()
    return server


# ---------------------------------------------------------------------------------------------------------
# The server.


def _watch(export_base: str, models: dict, poll_seconds: float, stop: threading.Event) -> None:
    """Load newer versions of the served models as they appear (complete ones only) and swap them in."""
    while not stop.wait(poll_seconds):
        try:
            for name, (version, path) in latest_versions(export_base).items():
                model = models.get(name)
                if model is not None and version > model.current.version:
                    model.current = load_version(name, version, path)
        except Exception as e:  # a broken new version must not take down the served ones
            logging.error("Reloading from %s failed: %s", export_base, e)


def serve(export_base: str, *, host: str = "127.0.0.1", rest_api_port: int = 8501,
          grpc_port: int | None = 8500, poll_seconds: float = 0.0, workers: int | None = None) -> None:
    """Load every model under ``export_base`` and serve it until SIGINT/SIGTERM."""
    kserve = _kserve()
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.model_server import app
    from kserve.protocol.rest.server import RESTServer

    found = latest_versions(export_base)
    if not found:
        raise UserError(f"no model with a complete integer version under {export_base}")
    model_class = make_model_class()
    started = time.perf_counter()
    models = {name: model_class(load_version(name, version, path)) for name, (version, path) in found.items()}
    logging.info("Loaded %d models in %.1f s", len(models), time.perf_counter() - started)

    @app.get("/v1/models/{model_name}/metadata")
    async def metadata(model_name: str):
        from kserve.errors import ModelNotFound

        model = models.get(model_name)
        if model is None:
            raise ModelNotFound(model_name)
        version = model.current
        return {"model_spec": {"name": model_name, "version": str(version.version)},
                "metadata": {"signature_def": signature_metadata(version.loaded)}}

    class LocalModelServer(kserve.ModelServer):
        """KServe's server with the REST socket on ``host`` (KServe itself always binds 0.0.0.0)."""

        def start(self, served):
            self._register_and_check_atleast_one_model_is_ready(served)
            self._rest_server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane,
                                           self.model_repository_extension, self.http_port,
                                           grace_period=self.grace_period,
                                           timeout_keep_alive=self.timeout_keep_alive)
            self._rest_server.config.host = host
            self.servers.append(self._rest_server.start())
            self.setup_event_loop()
            self.register_signal_handler()
            asyncio.run(self._serve())

    grpc_server = start_grpc(models, host, grpc_port) if grpc_port else None
    stop = threading.Event()
    if poll_seconds > 0:
        threading.Thread(target=_watch, args=(export_base, models, poll_seconds, stop), daemon=True).start()
    logging.info("Serving %s on http://%s:%d%s", ", ".join(f"{n} v{m.current.version}" for n, m in models.items()),
                 host, rest_api_port, f" and gRPC {host}:{grpc_port}" if grpc_server else "")
    try:
        LocalModelServer(http_port=rest_api_port, enable_grpc=False, max_asyncio_workers=workers,
                         enable_latency_logging=False).start(list(models.values()))
    finally:
        stop.set()
        if grpc_server is not None:
            grpc_server.stop(grace=2)

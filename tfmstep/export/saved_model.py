"""SavedModels in the layout TF Serving loads as is, written atomically.

  <export_base>/<model_name>/<version>/saved_model.pb
                                       variables/
                                       assets/                            (the LM's SentencePiece vocabulary)
                                       assets.extra/tf_serving_warmup_requests
                                       assets.extra/tfmstep_export.json   (model, config, signatures)

A servable's ``vocab_file`` is saved as a ``tf.saved_model.Asset``: TF copies it to ``assets/<basename>``
and lists it in the MetaGraph, so its path follows the version wherever it is copied; the info file names
it (``"vocab_asset": "assets/vocab.spm"``).

A version is built in ``<export_base>/<model_name>/.tmp-export-<pid>-<random>`` (same filesystem), its
files fsynced, then renamed to its integer name. TF Serving only loads directories whose name is an
integer, so a crash or kill at any moment leaves either the complete version or nothing it would load;
leftover temp directories of dead processes are removed by the next export. Versions increase and old
ones are kept (TF Serving serves the highest by default).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmstep.errors import UserError
from tfmstep.export import signatures as signatures_lib
from tfmstep.export import warmup

TEMP_PREFIX = ".tmp-export-"
INFO_FILE = os.path.join("assets.extra", "tfmstep_export.json")


def list_versions(model_dir: str) -> list[int]:
    """Complete versions (integer-named directories) under ``<export_base>/<model_name>``."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(n) for n in os.listdir(model_dir)
                  if n.isdigit() and os.path.isdir(os.path.join(model_dir, n)))


def _remove_stale_temp_dirs(model_dir: str) -> None:
    for entry in os.listdir(model_dir):
        if not entry.startswith(TEMP_PREFIX):
            continue
        pid = entry[len(TEMP_PREFIX):].split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue  # another export is writing it right now
        shutil.rmtree(os.path.join(model_dir, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(path: str) -> None:
    """Flush every file and directory below ``path`` so a rename never exposes unwritten data."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _json_config(config, vocab_asset: str | None = None) -> dict:
    """The config as JSON, without the build machine's paths: a value naming a file or directory keeps
    only its base name, and the vocabulary is the version's own copy (``assets/<name>``)."""
    if not dataclasses.is_dataclass(config):
        return {}
    values = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    for key, value in values.items():
        if isinstance(value, str) and value and (os.path.isabs(value) or os.sep in value
                                                 or os.path.exists(value)):
            values[key] = os.path.basename(value.rstrip(os.sep))
    if vocab_asset and "vocab_file" in values:
        values["vocab_file"] = vocab_asset
    return values


def build_archive(model: keras.Model, servable: signatures_lib.Servable) -> keras.export.ExportArchive:
    """One ExportArchive holding the model's variables and every named signature (no jit_compile)."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    for resource in servable.trackables:
        archive.track(resource)
    if servable.vocab_file:
        # ExportArchive saves variables and the TrackableResources it finds, not Assets: the Asset has
        # to hang off the object the archive saves to be written to assets/.
        archive._tf_trackable.vocab_file = tf.saved_model.Asset(servable.vocab_file)
    for name, signature in servable.signatures.items():
        # One dict argument: the SavedModel signature's inputs are then named after its keys.
        archive.add_endpoint(name, _dict_argument(signature.fn),
                             input_signature=[dict(signature.input_signature)])
    return archive


def _dict_argument(fn):
    def call(inputs):
        return fn(**inputs)

    return call


def export_saved_model(model: keras.Model, model_name: str, config, export_base: str, *,
                       version: int | None = None, servable: signatures_lib.Servable | None = None) -> str:
    """Write ``model`` as a new TF Serving version; returns the version directory.

    ``version`` None takes the next integer after the existing ones; an existing version is never
    overwritten.
    """
    if not export_base:
        raise UserError("export_base must be a directory path")
    if os.path.exists(export_base) and not os.path.isdir(export_base):
        raise UserError(f"export_base {export_base} exists and is not a directory")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        raise UserError(f"version must be a positive integer, got {version!r}")
    servable = servable or signatures_lib.servable(model_name, model, config)
    model_dir = os.path.join(export_base, model_name)
    os.makedirs(model_dir, exist_ok=True)
    _remove_stale_temp_dirs(model_dir)
    existing = list_versions(model_dir)
    if version is not None and version in existing:
        raise UserError(f"version {version} of {model_name} already exists in {model_dir}; versions are "
                        f"never overwritten (omit --version to take the next one)")

    temp_dir = os.path.join(model_dir, f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        build_archive(model, servable).write_out(temp_dir, verbose=False)
        os.makedirs(os.path.join(temp_dir, "assets"), exist_ok=True)  # vocabularies; TF Serving's layout
        count = _write_warmup(os.path.join(temp_dir, warmup.WARMUP_FILE), model_name, servable)
        vocab_asset = _vocab_asset(temp_dir, servable.vocab_file) if servable.vocab_file else None
        info = {"model": model_name, "config": _json_config(config, vocab_asset),
                "signatures": sorted(servable.signatures), "warmup_requests": count}
        if vocab_asset:
            info["vocab_asset"] = vocab_asset
        with open(os.path.join(temp_dir, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
        _fsync_tree(temp_dir)
        final = _rename_to_next_version(temp_dir, model_dir, version, existing)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    logging.info("Exported %s version %s to %s", model_name, os.path.basename(final), final)
    return final


def _vocab_asset(version_dir: str, vocab_file: str) -> str:
    """The vocabulary's path relative to the version, checked to be the file that was given."""
    relative = os.path.join("assets", os.path.basename(vocab_file))
    copied = os.path.join(version_dir, relative)
    with open(vocab_file, "rb") as source, open(copied, "rb") as f:
        if f.read() != source.read():
            raise RuntimeError(f"{copied} differs from {vocab_file}")
    return relative


def _write_warmup(path: str, model_name: str, servable: signatures_lib.Servable) -> int:
    return warmup.write_warmup_requests(path, model_name, servable.warmup_inputs)


def _rename_to_next_version(temp_dir: str, model_dir: str, version, existing) -> str:
    """Rename into place; if a concurrent export took the number first, take the next one."""
    candidate = version if version is not None else (max(existing) + 1 if existing else 1)
    for _ in range(100):
        final = os.path.join(model_dir, str(candidate))
        try:
            if os.path.exists(final):
                raise FileExistsError(final)
            os.rename(temp_dir, final)  # atomic on one filesystem; fails if final is a non-empty dir
        except OSError:
            if version is not None:
                raise UserError(f"version {version} of {os.path.basename(model_dir)} already exists in "
                                f"{model_dir}") from None
            candidate += 1
            continue
        fd = os.open(model_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return final
    raise UserError(f"could not find a free version number in {model_dir}")


def has_xla_must_compile(version_dir: str) -> list[str]:
    """Names of functions in the SavedModel that carry ``_XlaMustCompile=true`` (must be none)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    flagged = []
    for meta_graph in proto.meta_graphs:
        for function in meta_graph.graph_def.library.function:
            attr = function.attr.get("_XlaMustCompile")
            if attr is not None and attr.b:
                flagged.append(function.signature.name)
            for node in function.node_def:
                node_attr = node.attr.get("_XlaMustCompile")
                if node_attr is not None and node_attr.b:
                    flagged.append(f"{function.signature.name}/{node.name}")
    return flagged


def load(version_dir: str):
    """``tf.saved_model.load`` with TF Text's ops registered (the SentencePiece LM's graph uses them)."""
    import tensorflow_text  # noqa: F401  (registers SentencepieceOp & co. in this process)

    return tf.saved_model.load(version_dir)


def run_warmup_requests(version_dir: str, loaded=None) -> dict:
    """Replay the warmup file against the reloaded signatures, as TF Serving does; {signature: outputs}."""
    loaded = loaded or load(version_dir)
    results = {}
    for signature_name, inputs in warmup.read_warmup_requests(os.path.join(version_dir, warmup.WARMUP_FILE)):
        if signature_name not in loaded.signatures:
            raise UserError(f"warmup request for unknown signature {signature_name!r}")
        outputs = loaded.signatures[signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        results[signature_name] = {k: np.asarray(v) for k, v in outputs.items()}
    return results

"""A new family touches its own module plus one register call: a toy family registered here is trained
by the trainer, exported by the export module, timed by the benchmark and evaluated by the evaluate
tool -- generic code that reads the registry hooks and never names a family."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmstep import registry

NAME = "toy_linear_family"


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    features: int = 4
    eval_examples: int = 32


def _build(config):
    inputs = keras.Input((config.features,), name="features")
    return keras.Model(inputs, keras.layers.Dense(1, name="prediction")(inputs))


def _loss(labels, outputs):
    error = tf.square(tf.cast(outputs, tf.float32)[:, 0] - labels)
    return error, {"squared_error": error}


def _dataset(config, split, batch_size, seed=0, start_batch=0):
    weights = np.arange(1, config.features + 1, dtype=np.float32)

    def batch(k):  # batch k depends only on (seed, split, k): exact resume
        x = tf.random.stateless_normal([batch_size, config.features],
                                       seed=tf.stack([tf.cast(seed, tf.int64), k + (0 if split == "train" else 10**9)]))
        return x, tf.linalg.matvec(x, weights)

    if split == "train":
        return tf.data.Dataset.range(start_batch, 2**62).map(batch)
    return tf.data.Dataset.range(max(1, config.eval_examples // batch_size)).map(batch)


def _evaluate(runs, labels=None, output_dir="", name="toy", **options):
    rows = {}
    for label, (workdir, (model, config, spec)) in zip(labels or [w for w, _ in runs], runs):
        errors = [float(np.mean(_loss(y, model(x))[0])) for x, y in spec.dataset(config, "validation", 8)]
        rows[label] = float(np.mean(errors))
    return {"runs": rows, "table": "\n".join(f"{k}: mse {v:.4f}" for k, v in rows.items())}


def _timer(model, config, repeats=5):
    from tfmstep.benchmark.timing import percentile_summary, time_in_loop

    x = tf.zeros([8, config.features])
    return [{"step": "dense", **percentile_summary(time_in_loop(model, x, repeats, inner=2)), "share": 1.0}]


@pytest.fixture(scope="module")
def toy_family():
    registry.register(NAME, config_class=ToyConfig, loss=_loss, dataset=_dataset,
                      presets={"tiny": {}}, evaluate=_evaluate, inference_timer=_timer)(_build)
    yield registry.get_spec(NAME)
    registry._REGISTRY.pop(NAME)  # registered for this module only


@pytest.fixture(scope="module")
def trained(toy_family, tmp_path_factory):
    from tfmstep import trainer

    workdir = str(tmp_path_factory.mktemp("toy") / "run")
    metrics = trainer.train(NAME, workdir, config=trainer.TrainConfig(
        steps=100, batch_size=16, learning_rate=0.3, weight_decay=0.0, warmup_steps=0, log_every=20, eval_every=0,
        checkpoint_every=100, jit_compile=False, steps_per_call=10))
    return workdir, metrics


def test_the_trainer_trains_a_family_it_has_never_heard_of(trained):
    _, metrics = trained
    assert metrics["step"] == 100 and metrics["eval"]["squared_error"] < 1.0


def test_the_export_module_exports_it(trained, tmp_path):
    from tfmstep import saving
    from tfmstep.export import saved_model, signatures

    model, config, spec = saving.load_trained(trained[0])
    path = saved_model.export_saved_model(model, spec.name, config, str(tmp_path),
                                          servable=signatures.servable(spec.name, model, config))
    loaded = tf.saved_model.load(path)
    x = np.ones([2, config.features], np.float32)
    out = loaded.signatures["serving_default"](features=tf.constant(x))
    np.testing.assert_allclose(next(iter(out.values())).numpy(), model(x).numpy(), rtol=1e-5)


def test_the_benchmark_times_it_through_its_hook(toy_family):
    from tfmstep.benchmark import inference

    rows = inference.inference_step_times([NAME], preset="tiny")[NAME]
    assert rows[0]["step"] == "dense" and rows[0]["p50_ms"] > 0


def test_the_evaluate_tool_runs_its_evaluation(trained):
    from tfmstep import evaluation as evaluate

    report, table = evaluate.evaluate([trained[0]], ["toy"])
    assert report["runs"]["toy"] < 1.0 and table.startswith("toy: mse")

"""CNN image classifier: stages of Conv2D -> norm -> ReLU, max-pooling between stages, then
global average pooling, dropout and a linear classifier. Any input size, any class count.

Serving (registered as the family's ``servable`` hook): ``serving_default`` takes ``images`` float32
[batch, H, W, C] in [0, 1] and answers ``probabilities`` [batch, classes] and ``classes`` int32 [batch];
TF-Lite converts the logits."""

from __future__ import annotations

import dataclasses
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tfmstep.data import images as image_data
from tfmstep.errors import UserError
from tfmstep.registry import register

NORMS = ("batch", "group", "none")


@keras.saving.register_keras_serializable("tfmstep")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` of NHWC feature maps computed by TensorFlow's fused kernel
    (the same class name: Keras keys weight files by it, so files saved with either class load into both).

    Keras 3 normalises with moments + batch_normalization: about ten element-wise ops each way, after
    upcasting bfloat16 activations to float32 and back. The fused op is one kernel forward and one
    backward, in the activations' own dtype with float32 statistics (as tf.keras 2 did). Same variables
    and the same moving-average rule (the biased batch variance); other cases (masks, renorm,
    synchronized, not 4-D) are the Keras layer's."""

    def call(self, inputs, training=None, mask=None):
        if (mask is not None or self.renorm or self.synchronized or len(inputs.shape) != 4
                or self.axis not in (-1, 3)):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        scale = self.gamma if self.scale else tf.ones([channels])
        offset = self.beta if self.center else tf.zeros([channels])
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, scale, offset, epsilon=self.epsilon, data_format="NHWC", is_training=True)
            count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), tf.float32)
            variance *= (count - 1.0) / tf.maximum(count, 1.0)  # the op returns the Bessel-corrected one
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum
                                        + variance * (1.0 - self.momentum))
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs, scale, offset, mean=self.moving_mean, variance=self.moving_variance,
                epsilon=self.epsilon, data_format="NHWC", is_training=False)
        return tf.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable("tfmstep")
class AddMirrorImages(keras.layers.Layer):
    """Outside training: the batch followed by its left-right mirror images ([2B, H, W, C]), for
    ``AverageMirrorLogits``; in training the batch as it is (augmentation already flips)."""

    def call(self, images, training=None):
        return images if training else tf.concat([images, tf.reverse(images, axis=[2])], axis=0)


@keras.saving.register_keras_serializable("tfmstep")
class AverageMirrorLogits(keras.layers.Layer):
    """Outside training: the mean of each image's logits and its mirror's (flip test-time augmentation,
    as airbench evaluates CIFAR-10), so serving, TF-Lite and evaluation all answer the same."""

    def call(self, logits, training=None):
        if training:
            return logits
        original, mirrored = tf.split(logits, 2, axis=0)
        return 0.5 * (original + mirrored)


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    # Data. image_shape/num_classes of None take the dataset's own.
    dataset: str = image_data.OFFLINE_DATASET  # "digits" (offline) | TFDS name | "npz"
    data_file: str = ""  # for dataset="npz"
    image_shape: Optional[tuple[int, ...]] = None  # (height, width, channels)
    num_classes: Optional[int] = None
    augment: bool = False  # random pad-and-crop (+ horizontal flip), a new draw every epoch
    flip: bool = True  # with augment: mirror left-right too (off for digits and text)
    shift: int = 0  # with augment: largest shift in px (0: 4 px, 1 px for images under 16 px)
    # Train targets (1 - e) * one-hot + e / classes; evaluation keeps the hard labels, so its loss is
    # the plain cross-entropy.
    label_smoothing: float = 0.0
    # Model.
    filters: tuple[int, ...] = (32, 64)  # one stage per entry
    convs_per_stage: int = 2
    # Residual stages (ResNet-9 style): a stem conv, then per stage conv -> max-pool -> norm -> ReLU and a
    # block of convs_per_stage convs added back to its input. False: plain conv stacks with pooling between.
    residual: bool = False
    stem_filters: int = 16  # residual only: width of the stem conv at full resolution
    norm: str = "batch"
    groups: int = 8  # for norm="group"
    dropout: float = 0.1
    l2: float = 0.0  # kernel L2; AdamW weight decay (trainer flag) is usually the better knob
    # Inference averages the logits of each image and its mirror image (twice the inference work): for
    # images whose class does not change when mirrored (not digits or text)
    mirror_average: bool = False

    def __post_init__(self):
        if self.norm not in NORMS:
            raise UserError(f"bad norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if not self.filters or min(self.filters) < 1 or self.convs_per_stage < 1:
            raise UserError("filters must be a non-empty tuple of positive ints, convs_per_stage >= 1")
        if self.shift < 0:
            raise UserError(f"shift must be >= 0 (0: 4 px, 1 px for images under 16 px), got {self.shift}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_shape is not None and (len(self.image_shape) != 3 or min(self.image_shape) < 1):
            raise UserError(f"image_shape must be (height, width, channels), got {self.image_shape}")

    def resolved(self) -> "CNNConfig":
        """Fill image_shape/num_classes from the dataset when they are not set."""
        if self.image_shape is not None and self.num_classes is not None:
            return self
        train_images, train_labels = image_data.load_arrays(self.dataset, self.data_file)["train"]
        return dataclasses.replace(
            self, image_shape=self.image_shape or tuple(int(d) for d in train_images.shape[1:]),
            num_classes=self.num_classes or int(train_labels.max()) + 1)


def classification_loss(labels, logits):
    """Per-example cross-entropy and accuracy; ``labels`` are class ids [B] or soft targets [B, classes]
    (label smoothing), whose argmax is the class accuracy counts."""
    logits = tf.cast(logits, tf.float32)
    if len(labels.shape) == 2:  # a TensorShape or, from numpy callers, a tuple
        loss = tf.nn.softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.float32), logits=logits)
        labels = tf.argmax(labels, -1)
    else:
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32),
                                                              logits=logits)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(labels, tf.int32)),
                      tf.float32)
    return loss, {"accuracy": correct}


def cnn_dataset(config: CNNConfig, split: str, batch_size: int, seed: int = 0, start_batch: int = 0):
    config = config.resolved()
    arrays = image_data.load_arrays(config.dataset, config.data_file)
    images, labels = arrays["train" if split == "train" else "test"]
    ds = image_data.make_dataset(images, labels, config.image_shape, split, batch_size, seed,
                                 start_batch, config.augment, config.flip, config.shift)
    if split == "train" and config.label_smoothing:
        e, classes = config.label_smoothing, config.num_classes
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, classes) * (1.0 - e) + e / classes))
    return ds


def per_layer_times(model: keras.Model, config: CNNConfig, batch_size: int = 32, repeats: int = 50) -> list:
    """Inference time of each layer, each run on its real input from the data (the benchmark's
    ``inference_timer`` hook), and of the whole model as one graph."""
    from tfmstep.benchmark.timing import percentile_summary, time_in_loop  # only when benchmarking

    inputs, _ = next(iter(cnn_dataset(config, "validation", batch_size)))
    # Each layer's real input: run the model once, capturing intermediate tensors.
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    outputs = probe(inputs, training=False)
    layer_inputs = [inputs] + list(outputs[:-1])
    rows = []
    for layer, layer_input in zip(layers, layer_inputs):
        seconds = time_in_loop(lambda x, layer=layer: layer(x, training=False), layer_input, repeats)
        rows.append({"step": layer.name, **percentile_summary(seconds)})
    whole = time_in_loop(lambda x: model(x, training=False), inputs, repeats)
    total = sum(r["mean_ms"] for r in rows)
    for r in rows:
        r["share"] = r["mean_ms"] / total
    rows.append({"step": "whole model (one graph)", **percentile_summary(whole),
                 "share": float(np.mean(whole)) * 1e3 / total})
    return rows


# Largest request batch the serving signature takes (a 32x32x3 batch of 1024 is 12 MB of float32).
MAX_SERVING_BATCH = 1024


def classifier_servable(name: str, model: keras.Model, config):
    """Signatures of the classifier: images in [0, 1] -> probabilities and classes; checked in the graph
    (rank, height/width/channels, batch size, finite values in [0, 1]) before the first convolution."""
    import numpy as np

    from tfmstep.export import signatures

    servable = signatures.generic_servable(name, model, config)
    input_name, spec = next(iter(servable.tflite_input_signature.items()))

    def classify(**kwargs):
        images = signatures.check_inputs(kwargs, {input_name: spec}, max_batch=MAX_SERVING_BATCH)[input_name]
        images = signatures.after([signatures.assert_in_range(images, 0.0, 1.0, input_name, "pixel values")],
                                  images)
        logits = tf.cast(model(images, training=False), tf.float32)
        return {"probabilities": tf.nn.softmax(logits, axis=-1),
                "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}

    def logits_only(**kwargs):
        return {"logits": tf.cast(model(kwargs[input_name], training=False), tf.float32)}

    def reference(signature_name, inputs):
        logits = keras.ops.convert_to_numpy(model(inputs[input_name], training=False))
        return {"probabilities": keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1)),
                "classes": np.argmax(logits, -1)}

    servable.signatures = {"serving_default": signatures.Signature(classify, {input_name: spec})}
    servable.keras_reference = reference
    servable.tflite_fn = logits_only
    servable.primary_output = "logits"
    return servable


@register("cnn_classifier", config_class=CNNConfig, loss=classification_loss, dataset=cnn_dataset,
          servable=classifier_servable, validate_data=image_data.validate_config,
          presets={
              "tiny": dict(filters=(8, 16), convs_per_stage=1, dropout=0.0),
              # ResNet-9's shape at a quarter of its width (488k parameters): what 2 CPU cores train on
              # 5,000 images in under 10 minutes (models/cnn_cifar10.flags).
              "cifar10": dict(dataset="cifar10", residual=True, stem_filters=16, filters=(32, 64, 128),
                              convs_per_stage=2, augment=True, dropout=0.0, label_smoothing=0.2,
                              mirror_average=True),
          },
          xla_on_cpu=False,  # XLA's CPU convolutions were slower than oneDNN's in the benchmark
          # bf16 training is 1.6x faster but lost 1.6 points on CIFAR-10 (5k images, 1650 steps: 75.60 vs
          # 77.25% and, seed 1, 74.80 vs 76.35%) while its loss over auto-tuning's window matched fp32's.
          auto_low_precision=False,
          inference_timer=per_layer_times)
def build_cnn_classifier(config: CNNConfig) -> keras.Model:
    """Conv2D classifier of images (BatchNorm/GroupNorm, dropout, L2); outputs logits."""
    config = config.resolved()
    regularizer = keras.regularizers.L2(config.l2) if config.l2 else None
    inputs = keras.Input(shape=config.image_shape, name="images")

    def conv_norm_relu(x, width, name, suffix="", pool=False):
        """Conv -> (max-pool) -> norm -> ReLU; layers named {name}_conv{suffix}, {name}_bn{suffix}, ..."""
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=config.norm == "none",
                                kernel_regularizer=regularizer, name=f"{name}_conv{suffix}")(x)
        if pool and min(x.shape[1], x.shape[2]) >= 2:
            x = keras.layers.MaxPooling2D(name=f"{name}_pool{suffix}")(x)
        if config.norm == "batch":
            x = BatchNormalization(name=f"{name}_bn{suffix}")(x)
        elif config.norm == "group":
            x = keras.layers.GroupNormalization(min(config.groups, width), name=f"{name}_gn{suffix}")(x)
        return keras.layers.ReLU()(x)

    x = AddMirrorImages(name="add_mirror_images")(inputs) if config.mirror_average else inputs
    if config.residual:
        x = conv_norm_relu(x, config.stem_filters, "stem")
        for stage, width in enumerate(config.filters):
            x = conv_norm_relu(x, width, f"stage{stage}", "_down", pool=True)
            y = x
            for i in range(config.convs_per_stage):
                y = conv_norm_relu(y, width, f"stage{stage}", str(i))
            x = keras.layers.Add(name=f"stage{stage}_add")([x, y])
    else:
        for stage, width in enumerate(config.filters):
            for i in range(config.convs_per_stage):
                x = conv_norm_relu(x, width, f"stage{stage}", str(i))
            if stage < len(config.filters) - 1 and min(x.shape[1], x.shape[2]) >= 2:
                x = keras.layers.MaxPooling2D(name=f"stage{stage}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if config.dropout:
        x = keras.layers.Dropout(config.dropout)(x)
    logits = keras.layers.Dense(config.num_classes, kernel_regularizer=regularizer, dtype="float32",
                                name="logits")(x)
    if config.mirror_average:
        logits = AverageMirrorLogits(name="average_mirror_logits", dtype="float32")(logits)
    return keras.Model(inputs, logits, name="cnn_classifier")

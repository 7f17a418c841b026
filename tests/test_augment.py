"""Train-time augmentation is keyed on the stream position: a new flip/crop every epoch, the same one
after a resume."""

import numpy as np

from tfmstep.data import images as image_data

N, BATCH = 8, 4  # one epoch = 2 batches


def _batches(start_batch, count, flip=True):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(N)  # the label names the image
    ds = image_data.make_dataset(images, labels, (16, 16, 3), "train", BATCH, seed=3,
                                 start_batch=start_batch, augment=True, flip=flip)
    return [(x.numpy(), y.numpy()) for x, y in ds.take(count)], images


def _by_image(batches):
    return {int(label): image for x, y in batches for image, label in zip(x, y)}


def test_same_image_is_augmented_differently_in_two_epochs():
    batches, _ = _batches(0, 4)
    first, second = _by_image(batches[:2]), _by_image(batches[2:])
    assert sorted(first) == sorted(second) == list(range(N))
    differ = [i for i in range(N) if not np.array_equal(first[i], second[i])]
    assert len(differ) == N, f"images {sorted(set(range(N)) - set(differ))} got the same augmentation twice"


def test_augmentation_is_identical_after_a_resume():
    uninterrupted, _ = _batches(0, 5)
    resumed, _ = _batches(3, 2)
    for (x, y), (rx, ry) in zip(uninterrupted[3:], resumed):
        np.testing.assert_array_equal(y, ry)
        np.testing.assert_array_equal(x, rx)


def test_augmented_image_is_a_shifted_copy_and_flip_can_be_off():
    batches, images = _batches(0, 2, flip=False)
    padded = np.pad(images / 255.0, [(0, 0), (4, 4), (4, 4), (0, 0)], mode="reflect")
    for x, y in batches:
        for image, label in zip(x, y):
            windows = [padded[label, dy:dy + 16, dx:dx + 16] for dy in range(9) for dx in range(9)]
            assert any(np.allclose(image, w, atol=1e-6) for w in windows)

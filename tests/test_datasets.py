"""dtf.datasets: every dataset loads offline, with the same (image float32 in [0, 1], int32 label) examples; the shipped
builders build in seconds and are learnable; missing or unknown data is a clear UserError, never a download."""
import os
import socket
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dtf import datasets
from dtf.distribute import inputs as data
from dtf.datasets import digits, shapes, synthetic
from dtf.base.errors import UserError
from helpers import PipelineStrategy


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def check_examples(split, count=16):
    images, labels = next(iter(split.dataset.batch(count)))
    assert images.dtype == tf.float32 and labels.dtype == tf.int32
    assert tuple(images.shape[1:]) == split.input_shape
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
    assert 0 <= int(tf.reduce_min(labels)) and int(tf.reduce_max(labels)) < split.num_classes
    return images.numpy(), labels.numpy()


def train_and_evaluate(name, data_dir, model, epochs, batch):
    strategy = tf.distribute.get_strategy()
    train = data.distribute_dataset(strategy, name, batch, data_dir=data_dir, cache=True, seed=1)
    test = data.distribute_dataset(strategy, name, 256, data_dir=data_dir, training=False, cache=True)
    keras.utils.set_random_seed(0)
    model = model(train.input_shape, train.num_classes)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(train.dataset, steps_per_epoch=train.steps_per_epoch, epochs=epochs, shuffle=False, verbose=0)
    return model.evaluate(test.dataset, steps=test.steps_per_epoch, verbose=0, return_dict=True)["accuracy"]


def test_shapes_builds_offline_in_seconds_into_sharded_files(offline, data_dir):
    start = time.monotonic()
    train = datasets.load("shapes", "train", data_dir)
    seconds = time.monotonic() - start
    print(f"shapes/28x28x1 built in {seconds:.1f}s")
    assert seconds < 30
    assert (train.name, train.num_examples, train.num_shards) == ("shapes/28x28x1", 8000, 8)
    assert (train.input_shape, train.num_classes) == ((28, 28, 1), len(shapes.CLASSES))
    test = datasets.load("shapes", "test", data_dir)
    assert (test.num_examples, test.num_shards) == (2000, 8)
    _, labels = check_examples(train, 512)
    assert len(set(labels)) == len(shapes.CLASSES)
    assert os.path.isdir(os.path.join(data_dir, "dtf_shapes", "28x28x1", "1.0.0"))


def test_shapes_color_config_builds_with_one_line(offline, data_dir, capfd, caplog):
    """The first use builds it: dtf's one line, none of TFDS's prints or absl warnings about the folder it writes."""
    split = datasets.load("shapes/32x32x3", "test", data_dir)
    assert (split.input_shape, split.num_examples) == ((32, 32, 3), 2000)
    check_examples(split)
    out, err = capfd.readouterr()
    assert "dtf: built dtf_shapes/32x32x3/1.0.0 into" in err and len((out + err).strip().splitlines()) == 1, out + err
    assert not [r for r in caplog.records if r.name == "absl"], [r.getMessage() for r in caplog.records]


def test_shapes_are_a_pure_function_of_the_seed():
    first, labels = shapes.draw((28, 28, 1), 50, seed=3)
    again, labels_again = shapes.draw((28, 28, 1), 50, seed=3)
    other, _ = shapes.draw((28, 28, 1), 50, seed=4)
    assert np.array_equal(first, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(first, other)


@pytest.mark.slow
def test_small_cnn_learns_shapes(data_dir):
    def cnn(input_shape, num_classes):
        return keras.Sequential([
            keras.Input(input_shape),
            keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
            keras.layers.Flatten(), keras.layers.Dense(num_classes)])

    accuracy = train_and_evaluate("shapes", data_dir, cnn, epochs=6, batch=64)
    print(f"shapes test accuracy {accuracy:.3f} (chance {1 / len(shapes.CLASSES):.3f})")
    assert accuracy > 0.6


@pytest.mark.slow
def test_mlp_learns_digits(offline, data_dir):
    pytest.importorskip("sklearn", reason="scikit-learn ships the digits data: pip install 'dtf[digits]'")

    def mlp(input_shape, num_classes):
        return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                                 keras.layers.Dense(64, activation="relu"), keras.layers.Dense(num_classes)])

    accuracy = train_and_evaluate("digits", data_dir, mlp, epochs=10, batch=32)
    print(f"digits test accuracy {accuracy:.3f}")
    assert accuracy > 0.9


def test_digits_split_and_shards(offline, data_dir):
    pytest.importorskip("sklearn", reason="scikit-learn ships the digits data: pip install 'dtf[digits]'")
    train, test = datasets.load("digits", "train", data_dir), datasets.load("digits", "test", data_dir)
    assert (train.num_examples, test.num_examples) == (1437, 360)
    assert (train.num_shards, train.input_shape, train.num_classes) == (digits.NUM_SHARDS, (8, 8, 1), 10)
    check_examples(test)


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(UserError, match=r"pip install 'dtf\[digits\]'"):
        datasets.load("digits", "train", str(tmp_path))


def test_synthetic_any_shape_sharded_by_index():
    split = datasets.load("synthetic/12x10x3", "train", num_examples=100, num_classes=4)
    assert (split.input_shape, split.num_classes, split.num_examples) == ((12, 10, 3), 4, 100)
    check_examples(split)
    d = data.distribute_dataset(PipelineStrategy(2, 4), split, 8)
    assert (d.sharding, d.steps_per_epoch) == ("files", 12)  # every example is its own shard: 50 per pipeline
    with pytest.raises(UserError, match="HxWxC"):
        datasets.load("synthetic/big", "train")
    assert datasets.load("synthetic", "test").num_examples == synthetic.DEFAULT_NUM_EXAMPLES["test"]


def test_tfds_catalog_name_with_mock_data(offline, tmp_path):
    with tfds.testing.mock_data(num_examples=24):
        split = datasets.load("mnist", "train", str(tmp_path))
        assert (split.input_shape, split.num_classes, split.num_examples, split.num_shards) == ((28, 28, 1), 10, 24, 1)
        check_examples(split)
        d = data.distribute_dataset(tf.distribute.get_strategy(), split, 8)
        images, labels = next(iter(d.dataset))
        assert (tuple(images.shape), d.steps_per_epoch) == ((8, 28, 28, 1), 3)
        assert data.distribute_dataset(PipelineStrategy(2, 4), split, 8).sharding == "records"  # 1 shard, 2 pipelines


def test_tfds_name_not_prepared_says_how_to_prepare_it(offline, tmp_path):
    with pytest.raises(UserError) as e:
        datasets.load("mnist", "train", str(tmp_path))
    message = str(e.value)
    assert "not prepared in " + str(tmp_path) in message and "tfds build mnist --data_dir=DIR" in message


def test_unknown_names_list_the_valid_ones(tmp_path):
    with pytest.raises(UserError) as e:
        datasets.load("no_such_dataset", "train", str(tmp_path))
    assert all(n in str(e.value) for n in ("shapes", "digits", "synthetic", "folder:"))
    with pytest.raises(UserError, match="unknown shapes config '7x7x1'; valid: 28x28x1, 32x32x3"):
        datasets.load("shapes/7x7x1", "train", str(tmp_path))
    with pytest.raises(UserError, match="takes no parameters"):
        datasets.load("shapes", "train", str(tmp_path), num_classes=3)


def test_unknown_split_lists_the_valid_ones(data_dir):
    datasets.load("shapes", "train", data_dir)
    with pytest.raises(UserError, match="no split 'validation'.*valid: train, test"):
        datasets.load("shapes", "validation", data_dir)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("test", 2)):
        for label in ("cat", "dog"):
            os.makedirs(tmp_path / split / label)
            for k in range(per_class):
                size = (6, 5) if k else (8, 7)  # mixed sizes: resized to the first image's 8x7
                image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                tf.io.write_file(str(tmp_path / split / label / f"{k}.png"), tf.io.encode_png(image))
    split = datasets.load(f"folder:{tmp_path}", "train")
    assert (split.num_examples, split.num_classes, split.input_shape) == (6, 2, (8, 7, 3))
    images, labels = check_examples(split)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    d = data.distribute_dataset(tf.distribute.get_strategy(), f"folder:{tmp_path}", 4, split="test",
                                training=False)
    assert sum(len(b[1]) for b in d.dataset) == 4 and d.steps_per_epoch == 1
    with pytest.raises(UserError, match="no images for split 'valid'"):
        datasets.load(f"folder:{tmp_path}", "valid")

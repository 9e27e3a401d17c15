"""`digits`: the real UCI handwritten digits (1,797 8x8 images, 10 classes), from the copy scikit-learn ships.

A small real dataset that needs no download: `sklearn.datasets.load_digits` reads a file inside the scikit-learn
package. Every 5th image is in `test` (360), the rest in `train` (1,437): a fixed split, not a random one.
"""
import numpy as np
import tensorflow_datasets as tfds

from dtf.base.errors import UserError
from dtf.datasets import tfds_reader
from dtf.datasets.split import DatasetSplit

NUM_SHARDS = 4
TEST_EVERY = 5
# The UCI pixels count set bits in 4x4 blocks: 0..16.
MAX_PIXEL = 16


def _load_sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("dataset 'digits' needs scikit-learn (it ships the data); run: pip install 'dtf[digits]'") \
            from None
    digits = load_digits()
    images = np.round(digits.images * (255.0 / MAX_PIXEL)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


class DtfDigits(tfds_reader.OfflineBuilder, skip_registration=True):
    """UCI digits as a TFDS dataset (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data is inside scikit-learn
        images, labels = _load_sklearn_digits()
        is_test = np.arange(len(labels)) % TEST_EVERY == 0
        return {"train": self._generate_examples(images[~is_test], labels[~is_test]),
                "test": self._generate_examples(images[is_test], labels[is_test])}

    def _generate_examples(self, images, labels):
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image, "label": int(label)}


def load(split: str, data_dir: str) -> DatasetSplit:
    builder = tfds_reader.prepare(DtfDigits, None, data_dir, NUM_SHARDS)
    return tfds_reader.read_split(builder, split, "digits")

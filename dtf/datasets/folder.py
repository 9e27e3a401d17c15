"""`folder:/root`: images in `root/<split>/<class>/*.png|jpg` through `tfds.folder_dataset.ImageFolder`.

All images are resized to the size of the first one, so a folder of mixed sizes still batches.
"""
import dataclasses
import glob
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from dtf.base.errors import UserError
from dtf.datasets import tfds_reader
from dtf.datasets.split import DatasetSplit

LAYOUT = "<root>/<split>/<class>/<image>.png|jpg"


def load(root: str, split: str) -> DatasetSplit:
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise UserError(f"image folder {root!r} does not exist; expected {LAYOUT}")
    images = sorted(path for path in glob.glob(os.path.join(root, split, "*", "*"))
                    if path.lower().endswith((".png", ".jpg", ".jpeg")))
    if not images:
        splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise UserError(f"image folder {root!r} has no images for split {split!r} (split folders: "
                        f"{', '.join(splits) or 'none'}); expected {LAYOUT}")
    height, width, channels = tf.io.decode_image(tf.io.read_file(images[0]), expand_animations=False).shape
    builder = tfds.folder_dataset.ImageFolder(root, shape=(None, None, channels))
    loaded = tfds_reader.read_split(builder, split, f"folder:{root}", image_shape=(height, width, channels))

    def read(ctx):
        return loaded.read(ctx).map(lambda image, label: (tf.image.resize(image, (height, width)), label),
                                    num_parallel_calls=tf.data.AUTOTUNE)

    return dataclasses.replace(loaded, read=read)

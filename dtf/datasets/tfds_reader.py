"""TFDS glue shared by every TFDS-backed dataset: where data lives, building dtf's own builders offline, and reading a
split as a `DatasetSplit` that shards by TFDS shard files through `tfds.ReadConfig(input_context=...)`."""
import contextlib
import fcntl
import logging
import os
import time
from typing import Optional

import tensorflow as tf
import tensorflow_datasets as tfds

from dtf.base.errors import UserError
from dtf.base.logs import get_logger
from dtf.datasets.split import DatasetSplit, count_examples, to_image_label

log = get_logger(__name__)

DATA_DIR_ENV = "DTF_DATA_DIR"
# Files the TFDS reader keeps open and interleaves per input pipeline (TFDS's own default).
INTERLEAVE_FILES = 16


def resolve_data_dir(data_dir: Optional[str] = None) -> str:
    """`data_dir`, else $DTF_DATA_DIR, else TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    return os.path.expanduser(data_dir or os.environ.get(DATA_DIR_ENV) or tfds.core.constants.get_default_data_dir())


def _build_lock(data_dir: str, name: str):
    """An open lock file in `data_dir`: workers on one host share a data_dir, so one builds while the others wait on
    `flock`, then they all reuse the result. The lock is released when the file is closed."""
    try:
        os.makedirs(data_dir, exist_ok=True)
        return open(os.path.join(data_dir, f".{name}.dtf-build.lock"), "w")
    except OSError as e:
        raise UserError(f"--data_dir={data_dir} is not writable ({e.strerror}) and {name} is not built there yet; "
                        "choose a writable --data_dir (or $DTF_DATA_DIR)") from None


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of dtf's own builders: they generate their data locally and are loaded by dtf's registry, not TFDS's.

    Nothing is downloaded, so there is no checksums file to look up; TFDS's lookup imports `importlib_resources`,
    which tfds 4.9.10 uses without declaring it, and would fail on a clean install.
    """

    url_infos = None


def prepare(builder_cls, config: str, data_dir: str, num_shards: int) -> tfds.core.DatasetBuilder:
    """Build one of dtf's own (offline) builders into `data_dir` unless already there, and return it ready to read.

    `num_shards` fixes the shard files per split, so file-level sharding works for up to that many input pipelines.
    """
    with _quiet_tfds():
        builder = builder_cls(config=config, data_dir=data_dir)
        if builder.is_prepared():  # no lock: a prepared data_dir may be read-only
            return builder
        with _build_lock(data_dir, builder_cls.name) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            builder = builder_cls(config=config, data_dir=data_dir)
            if not builder.is_prepared():
                start = time.monotonic()
                tfds.disable_progress_bar()
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                    num_shards=num_shards, try_download_gcs=False))
                log.info(f"built {builder.info.full_name} into {data_dir} in {time.monotonic() - start:.1f}s")
    return builder


@contextlib.contextmanager
def _quiet_tfds():
    """dtf says one line for a build. TFDS prints its steps to stdout ("Downloading and preparing dataset Unknown
    size ...", "... downloaded and prepared to ...") and warns through absl about the folder it is still writing
    ("Variant folder ... has no dataset_info.json"); errors still raise. --verbosity=debug keeps them."""
    if logging.getLogger("dtf").isEnabledFor(logging.DEBUG):
        yield
        return
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        absl_logger.setLevel(level)


def read_split(builder: tfds.core.DatasetBuilder, split: str, name: str, *, image_key: str = "image",
               label_key: str = "label", image_shape=None) -> DatasetSplit:
    """A classification split of a prepared builder as (image, label) examples, sharded by TFDS shard files.

    With an InputContext, TFDS reads only that pipeline's files (it fails when a split has fewer files than pipelines,
    tensorflow/datasets#2133; the pipeline then reads `read(None)` and shards by records instead).
    `image_shape` overrides the stored shape (image folders store images of any size).
    """
    split_info = _split_info(builder, split)
    everything = _as_dataset(builder, split, name, None)  # fails early when the data is not there
    if split_info is not None:
        shard_lengths = tuple(int(f.take) for f in split_info.file_instructions)
    else:  # e.g. under tfds.testing.mock_data, which fakes the data but not the split metadata
        shard_lengths = (count_examples(everything),)
    features = builder.info.features

    def read(ctx: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
        return _as_dataset(builder, split, name, ctx).map(
            lambda ex: to_image_label(ex[image_key], ex[label_key]), num_parallel_calls=tf.data.AUTOTUNE)

    return DatasetSplit(name=name, split=split, num_examples=sum(shard_lengths), shard_lengths=shard_lengths, read=read,
                        input_shape=tuple(image_shape or features[image_key].shape),
                        num_classes=features[label_key].num_classes)


def _split_info(builder, split: str):
    if not builder.info.splits:
        return None
    try:
        return builder.info.splits[split]
    except (KeyError, ValueError):
        raise UserError(f"dataset {builder.name!r} has no split {split!r}; "
                        f"valid: {', '.join(builder.info.splits)} (slices like 'train[:10%]' work too)") from None


def _as_dataset(builder, split: str, name: str, ctx: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
    config = tfds.ReadConfig(input_context=ctx, try_autocache=False, skip_prefetch=True,
                             interleave_cycle_length=INTERLEAVE_FILES)
    try:
        return builder.as_dataset(split=split, shuffle_files=False, read_config=config)
    except AssertionError as e:
        if "could not find data" not in str(e):
            raise
        raise UserError(
            f"dataset {name!r} is not prepared in {os.fspath(builder.data_dir_root)}: dtf never "
            f"downloads. On a machine with internet run `tfds build {builder.name} --data_dir=DIR`, copy DIR/"
            f"{builder.name} into this data_dir (or pass --data_dir / set ${DATA_DIR_ENV})") from None

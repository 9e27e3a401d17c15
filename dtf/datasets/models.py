"""Model registry: `build_model(name, input_shape, num_classes)` for mlp, cnn, resnet20, or any keras.applications
name (weights=None: nothing is downloaded). Models output logits; the last layer stays float32 under mixed precision.
"""
from typing import Callable, Dict

import keras
from keras import layers

from dtf.base.errors import UserError


def mlp(input_shape, num_classes):
    return keras.Sequential([keras.Input(input_shape), layers.Flatten(), layers.Dense(128, activation="relu"),
                             layers.Dense(64, activation="relu"), layers.Dense(num_classes, dtype="float32")],
                            name="mlp")


def cnn(input_shape, num_classes):
    """A small conv net that learns `shapes` and `digits` in a few epochs on a CPU."""
    return keras.Sequential([
        keras.Input(input_shape),
        layers.Conv2D(16, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(32, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Flatten(), layers.Dense(64, activation="relu"), layers.Dense(num_classes, dtype="float32"),
    ], name="cnn")


def resnet20(input_shape, num_classes):
    """He et al.'s CIFAR ResNet-20 (3 stages × 3 basic blocks, 16/32/64 filters). BatchNorm is synchronized across
    replicas so that N replicas train like one device at the same global batch."""

    def bn():
        return layers.BatchNormalization(synchronized=True)

    def block(x, filters, stride):
        shortcut = x
        y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        y = layers.ReLU()(bn()(y))
        y = bn()(layers.Conv2D(filters, 3, padding="same", use_bias=False)(y))
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = bn()(layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut))
        return layers.ReLU()(layers.Add()([y, shortcut]))

    inputs = keras.Input(input_shape)
    x = layers.ReLU()(bn()(layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)))
    for stage, filters in enumerate((16, 32, 64)):
        for i in range(3):
            x = block(x, filters, 2 if (stage > 0 and i == 0) else 1)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(num_classes, dtype="float32")(x), name="resnet20")


_BUILDERS: Dict[str, Callable] = {"mlp": mlp, "cnn": cnn, "resnet20": resnet20}


def _applications() -> Dict[str, Callable]:
    return {name.lower(): fn for name, fn in vars(keras.applications).items()
            if callable(fn) and name[0].isupper()}


def build_model(name: str, input_shape, num_classes: int) -> keras.Model:
    key = (name or "").strip().lower()
    if key in _BUILDERS:
        return _BUILDERS[key](tuple(input_shape), num_classes)
    applications = _applications()
    if key in applications:
        try:
            return applications[key](weights=None, input_shape=tuple(input_shape), classes=num_classes,
                                     classifier_activation=None)
        except ValueError as e:
            raise UserError(f"--model={name} cannot take input shape {tuple(input_shape)}: "
                            f"{str(e).splitlines()[0]}") from None
    raise UserError(f"unknown --model={name!r}; valid: {', '.join(_BUILDERS)}, or a keras.applications name "
                    f"({', '.join(sorted(applications)[:6])}, …)")

"""Model architectures in plain torch, chosen by name: MLP, small CNN, ResNet-9 style.

Every learnable weight lives in nn.Linear or nn.Conv2d (plus BatchNorm affine in ResNet-9),
so the per-layer hooks of the attribution core see the whole model. A user model is given as
"package.module:factory"; the factory receives input_shape, n_classes and the options.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import SettingsError


@dataclass(frozen=True)
class ModelSpec:
    """Which architecture to build and its size options (stored in run.json)."""

    name: str = field(default="mlp", metadata={"help": "mlp, cnn, resnet9, or a user factory 'package.module:factory'"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "size options passed to the builder"})


def mlp(input_shape: tuple[int, ...], n_classes: int, hidden: tuple[int, ...] = (128,)) -> nn.Module:
    """Fully connected ReLU network over the flattened input."""
    widths = [math.prod(input_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], n_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], n_classes: int, channels: tuple[int, ...] = (32, 64), hidden: int = 128) -> nn.Module:
    """conv3x3-ReLU-maxpool blocks, then a hidden Linear layer and the classifier."""
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        in_channels, height, width = out_channels, height // 2, width // 2
    layers += [nn.Flatten(), nn.Linear(in_channels * height * width, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)]
    return nn.Sequential(*layers)


def _conv_bn(in_channels: int, out_channels: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """x + block(x)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


def resnet9(input_shape: tuple[int, ...], n_classes: int, width: int = 32) -> nn.Module:
    """ResNet-9 (Page 2018, as used by TRAK and kronfluence), width scaled by `width`."""
    in_channels = input_shape[0]
    return nn.Sequential(
        _conv_bn(in_channels, width),
        _conv_bn(width, 2 * width, pool=True),
        Residual(nn.Sequential(_conv_bn(2 * width, 2 * width), _conv_bn(2 * width, 2 * width))),
        _conv_bn(2 * width, 4 * width, pool=True),
        _conv_bn(4 * width, 8 * width, pool=True),
        Residual(nn.Sequential(_conv_bn(8 * width, 8 * width), _conv_bn(8 * width, 8 * width))),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * width, n_classes),
    )


BUILDERS = {"mlp": mlp, "cnn": cnn, "resnet9": resnet9}


def _user_factory(name: str):
    module_name, _, attribute = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise SettingsError(f"model {name!r}: cannot import factory {attribute!r} from {module_name!r} ({exc})") from exc


def build_model(spec: ModelSpec, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A freshly initialised model for the spec (initialisation follows torch's global RNG)."""
    if ":" in spec.name:
        builder = _user_factory(spec.name)
    elif spec.name in BUILDERS:
        builder = BUILDERS[spec.name]
    else:
        raise SettingsError(f"unknown model {spec.name!r}; choose one of {sorted(BUILDERS)} or 'package.module:factory'")
    options = {key: tuple(value) if isinstance(value, list) else value for key, value in spec.options.items()}
    try:
        return builder(tuple(input_shape), n_classes, **options)
    except TypeError as exc:
        raise SettingsError(f"model {spec.name!r}: bad options {spec.options} ({exc})") from exc

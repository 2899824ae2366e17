"""The built-in demo: a small CNN with the shapes that make mixed precision interesting.

It has a residual ``x + y`` (a functional layer), a functional ``F.relu``, a reshape feeding
the classifier, supergroups (Conv+BatchNorm+ReLU), and non-leaf blocks, yet needs no download
and runs in well under a second on a CPU. ``mixprec demo`` and the tests use it; it is also a
``MODEL`` for the CLI: ``mixprec inspect mixprec.demo:build``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mixprec.mixed.configurator import MixedPrecisionConfigurator

INPUT_SHAPE = (1, 3, 32, 32)


class ConvBNReLU(nn.Sequential):
    """Conv + BatchNorm + ReLU: deployment folds the BN, so only the ReLU output is quantized."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class ResidualBlock(nn.Module):
    """conv1 -> conv2, then ``F.relu(x + y)``: the add and relu are functional layers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


class DemoNet(nn.Module):
    """stem -> residual block -> downsampling stage -> pool -> reshape -> classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBNReLU(3, 16)
        self.layer1 = ResidualBlock(16)
        self.layer2 = nn.Sequential(ConvBNReLU(16, 32, stride=2), ConvBNReLU(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        x = self.pool(x).reshape(x.shape[0], -1)
        return self.fc(x)


def build() -> tuple[nn.Module, torch.Tensor]:
    """The demo model (eval mode, fixed seed) and its dummy input, as a CLI ``MODEL`` factory."""
    torch.manual_seed(0)
    return DemoNet().eval(), torch.randn(*INPUT_SHAPE)


def seed_requests(mp: MixedPrecisionConfigurator) -> None:
    """Record six requests on a configurator of a :class:`DemoNet` sim.

    They cover the seed guide's kinds (a leaf layer, a non-leaf block, a type, the model input and
    output) plus a type the model lacks. Each requested layer reads, computes and emits its
    precision (docs/rules.md, rule 4); where its readers stay at int8 the report lists a precision
    change: ``layer1.conv2`` emits int16 into the residual add, whose other input is int8.
    """
    model: Any = mp.sim.model
    mp.set_precision(model.layer1.conv2, activation="int16", param={"weight": "int16"})  # a leaf layer
    mp.set_precision(model.layer2, activation="int16")  # a non-leaf block: every layer inside it
    mp.set_precision(nn.Linear, activation="fp16", param={"weight": "fp16"})  # by type: the fc head
    mp.set_precision(nn.AvgPool2d, activation="int16")  # DemoNet has none: the report lists it as unmatched
    mp.set_model_input_precision(activation="int16")  # the stem reads the image at int16
    mp.set_model_output_precision(activation="fp16")  # agrees with what fc emits

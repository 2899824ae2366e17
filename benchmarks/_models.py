"""Models the benchmark runs: torchvision nets, a 24-block transformer, deep synthetic stacks.

Plain torch/torchvision only (no mixprec, no transformers), so the AIMET venv can build the
same models.
"""

from __future__ import annotations

import math

import torch
from torch import nn

VISION = ("mobilenet_v2", "resnet50", "vit_b_16")
TRANSFORMER = "transformer24"
TRANSFORMER_NOTE = (
    "transformer24 = nn.TransformerEncoder, 24 x nn.TransformerEncoderLayer(d_model=256, nhead=4, "
    "dim_feedforward=1024, batch_first=True), input 1x128x256"
)
SEQ_LEN, D_MODEL = 128, 256
FLUSH_DENORMAL_NOTE = (
    "torch.set_flush_denormal(True): randomly initialized deep nets (weights=None) can carry denormal "
    "activations, which make float CPU math several times slower (resnet50 b8: 3.6 s vs 0.85 s measured) while "
    "fake quant rounds them to 0, so sim/float ratios would mean little; trained weights rarely produce denormals"
)


def build(name: str, image: int = 224) -> tuple[nn.Module, torch.Tensor]:
    """``(model in eval mode, dummy input with batch 1)`` for a model of the benchmark."""
    torch.manual_seed(0)
    if name == TRANSFORMER:
        layer = nn.TransformerEncoderLayer(D_MODEL, 4, 4 * D_MODEL, dropout=0.0, batch_first=True)
        model = nn.TransformerEncoder(layer, 24, enable_nested_tensor=False)
        return model.eval(), torch.randn(1, SEQ_LEN, D_MODEL)
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    return model.eval(), torch.randn(1, 3, image, image)


def images(batch: int, image: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image, image, generator=gen)


class ResidualBlock(nn.Module):
    """``x + relu(linear(x))``: three captured layers (Linear, ReLU, a functional add)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


LAYERS_PER_BLOCK = 3


def deep_stack(layers: int, width: int = 8) -> tuple[nn.Module, torch.Tensor]:
    """A stack of ``ceil(layers / 3)`` residual blocks: about ``layers`` captured layers."""
    torch.manual_seed(0)
    blocks = math.ceil(layers / LAYERS_PER_BLOCK)
    return nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)]).eval(), torch.randn(1, width)

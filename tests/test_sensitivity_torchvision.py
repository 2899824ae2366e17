"""Sensitivity on torchvision's resnet18 with planted fragile layers: they rank first."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixprec

from .models import plant_outlier_weight

torchvision = pytest.importorskip("torchvision")


def _images() -> list[torch.Tensor]:
    return [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))]


@pytest.mark.slow
def test_an_outlier_weight_ranks_first_in_resnet18() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    # 12x the largest weight: 8 bits still resolve the rest, a 4-bit min-max grid rounds them to 0
    plant_outlier_weight(model.layer3[0].conv2, factor=12.0)
    sim = mixprec.QuantizationSimModel(model, dummy_input=_images()[0], quant_scheme="tf")
    rep = mixprec.analyze_sensitivity(sim, _images(), targets=nn.Conv2d, param={"weight": "int4"})
    assert len(rep.rows) == 20 and rep.rows[0].layer == "layer3.0.conv2"
    assert rep.rows[0].delta < rep.rows[1].delta - 3.0 and rep.rows[0].local_sqnr_db < 3.0


@pytest.mark.slow
def test_the_readers_of_a_tensor_spanning_1e4_rank_first_in_resnet18() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    readers = (
        model.layer1[0].conv1,
        model.layer1[1].conv1,
        model.layer2[0].conv1,
        model.layer2[0].downsample[0],
    )
    with torch.no_grad():
        # the stem's channel 0 grows 1e4 times and rides the residual stream through layer1; the convs
        # reading it scale it back, so the float function stays an ordinary net's
        model.bn1.weight[0] *= 1e4
        model.bn1.bias[0] = model.bn1.bias[0].abs() * 1e4
        for conv in readers:
            conv.weight[:, 0] *= 1e-4
    sim = mixprec.QuantizationSimModel(
        model, dummy_input=_images()[0], default_output_bw=16, config_file="per_channel"
    )
    rep = mixprec.analyze_sensitivity(sim, _images(), targets=nn.Conv2d, activation="int8")
    names = {n for n, m in model.named_modules() if any(m is r for r in readers)}
    fragile = {r.layer for r in rep.rows if r.delta < -10.0}
    # the readers, and the stem conv1 where the request also sets the precision of its own (wide) output
    assert names <= fragile <= names | {"conv1"}
    assert [r.layer for r in rep.rows[: len(fragile)]] == sorted(
        fragile
    )  # ranked first (equal deltas: by name)
    assert all(r.delta > -1.0 for r in rep.rows[len(fragile) :])

"""SensitivityReport.suggest: the fewest layers at the higher precision, as a profile that meets the target."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mixprec
from mixprec import RequestError

from .models import build, plant_outlier_weight


class FiveConvs(nn.Module):
    """Five convs in a row, two of them with planted outlier weights (see plant_outlier_weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(6 if i else 3, 6, 3, padding=1) for i in range(5)])
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.convs(x)).mean(dim=(2, 3)))


def _setup(param_bw: int = 8) -> tuple[nn.Module, mixprec.QuantizationSimModel, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = FiveConvs().eval()
    plant_outlier_weight(model.convs[1], 40.0)
    plant_outlier_weight(model.convs[3], 20.0)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 3, 8, 8, generator=gen) for _ in range(2)]
    sim = mixprec.QuantizationSimModel(model, dummy_input=batches[0], default_param_bw=param_bw)
    return model, sim, batches


def _applied_sqnr(
    model: nn.Module, profile: mixprec.Profile, batches: list[torch.Tensor], param_bw: int = 8
) -> float:
    """Apply ``profile`` as a user would (fresh sim, apply_profile, apply, compute_encodings) and measure."""
    sim = mixprec.QuantizationSimModel(model, dummy_input=batches[0], default_param_bw=param_bw)
    mp = mixprec.MixedPrecisionConfigurator(sim)
    mp.apply_profile(profile)
    mp.apply(log_file=None, strict=profile.strict)
    sim.compute_encodings(lambda m, _: [m(b) for b in batches], None)
    with torch.no_grad():
        signal = sum(float(model(b).double().square().sum()) for b in batches)
        noise = sum(float((sim.model(b) - model(b)).double().square().sum()) for b in batches)
    return 10 * math.log10(signal / noise)


def _kept(profile: mixprec.Profile) -> list[str]:
    return [r.target for r in profile.requests if dict(r.param)["weight"].precision.name == "int8"]


def test_the_suggestion_meets_the_target_when_applied_and_one_layer_fewer_does_not(tmp_path) -> None:
    model, sim, batches = _setup()
    rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, param={"weight": "int4"})
    assert [r.layer for r in rep.rows[:2]] == ["convs.1", "convs.3"]
    target = rep.baseline - 12.0  # the two planted layers must stay at int8, not more
    profile = rep.suggest(min_sqnr_db=target)
    path = profile.save(tmp_path / "suggested.yaml")
    loaded = mixprec.load_profile(path)
    assert loaded.requests == profile.requests  # comments are for people; the requests round-trip
    achieved = _applied_sqnr(model, loaded, batches)
    assert achieved >= target
    kept = _kept(profile)
    assert 1 <= len(kept) < 5
    assert kept == [r.layer for r in rep.rows[: len(kept)]]  # the most sensitive, in ranking order
    fewer = rep.suggest(max_kept=len(kept) - 1)
    assert _applied_sqnr(model, fewer, batches) < target  # the fewest in ranking order


def test_each_entry_carries_its_measured_delta_as_a_yaml_comment(tmp_path) -> None:
    _, sim, batches = _setup()
    rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, param={"weight": "int4"})
    profile = rep.suggest(max_kept=2)
    lines = profile.save(tmp_path / "p.yaml").read_text().splitlines()
    entries = [i for i, line in enumerate(lines) if line.startswith("- set_precision")]
    assert len(entries) == len(rep.rows) == 5
    for i, row in zip(entries, rep.rows, strict=True):
        comment = lines[i - 1]
        assert comment.startswith("# ") and row.layer in comment and f"{row.delta:+.3f} dB" in comment
    assert sum(line.startswith("# kept:") for line in lines) == 2
    assert sum(line.startswith("# changed:") for line in lines) == 3


def test_a_count_and_a_budget_pick_from_the_ranking() -> None:
    _, sim, batches = _setup()
    rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, param={"weight": "int4"})
    assert _kept(rep.suggest(max_kept=1)) == [rep.rows[0].layer]
    changed = rep.suggest(num_changed=1)
    assert [r.target for r in changed.requests if dict(r.param)["weight"].precision.name == "int4"] == [
        rep.rows[-1].layer
    ]


def test_when_the_tried_precision_is_higher_the_fewest_layers_are_promoted() -> None:
    model, sim, batches = _setup(param_bw=4)
    rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, param={"weight": "int8"})
    assert rep.rows[-1].delta > 3.0  # promoting a planted layer helps most: it ranks last
    target = rep.baseline + rep.rows[-1].delta - 0.5
    profile = rep.suggest(min_sqnr_db=target)
    promoted = [r.target for r in profile.requests]
    assert 1 <= len(promoted) < 5 and promoted[0] == rep.rows[-1].layer
    assert all(r.comment.startswith("promoted:") for r in profile.requests)
    assert _applied_sqnr(model, profile, batches, param_bw=4) >= target


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "exactly one of"),
        (dict(min_sqnr_db=20.0, max_kept=1), "exactly one of"),
        (dict(min_sqnr_db=1e3), "not met even with every candidate"),
    ],
    ids=["no-goal", "two-goals", "unreachable"],
)
def test_bad_goals_raise_request_errors(kwargs, message) -> None:
    _, sim, batches = _setup()
    rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, param={"weight": "int4"})
    with pytest.raises(RequestError, match=message):
        rep.suggest(**kwargs)


def test_min_sqnr_needs_the_sqnr_metric() -> None:
    model, example = build("small_cnn")
    sim = mixprec.QuantizationSimModel(model, dummy_input=example)
    rep = mixprec.analyze_sensitivity(
        sim,
        [example],
        targets=nn.Conv2d,
        param={"weight": "int4"},
        metric=lambda o, r: float((o - r).abs().max()),
    )
    with pytest.raises(RequestError, match="use target="):
        rep.suggest(min_sqnr_db=10.0)

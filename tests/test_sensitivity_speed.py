"""analyze_sensitivity's shortcuts are exact: the replay check, statistics only where needed, resnet18."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import mixprec

from .models import build


def _batches(example: torch.Tensor, n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(example.shape, generator=gen) for _ in range(n)]


def _rows(rep: mixprec.SensitivityReport) -> list[tuple]:
    return [(r.layer, r.metric, r.local_sqnr_db) for r in rep.rows]


class DriftingScale(nn.Module):
    """A forward whose values (not its calls) depend on Python state that changes every call: a
    replayed prefix keeps the recorded values, so only a sweep's replay check can tell."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 6)
        self.head = nn.Linear(6, 6)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = self.a(x) * (1.0 + 10.0 / self.calls)  # shrinking: never saturates a quantizer
        return self.head(self.c(self.b(x)))  # linear: the drift reaches the output

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 6)


def test_the_replay_check_switches_a_forward_whose_values_drift_to_full_forwards(caplog) -> None:
    torch.manual_seed(0)
    model, example = DriftingScale().eval(), DriftingScale.example_input()
    sim = mixprec.QuantizationSimModel(model, dummy_input=example)
    batches = _batches(example)
    with caplog.at_level(logging.WARNING, logger="mixprec.analysis.sweep"):
        rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Linear, param={"weight": "int4"})
    # latest cut first: head and c replay, the check at b (the middle one) fails, b and a run in full
    assert rep.counts["verified"] == "b"
    assert rep.counts["replayed"] == 2 * len(batches) and rep.counts["full"] == 2 * len(batches)
    assert rep.counts["fallbacks"] == 0  # the calls matched: only the values differed
    assert any("differs from the full forward" in r.getMessage() for r in caplog.records)


def test_the_replay_check_passes_on_one_item_and_every_candidate_replays() -> None:
    model, example = build("small_cnn")
    sim = mixprec.QuantizationSimModel(model, dummy_input=example)
    rep = mixprec.analyze_sensitivity(sim, _batches(example), targets=nn.Conv2d, param={"weight": "int4"})
    assert rep.counts["verified"] and rep.counts["full"] == 0
    assert rep.counts["replayed"] == len(rep.rows) * 3
    phases = (
        "plan_s",
        "float_pass_s",
        "baseline_encodings_s",
        "warm_up_s",
        "baseline_and_record_s",
        "verify_s",
    )
    assert all(rep.timings[k] >= 0.0 for k in phases)
    steps = sum(rep.timings[k] for k in rep.timings if k.startswith("candidates_"))
    assert steps <= rep.timings["sweep_s"] + 1e-3 and rep.timings["total_s"] >= rep.timings["sweep_s"]


def test_keeping_the_sims_encodings_observes_only_the_changed_places() -> None:
    model, example = build("small_cnn")
    sim = mixprec.QuantizationSimModel(model, dummy_input=example)
    batches = _batches(example)
    sim.compute_encodings(lambda m, _: m(batches[0]), None)  # other data than the sweep's
    rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, activation="int4", calibrate=False)
    observed = set(rep._session.observers)
    changed = {ch.place for c in rep._candidates for ch in c.changes}
    assert observed and observed <= changed
    # the stem's row, computed independently: int4 at its output, calibrated on the float values
    # of the same batches, every other encoding as the sim had it
    mp = mixprec.MixedPrecisionConfigurator(sim)
    mp.set_precision(sim.model.stem, activation="int4")
    mp.apply(log_file=None, strict=False)
    fresh = [q for _, q in sim.quantizers() if not q.is_initialized()]
    frozen = [q for _, q in sim.quantizers() if q.is_initialized()]
    for q in frozen:
        q.allow_overwrite(False)
    sim.compute_encodings(lambda m, _: [m(b) for b in batches], None)
    assert fresh
    with torch.no_grad():
        signal = sum(float(model(b).double().square().sum()) for b in batches)
        noise = sum(float((sim.model(b) - model(b)).double().square().sum()) for b in batches)
    row = next(r for r in rep.rows if r.layer == "stem")
    assert row.metric == pytest.approx(10 * math.log10(signal / noise), abs=1e-5)  # float32 squares


@pytest.mark.slow
def test_prefix_reuse_gives_the_rows_of_full_forwards_exactly_in_resnet18() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    sim = mixprec.QuantizationSimModel(model, dummy_input=images[0])
    fast = mixprec.analyze_sensitivity(sim, images, targets=nn.Conv2d, param={"weight": "int4"})
    full = mixprec.analyze_sensitivity(sim, images, targets=nn.Conv2d, param={"weight": "int4"}, fast=False)
    assert _rows(fast) == _rows(full) and fast.baseline == full.baseline
    assert fast.counts["replayed"] == 20 and fast.counts["full"] == 0 and fast.counts["verified"]

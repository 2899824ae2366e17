"""analyze_sensitivity: rankings where the answer is known, exact prefix reuse, suggest, HTML, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mixprec
from mixprec import RequestError

from .models import build, plant_outlier_weight


def _batches(example: torch.Tensor, n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(example.shape, generator=gen) for _ in range(n)]


def _sim(name: str, **kwargs) -> tuple[mixprec.QuantizationSimModel, list[torch.Tensor]]:
    model, example = build(name)
    return mixprec.QuantizationSimModel(model, dummy_input=example, **kwargs), _batches(example)


def _rows(rep: mixprec.SensitivityReport) -> list[tuple[str, float]]:
    return [(r.layer, r.metric) for r in rep.rows]


def _state(sim: mixprec.QuantizationSimModel) -> list[tuple]:
    out = []
    for place in sim.places():
        q = sim.quantizer_at(place)
        enc = q.get_encoding() if q is not None and q.is_initialized() else None
        out.append((place, q.precision if q else None, None if enc is None else enc.scale.clone()))
    return out


def _same_state(a: list[tuple], b: list[tuple]) -> bool:
    return all(
        x[0] == y[0]
        and x[1] == y[1]
        and (x[2] is None) == (y[2] is None)
        and (x[2] is None or torch.equal(x[2], y[2]))
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("planted", ["stem", "block1.0", "block2.0"])
def test_an_outlier_weight_ranks_first_at_int4(planted) -> None:
    sim, batches = _sim("small_cnn")
    plant_outlier_weight(sim.model.get_submodule(planted))
    rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, param={"weight": "int4"})
    assert [r.layer for r in rep.rows][0] == planted
    first, second = rep.rows[0], rep.rows[1]
    assert first.delta < second.delta - 3.0  # by a margin, not by noise
    assert first.tried == "weight int4" and first.quantizers_changed == 1
    assert first.local_sqnr_db < second.local_sqnr_db  # its own output is the worst too
    assert first.params == sum(p.numel() for p in sim.model.get_submodule(planted).parameters())


@pytest.mark.parametrize("scheme", ["tf", "tf_enhanced"])
def test_a_layer_whose_output_spans_1e4_ranks_first_at_int8(scheme) -> None:
    # per-channel weights: the planted stem's weights are fine, only its output's range is wide
    sim, batches = _sim(
        "wide_activation", default_output_bw=16, quant_scheme=scheme, config_file="per_channel"
    )
    rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, activation="int8")
    assert rep.rows[0].layer == "stem"
    assert rep.rows[0].delta < -10.0 and all(abs(r.delta) < 1.0 for r in rep.rows[1:])


def test_prefix_reuse_gives_the_rows_of_full_forwards_exactly() -> None:
    sim, batches = _sim("small_cnn")
    plant_outlier_weight(sim.model.block2[0])
    fast = mixprec.analyze_sensitivity(sim, batches, targets=[nn.Conv2d, nn.Linear], param={"weight": "int4"})
    full = mixprec.analyze_sensitivity(
        sim, batches, targets=[nn.Conv2d, nn.Linear], param={"weight": "int4"}, fast=False
    )
    assert _rows(fast) == _rows(full)
    assert [r.local_sqnr_db for r in fast.rows] == [r.local_sqnr_db for r in full.rows]
    assert fast.counts["replayed"] > 0 and fast.counts["fallbacks"] == 0


def test_a_forward_that_changes_between_calls_falls_back_to_full_forwards() -> None:
    sim, batches = _sim("stateful_branch")
    fast = mixprec.analyze_sensitivity(sim, batches, targets=nn.Linear, param={"weight": "int4"})
    full = mixprec.analyze_sensitivity(sim, batches, targets=nn.Linear, param={"weight": "int4"}, fast=False)
    assert _rows(fast) == _rows(full)
    assert fast.counts["fallbacks"] > 0


@pytest.mark.parametrize(
    "tried", [{"param": {"weight": "int4"}}, {"activation": "int4"}], ids=["weight", "activation"]
)
def test_the_sim_is_left_as_it_was(tried) -> None:
    sim, batches = _sim("small_cnn")
    sim.compute_encodings(lambda m, _: m(batches[0]), None)  # calibrated on other data than the sweep's
    before = _state(sim)
    rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, **tried)
    assert _same_state(before, _state(sim))
    rep.suggest(num_changed=1)
    assert _same_state(before, _state(sim))


def test_baseline_is_the_sim_calibrated_on_the_same_batches() -> None:
    sim, batches = _sim("small_cnn")
    rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, param={"weight": "int4"})
    model, _ = build("small_cnn")
    sim.compute_encodings(lambda m, _: [m(b) for b in batches], None)
    with torch.no_grad():
        signal = sum(float(model(b).double().square().sum()) for b in batches)
        noise = sum(float((sim.model(b) - model(b)).double().square().sum()) for b in batches)
    assert rep.baseline == pytest.approx(10 * math.log10(signal / noise), abs=1e-5)  # float32 squares


def test_keep_encodings_needs_a_calibrated_sim() -> None:
    sim, batches = _sim("small_cnn")
    with pytest.raises(mixprec.EncodingNotComputedError, match="calibrate=False"):
        mixprec.analyze_sensitivity(
            sim, batches, targets=nn.Conv2d, param={"weight": "int4"}, calibrate=False
        )
    sim.compute_encodings(lambda m, _: m(batches[0]), None)
    rep = mixprec.analyze_sensitivity(
        sim, batches, targets=nn.Conv2d, param={"weight": "int4"}, calibrate=False
    )
    assert len(rep.rows) == 3


def test_a_custom_lower_is_better_metric_ranks_the_same_layer_first() -> None:
    sim, batches = _sim("small_cnn")
    plant_outlier_weight(sim.model.block1[0])

    def mse(output: torch.Tensor, reference: torch.Tensor) -> float:
        return float((output - reference).square().mean())

    rep = mixprec.analyze_sensitivity(
        sim, batches, targets=nn.Conv2d, param={"weight": "int4"}, metric=mse, higher_is_better=False
    )
    assert rep.rows[0].layer == "block1.0" and rep.rows[0].delta > 0
    assert rep.to_dict()["metric"] == {"name": "mse", "unit": "", "higher_is_better": False}


def test_rows_carry_macs_and_to_dict_has_every_column() -> None:
    sim, batches = _sim("small_cnn")
    rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, param={"weight": "int4"})
    row = next(r for r in rep.to_dict()["rows"] if r["layer"] == "stem")
    assert row["macs"] == 8 * 8 * 8 * 3 * 3 * 3  # outputs per image x (inputs x kernel)
    assert set(row) == {
        "layer", "type", "tried", "metric", "delta", "local_sqnr_db", "params", "macs", "quantizers_changed"
    }  # fmt: skip


def test_the_html_page_is_self_contained_and_sorted(tmp_path) -> None:
    sim, batches = _sim("small_cnn")
    plant_outlier_weight(sim.model.block2[0])
    rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, param={"weight": "int4"})
    text = rep.to_html(tmp_path / "s.html").read_text()
    assert "<svg" in text and "<table>" in text
    assert "src=" not in text and "href=" not in text and "@import" not in text  # nothing to fetch
    table = text[text.index("<table>") :]
    positions = [table.index(f"<td class='l'>{r.layer}</td>") for r in rep.rows]
    assert positions == sorted(positions) and rep.rows[0].layer == "block2.0"  # most sensitive first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(targets=nn.Conv2d), "needs a precision to try"),
        (dict(targets=nn.LSTM, param={"weight": "int4"}), "names no module"),
        (dict(targets=42, param={"weight": "int4"}), "is not accepted"),
        (dict(targets=nn.Conv2d, param={"weight": "int33"}), "not valid"),
        (dict(targets=nn.Conv2d, param={"weight": "int4"}, metric="sqnr"), "metric must be"),
        (dict(targets=nn.ReLU, param={"weight": "int4"}), "changes no quantizer"),
    ],
    ids=["no-precision", "no-such-module", "bad-target", "bad-precision", "bad-metric", "nothing-changes"],
)
def test_bad_arguments_raise_request_errors_and_change_nothing(kwargs, message) -> None:
    sim, batches = _sim("small_cnn")
    before = _state(sim)
    with pytest.raises(RequestError, match=message):
        mixprec.analyze_sensitivity(sim, batches, **kwargs)
    assert _same_state(before, _state(sim))


def test_a_new_quantizer_where_the_baseline_has_none_is_calibrated_on_the_same_batches(monkeypatch) -> None:
    from mixprec.analysis.session import Session

    sim, batches = _sim("small_cnn")
    stem_output = next(
        p for p in sim.places() if p.kind.value == "output" and sim.describe(p) == "stem output 0"
    )
    sim.set_precision_at(stem_output, None)  # block1.0 reads a float tensor in the baseline
    observed = []
    original = Session._observe_new
    monkeypatch.setattr(
        Session, "_observe_new", lambda self, missing: (observed.append(missing), original(self, missing))
    )
    fast = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, activation="int4")
    full = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, activation="int4", fast=False)
    assert observed and _rows(fast) == _rows(full)
    row = next(r for r in fast.rows if r.layer == "block1.0")
    assert math.isfinite(row.metric) and row.delta < 0
    assert sim.quantizer_at(stem_output) is None  # and it is gone again


def test_function_targets_give_one_candidate_per_call_site() -> None:
    import torch.nn.functional as F

    sim, batches = _sim("functional")
    fast = mixprec.analyze_sensitivity(sim, batches, targets=[torch.matmul, F.softmax], activation="int4")
    full = mixprec.analyze_sensitivity(
        sim, batches, targets=[torch.matmul, F.softmax], activation="int4", fast=False
    )
    assert sorted(r.type for r in fast.rows) == ["matmul", "softmax"]
    assert all(r.local_sqnr_db is None and r.macs is None for r in fast.rows)  # no module to hook
    assert _rows(fast) == _rows(full)
    assert fast.counts["full"] == 2 * len(batches)  # called from the root's own forward: nothing to reuse

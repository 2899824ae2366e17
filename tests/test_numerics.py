"""Numerics on real model patterns: additive masks, integer-valued tensors, layer names."""

from __future__ import annotations

import pytest
import torch

from mixprec import QuantizationSimModel
from mixprec.errors import EncodingNotComputedError
from tests.helpers import sqnr_db
from tests.models import (
    CastingForward,
    EmptyBranch,
    HistcRouting,
    TinyValues,
    sharpen_attention,
    tiny_llama,
    tiny_mixtral,
)


def _calibrated(model, dummy, bits: int) -> QuantizationSimModel:
    sim = QuantizationSimModel(model, dummy, default_output_bw=bits, default_param_bw=bits)
    if isinstance(dummy, dict):
        sim.compute_encodings(lambda m, _: m(**dummy), None)
    else:
        sim.compute_encodings(lambda m, _: m(dummy), None)
    return sim


def _logits_sqnr(model, dummy, bits: int) -> float:
    with torch.no_grad():
        reference = model(**dummy).logits
        return sqnr_db(reference, _calibrated(model, dummy, bits).model(**dummy).logits)


def test_eager_attention_mask_sets_no_range_and_stays_masked():
    eager = _logits_sqnr(*tiny_llama("eager"), 16)
    sdpa = _logits_sqnr(*tiny_llama("sdpa"), 16)
    assert eager >= sdpa - 3, (eager, sdpa)
    model, dummy = tiny_llama("eager")
    sharpen_attention(model, 6.0)
    assert _logits_sqnr(model, dummy, 8) >= 20


def test_mask_values_pass_through_and_are_excluded_from_the_range():
    model, dummy = tiny_llama("eager", layers=1)
    sim = _calibrated(model, dummy, 8)
    passing = [(p, q) for p, q in sim.quantizers() if q.passes_masks]
    assert passing, "the scores + mask add must be recognised as carrying mask values"
    for _, q in passing:
        assert float(q.get_encoding().min) > -1e4
    x = torch.tensor([-3.0e38, -1.0, 0.5, float("-inf")])
    q = passing[0][1]
    out = q(x)
    assert out[0] == x[0] and out[3] == x[3]
    assert -1.0 - 1.0 < float(out[1]) < 1.0


def test_mask_threshold_override_treats_masks_as_data():
    model, dummy = tiny_llama("eager", layers=1)
    sim = QuantizationSimModel(model, dummy, default_output_bw=16, default_param_bw=16)
    sim.mask_threshold = None
    sim.compute_encodings(lambda m, _: m(**dummy), None)
    assert not any(q.passes_masks for _, q in sim.quantizers())
    with pytest.raises(ValueError, match="mask_threshold"):
        sim.mask_threshold = 5.0
    assert sim.mask_threshold is None


def test_integer_valued_tensors_are_not_quantized():
    torch.manual_seed(0)
    model = HistcRouting().eval()
    x = model.example_input()
    sim = _calibrated(model, x, 8)
    by_type = {layer.type_name: layer for layer in sim.graph.layers}
    histc, cumsum = by_type["histc"], by_type["cumsum"]
    assert sim.placement.outputs[histc.index] == [None]
    assert sim.placement.inputs[cumsum.index] == [None]
    assert sim.placement.outputs[by_type["sigmoid"].index] != [None]  # real values keep theirs
    with torch.no_grad():
        assert sqnr_db(model(x), sim.model(x)) > 25


def test_mixtral_routing_matches_float_model():
    model, dummy = tiny_mixtral()
    dummy["output_router_logits"] = True
    with torch.no_grad():
        reference = model(**dummy)
        sim = _calibrated(model, dummy, 16)
        out = sim.model(**dummy)
    assert sqnr_db(reference.logits, out.logits) >= 60
    for ref_router, sim_router in zip(reference.router_logits, out.router_logits, strict=True):
        assert torch.equal(ref_router.topk(2).indices, sim_router.topk(2).indices)


def test_module_attribute_names_are_valid_layer_names():
    torch.manual_seed(0)
    model = CastingForward().eval()
    sim = _calibrated(model, CastingForward.example_input(), 8)
    names = {layer.name for layer in sim.graph.layers}
    assert {"to", "float", "type", "half"} <= names
    assert sim.model(CastingForward.example_input()).shape == (2, 4)


def test_labels_in_a_llama_dummy_dict():
    model, dummy = tiny_llama("sdpa", layers=1)
    dummy["labels"] = dummy["input_ids"].clone()
    sim = _calibrated(model, dummy, 8)
    with torch.no_grad():
        assert torch.isfinite(sim.model(**dummy).loss)


def test_quantizers_seeing_only_empty_tensors_warn_and_are_listed():
    torch.manual_seed(0)
    model = EmptyBranch().eval()
    x = EmptyBranch.example_input()
    sim = QuantizationSimModel(model, x)
    with pytest.warns(UserWarning, match=r"only empty tensors .*mul output 0"):
        sim.compute_encodings(lambda m, _: m(x), None)
    assert "mul output 0" in sim.empty_at_calibration
    assert "fc output 0" not in sim.empty_at_calibration
    y, picked = sim.model(x)
    assert picked.shape == (0, 4)
    (q,) = [q for _, q in sim.quantizers() if q.label == "mul output 0"]
    with pytest.raises(EncodingNotComputedError, match="mul output 0"):
        q(torch.ones(2, 4))  # values reaching it later: no silent pass-through


def test_values_below_the_smallest_range_warn():
    torch.manual_seed(0)
    model = TinyValues().eval()
    x = TinyValues.example_input()
    sim = QuantizationSimModel(model, x)
    with pytest.warns(UserWarning, match=r"quantize to 0 at: mul output 0 \(max \|x\| = "):
        sim.compute_encodings(lambda m, _: m(x), None)


def test_linear_type_target_matches_gpt2_conv1d():
    from mixprec import MixedPrecisionConfigurator
    from tests.models import tiny_gpt2

    model, dummy = tiny_gpt2()
    sim = QuantizationSimModel(model, dummy)
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(torch.nn.Linear, activation="int16", param={"weight": "int16"})
    mp.apply()
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "lm_head"):
        (layer,) = [x for x in sim.graph.layers if x.name == name]
        q = sim.quantizer_at(
            next(p for p in sim.places() if p.layer == layer.index and p.kind.value == "param")
        )
        assert q.precision.name == "int16", name


def test_report_lists_layers_that_saw_only_empty_tensors(tmp_path):
    from mixprec import MixedPrecisionConfigurator
    from mixprec.report.build import empty_rows

    model = EmptyBranch().eval()
    x = EmptyBranch.example_input()
    sim = QuantizationSimModel(model, x)
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(sim.model.fc, activation="int16")
    report = mp.apply(log_file=None)
    assert report.empty_at_calibration == []  # not calibrated yet
    with pytest.warns(UserWarning, match="only empty tensors"):
        sim.compute_encodings(lambda m, _: m(x), None)
    report.note_calibration(empty_rows(sim))
    rows = report.to_dict()["empty_at_calibration"]
    assert {"layer": "mul", "quantizer": "mul output 0"} in rows
    assert {r["quantizer"] for r in rows} == set(sim.empty_at_calibration)
    assert "Layers that saw only empty tensors during calibration (no encoding): " in report.to_text()
    assert "  mul: mul output 0\n" in report.to_text()
    page = report.to_html(tmp_path / "r.html").read_text()
    assert 'id="empty-at-calibration"' in page and "<code>mul</code>" in page
    # a report built after calibration has them from the start
    again = MixedPrecisionConfigurator(sim)
    again.set_precision(sim.model.fc, activation="int16")
    assert again.preview().empty_at_calibration == rows

"""Exports of real model patterns: additive masks in the QDQ model, keyword inputs through the
TorchScript fallback, mask handling surviving an encodings round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mixprec import QuantizationSimModel
from mixprec.export import trace as onnx_trace
from tests.helpers import sqnr_db
from tests.models import KeywordOnly, tiny_llama


@pytest.fixture
def torchscript_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("forced failure")

    monkeypatch.setattr(onnx_trace, "_export_dynamo", fail)


@pytest.mark.slow
def test_eager_llama_qdq_keeps_masks(tmp_path: Path) -> None:
    model, inputs = tiny_llama("eager", layers=1)
    sim = QuantizationSimModel(model, dummy_input=inputs, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(**inputs), None)
    assert any(q.passes_masks for _, q in sim.quantizers())
    result = sim.export(tmp_path, "llama", dummy_input=inputs)
    assert result.covered == result.quantizers
    names = [i.name for i in _session(result.qdq_onnx_path).get_inputs()]
    (logits,) = _session(result.qdq_onnx_path).run(None, {k: inputs[k].numpy() for k in names})
    with torch.no_grad():
        want = sim.model(**inputs).logits
    assert sqnr_db(want, torch.from_numpy(logits)) >= 40
    fresh = QuantizationSimModel(model, dummy_input=inputs, quant_scheme="tf")
    fresh.load_encodings(result.encodings_path)
    assert sorted(q.label for _, q in fresh.quantizers() if q.passes_masks) == sorted(
        q.label for _, q in sim.quantizers() if q.passes_masks
    )
    with torch.no_grad():
        np.testing.assert_array_equal(fresh.model(**inputs).logits.numpy(), want.numpy())


def test_torchscript_fallback_passes_keyword_inputs(tmp_path: Path, torchscript_only: None) -> None:
    torch.manual_seed(0)
    model = KeywordOnly().eval()
    inputs = KeywordOnly.example_input()
    sim = QuantizationSimModel(model, dummy_input=inputs, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(**inputs), None)
    with pytest.warns(UserWarning, match="legacy TorchScript"):
        result = sim.export(tmp_path, "kw", dummy_input=inputs)
    assert result.exporter == "torchscript" and result.covered == result.quantizers
    session = _session(result.qdq_onnx_path)
    assert [i.name for i in session.get_inputs()] == ["x", "y"]
    (out,) = session.run(None, {k: inputs[k].numpy() for k in ("x", "y")})
    with torch.no_grad():
        want = sim.model(**inputs)
    np.testing.assert_allclose(out, want.numpy(), atol=1e-5)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

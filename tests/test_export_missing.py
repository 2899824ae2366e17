"""Export errors for quantizers the exported graph lacks say why: a path the exporter's trace did
not take, or a value the exporter left out (docs/export.md, "Coverage check")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mixprec import (
    EncodingNotComputedError,
    ExportCoverageError,
    ExportError,
    MixedPrecisionConfigurator,
    QuantizationSimModel,
)
from mixprec.export import trace as onnx_trace
from mixprec.export.missing import compact

from .models import build


class SideValue(nn.Module):
    """Computes a quantized value that only Python reads (its size): no output depends on it, so
    exporters leave it out of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.aux = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = torch.tanh(self.aux(x)).shape[-1]
        return self.fc(x)[..., :width]


def _side_value() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return SideValue().eval(), torch.randn(2, 6)


def _calibrated(name: str, *inputs: tuple) -> QuantizationSimModel:
    model, example = _side_value() if name == "side_value" else build(name)
    sim = QuantizationSimModel(model, dummy_input=example, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: [m(*args) for args in inputs or [(example,)]], None)
    return sim


def test_loop_iterations_the_export_trace_skips_are_named_as_not_traced(tmp_path: Path) -> None:
    # built and calibrated with 3 iterations (RAFT's recurrent updates), exported with 1
    sim = _calibrated("looped")
    x = torch.randn(2, 6)
    with pytest.raises(ExportCoverageError) as info:
        sim.export(tmp_path, "m", dummy_input=(x, 1))
    err = info.value
    assert set(err.not_traced) == {"fc#1", "fc#2", "tanh_1", "tanh_2", "add_1", "add_2"}
    assert err.removed == err.misaligned == ()
    message = str(err)
    assert "did not run while the exporter traced the model" in message
    assert "'fc#1,#2'" in message and "dummy_input that takes this path" in message
    assert "bug" not in message
    assert list(tmp_path.iterdir()) == []
    # the same sim exports completely with inputs that take every path
    result = sim.export(tmp_path, "m", dummy_input=(x, 3))
    assert result.covered == result.quantizers


def test_value_only_python_reads_is_named_as_removed_by_torch_export(tmp_path: Path) -> None:
    sim = _calibrated("side_value")
    with pytest.raises(ExportCoverageError) as info:
        sim.export(tmp_path, "m", dummy_input=torch.randn(2, 6))
    err = info.value
    # tanh's output, which no layer reads, starts unquantized; aux's output feeds only tanh
    assert err.not_traced == () and err.removed == ("aux",)
    assert "torch.export left their values out of the program" in str(err)
    # the advice works: those layers in float, the export covers every quantizer left
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision("aux", activation="fp32", param={"weight": "fp32"})
    mp.apply(log_file=None)
    result = sim.export(tmp_path, "m", dummy_input=torch.randn(2, 6))
    assert result.covered == result.quantizers == 2


def test_value_removed_by_torchscript_trace_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("forced failure")

    monkeypatch.setattr(onnx_trace, "_export_dynamo", fail)
    sim = _calibrated("side_value")
    with pytest.warns(UserWarning, match="legacy TorchScript"), pytest.raises(ExportError) as info:
        sim.export(tmp_path, "m", dummy_input=torch.randn(2, 6))
    assert isinstance(info.value, ExportCoverageError)
    assert info.value.removed == ("aux",)
    assert "TorchScript trace, but the traced graph does not use their values" in str(info.value)


def test_compact_merges_calls_of_one_module_and_counts_the_rest() -> None:
    assert compact(["a.conv#1", "a.conv#2", "relu", "b#1"]) == "'a.conv#1,#2', 'relu', 'b#1'"
    many = [f"layer{i}" for i in range(15)]
    assert compact(many).endswith("'layer11' and 3 more")


class TracedBranch(nn.Module):
    """Makes one more ``add`` (of integers) when traced, before its quantized one: transformers'
    mask code under torch.export (BART's decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            torch.arange(x.shape[-1]) + 1  # noqa: B018 (the call is the point)
        return self.fc(x) + x


def test_calls_that_differ_under_the_trace_are_named(tmp_path: Path) -> None:
    x = torch.randn(2, 6)
    sim = QuantizationSimModel(TracedBranch().eval(), dummy_input=x, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x), None)
    with pytest.raises(ExportCoverageError) as info:
        sim.export(tmp_path, "m", dummy_input=x)
    assert info.value.misaligned == ("add",) and info.value.not_traced == info.value.removed == ()
    assert "(1 more calls of add in 'the model')" in str(info.value)
    assert "did not line up with the exporter's trace" in str(info.value)


def test_layers_first_run_after_calibration_ask_for_data_that_reaches_them(tmp_path: Path) -> None:
    sim = _calibrated("looped")  # 3 iterations
    x = torch.randn(2, 6)
    with torch.no_grad(), pytest.raises(EncodingNotComputedError):
        sim.model(x, 4)  # a 4th iteration, first seen after calibration: its layers get no encoding
    with pytest.raises(
        ExportError, match=r"'fc#3 output 0'.*did not run during compute_encodings.*reaches them"
    ):
        sim.export(tmp_path, "m", dummy_input=(x, 4))


def test_outputs_no_layer_reads_start_unquantized() -> None:
    model, example = _side_value()
    sim = QuantizationSimModel(model, dummy_input=example)
    labels = {q.label for _, q in sim.quantizers()}
    assert "tanh output 0" not in labels and "aux output 0" in labels
    assert any(sim.describe(p) == "tanh output 0" for p in sim.places())  # a place a request can set

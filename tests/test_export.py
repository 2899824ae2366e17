"""Export: onnxruntime runs the QDQ model like the sim, the encodings file reloads bit for bit and
uses the float model's tensor names, and export never leaves partial or incomplete artifacts."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

from mixprec import ExportCoverageError, ExportError, MixedPrecisionConfigurator, QuantizationSimModel
from mixprec.export import trace as _onnx_trace
from mixprec.export.exporter import ExportResult

from .models import build, tiny_llama

# Outputs may differ from the sim by a few steps of the output quantizer: onnxruntime's float
# convolutions and matmuls sum in another order than PyTorch's, and its QuantizeLinear divides by
# the scale where the sim multiplies by the reciprocal, so an activation within an ulp of a
# rounding boundary can land one step away, and that step travels downstream. (Weights cannot
# differ: the QDQ model holds them on the sim's grid.) Measured: 2 steps at most on resnet18,
# 1 on mobilenet_v2, 0 or 1 on the tiny models.
OUTPUT_STEPS = 4

# A config exercising the unusual forms: strict symmetric grids, quantized biases and Add inputs.
EXOTIC_CONFIG = {
    "defaults": {
        "ops": {"is_output_quantized": "True", "is_symmetric": "False"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
        "strict_symmetric": "True",
        "per_channel_quantization": "True",
    },
    "op_type": {"Add": {"is_input_quantized": "True"}},
    "model_input": {"is_input_quantized": "True"},
}


def _resnet18_int16(sim: QuantizationSimModel) -> None:
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(sim.model.layer1, activation="int16", param={"weight": "int16"})
    mp.apply(log_file=None)


def _exotic(sim: QuantizationSimModel) -> None:
    mp = MixedPrecisionConfigurator(sim)
    block = {"precision": "int4", "block_size": 4}
    mp.set_precision(sim.model.q, activation="int6", param={"weight": block, "bias": "int32"})
    mp.set_precision(torch.nn.functional.softmax, activation="fp16")
    mp.set_precision(torch.matmul, activation="int16")
    mp.set_precision(sim.model.k, activation="int12", param={"weight": "int3"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the k request overrides q's on their shared input
        mp.apply(log_file=None, strict=False)


def _floats(sim: QuantizationSimModel) -> None:
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(
        sim.model.block2[0], activation=None, param={"weight": {"precision": "int4", "block_size": 4}}
    )
    mp.set_precision(sim.model.fc, activation="fp8", param={"weight": "fp8"})
    mp.set_precision(sim.model.block1, activation="bf16")
    mp.apply(log_file=None)


def _torchvision(name: str):
    def make() -> tuple[torch.nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        return getattr(torchvision.models, name)(weights=None).eval(), torch.randn(1, 3, 64, 64)

    return make


# id -> (model factory, sim config, precision profile applied before calibration)
CASES = {
    "resnet18-int8": (_torchvision("resnet18"), None, None),
    "resnet18-int8-int16-per_channel": (_torchvision("resnet18"), "per_channel", _resnet18_int16),
    "mobilenet_v2-int8": (_torchvision("mobilenet_v2"), None, None),
    "functional": (lambda: build("functional"), None, None),
    "multi_io": (lambda: build("multi_io"), None, None),
    "small_cnn-per_channel-bf16-fp8-int4_conv_blocks": (lambda: build("small_cnn"), "per_channel", _floats),
    "functional-int3-int4_blocks-int6-int12-int16-int32-fp16": (
        lambda: build("functional"),
        EXOTIC_CONFIG,
        _exotic,
    ),
}


def _as_tuple(x: object) -> tuple:
    return x if isinstance(x, tuple) else (x,)


@dataclass
class Exported:
    model: torch.nn.Module
    config: object
    sim: QuantizationSimModel
    result: ExportResult
    inputs: list[tuple]  # the dummy input, then 4 random ones
    before: tuple  # the sim's outputs on the dummy input before export
    _outputs: dict[int, tuple] = field(default_factory=dict)

    @property
    def encodings(self) -> dict:
        return json.loads(self.result.encodings_path.read_text())

    def sim_outputs(self, i: int) -> tuple:
        """The sim's outputs on ``inputs[i]`` (computed once: big models are slow on 2 cores)."""
        if i not in self._outputs:
            self._outputs[i] = _sim_outputs(self.sim, self.inputs[i])
        return self._outputs[i]


def _sim_outputs(sim: QuantizationSimModel, args: tuple) -> tuple:
    with torch.no_grad():
        return _as_tuple(sim.model(*args))


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # run the graph as written: higher levels fuse Q/DQ into onnxruntime's own integer kernels
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, args: tuple) -> list[np.ndarray]:
    return session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)})


# torchvision models take most of this file's time (about a minute on 2 cores): slow tests.
_PARAMS = [
    pytest.param(k, marks=pytest.mark.slow) if k.startswith(("resnet", "mobilenet")) else k for k in CASES
]


@pytest.fixture(scope="module", params=_PARAMS, ids=list(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    make, config, profile = CASES[request.param]
    model, example = make()
    args = _as_tuple(example)
    sim = QuantizationSimModel(model, dummy_input=example, config_file=config, quant_scheme="tf")
    if profile is not None:
        profile(sim)
    sim.compute_encodings(lambda m, _: m(*args), None)
    before = _sim_outputs(sim, args)
    result = sim.export(tmp_path_factory.mktemp("export"), "model", dummy_input=example)
    gen = torch.Generator().manual_seed(1)
    inputs = [args] + [tuple(torch.randn(a.shape, generator=gen) for a in args) for _ in range(4)]
    return Exported(model, config, sim, result, inputs, before)


def test_export_covers_every_quantizer(exported: Exported) -> None:
    result = exported.result
    assert result.covered == result.quantizers == len(list(exported.sim.quantizers()))
    assert result.by_precision == Counter(q.precision.name for _, q in exported.sim.quantizers())
    assert result.exporter == "dynamo" and not result.notes
    assert f"{result.covered}/{result.quantizers} quantizers covered" in result.summary()


def test_qdq_model_matches_sim_within_output_steps(exported: Exported) -> None:
    session = _session(exported.result.qdq_onnx_path)
    scales = {k: v[0].get("scale", 0.0) for k, v in exported.encodings["activation_encodings"].items()}
    for i, args in enumerate(exported.inputs):
        ort_outputs = _run(session, args)
        for meta, got, want in zip(session.get_outputs(), ort_outputs, exported.sim_outputs(i), strict=True):
            tolerance = OUTPUT_STEPS * scales[meta.name]
            diff = float(np.abs(got - want.numpy()).max())
            assert diff <= tolerance, f"{meta.name}: max |onnxruntime - sim| = {diff:.3g} > {tolerance:.3g}"


def test_float_model_matches_float_torch_model(exported: Exported) -> None:
    session = _session(exported.result.onnx_path)
    args = exported.inputs[1]
    with torch.no_grad():
        want = _as_tuple(exported.model(*args))
    for got, ref in zip(_run(session, args), want, strict=True):
        ref = ref.numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()) + 1e-30)


def test_loading_encodings_into_fresh_sim_is_bit_exact(exported: Exported) -> None:
    model, example = exported.model, exported.inputs[0]
    fresh = QuantizationSimModel(model, dummy_input=example, config_file=exported.config, quant_scheme="tf")
    fresh.load_encodings(exported.result.encodings_path)
    for i in range(2):
        for got, want in zip(_sim_outputs(fresh, exported.inputs[i]), exported.sim_outputs(i), strict=True):
            assert torch.equal(got, want)


def test_encoding_names_are_tensors_of_float_model(exported: Exported) -> None:
    graph = onnx.load(str(exported.result.onnx_path)).graph
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {o for n in graph.node for o in n.output}
    doc = exported.encodings
    keys = set(doc["activation_encodings"]) | set(doc["param_encodings"])
    assert keys and keys <= names
    assert {q["tensor"] for q in doc["mixprec"]["quantizers"] if q["tensor"]} <= keys


def test_artifacts_hold_each_quantizer_at_sim_precision(exported: Exported) -> None:
    doc = exported.encodings
    rows = {q["label"]: q for q in doc["mixprec"]["quantizers"]}
    qdq = onnx.load(str(exported.result.qdq_onnx_path)).graph
    zero_point_types = {t.name: t.data_type for t in qdq.initializer}
    # QDQ nodes are named "<tensor>/QuantizeLinear" after the tensor the encodings key
    q_types = {
        n.name.rsplit("/", 1)[0]: zero_point_types[n.input[2]]
        for n in qdq.node
        if n.op_type == "QuantizeLinear"
    }
    for place, q in exported.sim.quantizers():
        row = rows[exported.sim.describe(place)]
        assert row["precision"] == q.precision.name
        entries = doc[row["section"]][row["tensor"]]
        assert {e["bitwidth"] for e in entries} == {q.precision.bits}
        assert len(entries) == (q.scale.numel() if q.needs_encoding else 1)
        if q.precision.name in ("int8", "int16") and not getattr(q, "strict_symmetric", False):
            wanted = {
                8: (onnx.TensorProto.INT8, onnx.TensorProto.UINT8),
                16: (onnx.TensorProto.INT16, onnx.TensorProto.UINT16),
            }
            assert q_types[row["tensor"]] in wanted[q.precision.bits]


def test_export_leaves_sim_forward_unchanged(exported: Exported) -> None:
    assert all(torch.equal(a, b) for a, b in zip(exported.sim_outputs(0), exported.before, strict=True))


@pytest.mark.slow
def test_transformers_llama_with_keyword_inputs(tmp_path: Path) -> None:
    model, inputs = tiny_llama(layers=1)
    sim = QuantizationSimModel(model, dummy_input=inputs, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(**inputs), None)
    result = sim.export(tmp_path, "llama", dummy_input=inputs)
    assert result.covered == result.quantizers and result.exporter == "dynamo"
    session = _session(result.qdq_onnx_path)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    (logits,) = session.run(None, {k: inputs[k].numpy() for k in ("input_ids", "attention_mask")})
    with torch.no_grad():
        want = sim.model(**inputs).logits
    scale = json.loads(result.encodings_path.read_text())["activation_encodings"]["output_logits"][0]["scale"]
    assert float(np.abs(logits - want.numpy()).max()) <= OUTPUT_STEPS * scale
    fresh = QuantizationSimModel(model, dummy_input=inputs, quant_scheme="tf")
    fresh.load_encodings(result.encodings_path)
    with torch.no_grad():
        assert torch.equal(fresh.model(**inputs).logits, want)


# ----------------------------------------------------------------------------- errors and fallbacks


@pytest.fixture
def torchscript_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the legacy exporter: the behaviours below do not depend on the exporter, and it is
    ~20x faster than the torch.export-based one on tiny models."""

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("forced failure")

    monkeypatch.setattr(_onnx_trace, "_export_dynamo", fail)


def _calibrated(name: str) -> tuple[QuantizationSimModel, tuple]:
    model, example = build(name)
    sim = QuantizationSimModel(model, dummy_input=example, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(*_as_tuple(example)), None)
    return sim, _as_tuple(example)


def test_export_before_compute_encodings_names_quantizer_and_writes_nothing(tmp_path: Path) -> None:
    model, example = build("small_cnn")
    sim = QuantizationSimModel(model, dummy_input=example)
    with pytest.raises(
        ExportError, match=r"no encoding \('model input input\[0\]', 'stem output 0'.*compute_encodings"
    ):
        sim.export(tmp_path / "out", "m", dummy_input=example)
    assert not (tmp_path / "out").exists()


def test_export_to_unwritable_path_raises_and_writes_nothing(tmp_path: Path) -> None:
    sim, args = _calibrated("small_cnn")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="is not a directory; nothing was written"):
        sim.export(blocker / "out", "m", dummy_input=args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.usefixtures("torchscript_only")
def test_failure_while_writing_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sim, args = _calibrated("small_cnn")
    real_replace, calls = os.replace, []

    def replace_then_fail(src: str, dst: Path) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    with (
        pytest.warns(UserWarning, match="legacy TorchScript"),
        pytest.raises(ExportError, match="No space left"),
    ):
        sim.export(tmp_path, "m", dummy_input=args)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("torchscript_only")
def test_quantizer_missing_from_graph_is_export_error_naming_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim, args = _calibrated("functional")
    lost = next(i for i, (p, _) in enumerate(sim.quantizers()) if sim.describe(p) == "matmul output 0")
    real = _onnx_trace.marked_forward
    # as if the exporter had dropped the marker of one quantizer
    monkeypatch.setattr(_onnx_trace, "marked_forward", lambda i: (lambda x: x) if i == lost else real(i))
    why = r"1 quantizers of 1 layers \('matmul'\) ran during the TorchScript trace"
    with pytest.warns(UserWarning), pytest.raises(ExportCoverageError, match=why) as info:
        sim.export(tmp_path, "m", dummy_input=args)
    assert info.value.removed == ("matmul",) and info.value.not_traced == ()
    assert list(tmp_path.iterdir()) == []


def test_legacy_exporter_fallback_is_noted_and_matches_sim(
    tmp_path: Path, torchscript_only: None, caplog: pytest.LogCaptureFixture
) -> None:
    sim, args = _calibrated("multi_io")
    with (
        caplog.at_level("INFO", logger="mixprec.export"),
        pytest.warns(UserWarning, match="torch.export-based ONNX exporter failed .*forced failure"),
    ):
        result = sim.export(tmp_path, "m")  # no dummy_input: random inputs of the captured shapes
    assert result.exporter == "torchscript" and "legacy TorchScript" in result.summary()
    assert caplog.messages == [result.summary()]
    assert result.covered == result.quantizers
    session = _session(result.qdq_onnx_path)
    assert [i.name for i in session.get_inputs()] == ["input_0", "input_1"]
    for got, want in zip(_run(session, args), _sim_outputs(sim, args), strict=True):
        np.testing.assert_array_equal(got, want.numpy())


def test_load_refuses_file_without_mixprec_section(tmp_path: Path) -> None:
    sim, args = _calibrated("small_cnn")
    before = _sim_outputs(sim, args)
    path = tmp_path / "other.encodings"
    path.write_text(json.dumps({"version": "0.6.1", "activation_encodings": {}, "param_encodings": {}}))
    with pytest.raises(ValueError, match="no 'mixprec' section"):
        sim.load_encodings(path)
    assert torch.equal(_sim_outputs(sim, args)[0], before[0])


@pytest.mark.usefixtures("torchscript_only")
def test_load_rejects_file_of_other_config_naming_quantizer(tmp_path: Path) -> None:
    sim, args = _calibrated("small_cnn")
    with pytest.warns(UserWarning):
        result = sim.export(tmp_path, "m", dummy_input=args)
    model, example = build("small_cnn")
    symmetric = {"defaults": {"ops": {"is_symmetric": "True"}}}
    other = QuantizationSimModel(model, dummy_input=example, config_file=symmetric)
    with pytest.raises(ValueError, match=r"quantizer 'model input input\[0\]'.*symmetric=False"):
        other.load_encodings(result.encodings_path)
    assert not any(q.is_initialized() for _, q in other.quantizers())  # nothing was loaded


@pytest.mark.parametrize("prefix", ["", "sub/m", ".."], ids=["empty", "with-folder", "dotdot"])
def test_bad_prefix_is_value_error(tmp_path: Path, prefix: str) -> None:
    sim, args = _calibrated("small_cnn")
    with pytest.raises(ValueError, match="filename_prefix"):
        sim.export(tmp_path, prefix, dummy_input=args)


def test_quantizers_of_a_deep_copy_are_marked_too() -> None:
    # Some of torch.onnx's capture strategies trace a deep copy of the model (Gemma, T5 and BART
    # exported with no marker at all): a copied quantizer must still become its marker.
    import copy

    sim, args = _calibrated("small_cnn")
    quantizers = [q for _, q in sim.quantizers()]
    x = torch.randn(2, 3, 4, 4)
    seen: list[int] = []

    def record(t: torch.Tensor, index: int) -> torch.Tensor:
        seen.append(index)
        return t

    with _onnx_trace.marking(quantizers, sim.runtime):
        tracing = sim.runtime.tracing
        tracing.forwards = {i: (lambda t, i=i: record(t, i)) for i in tracing.forwards}
        copied = copy.deepcopy(quantizers[3])
        tracing.mark(copied, x)
        tracing.mark(quantizers[5], x)
    assert seen == [3, 5]
    assert all("_mixprec_marker_index" not in q.__dict__ for q in quantizers)

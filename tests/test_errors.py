"""The bad-input matrix of docs/errors.md: one test per row, each checking the type and the message."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mixprec
from mixprec import MixedPrecisionConfigurator, QuantizationSimModel
from mixprec.errors import (
    CalibrationError,
    CaptureError,
    ConfigError,
    EncodingNotComputedError,
    PrecisionConflictError,
    RequestError,
    UnsupportedKernelError,
)

from .helpers import forward, make
from .models import build
from .snapshots import full_snapshot

# -- requests: raised at call time, nothing recorded (RequestError, a ValueError) ---------------------------

REQUEST_ROWS = [
    (
        "dtype-name",
        lambda sim, mp: mp.set_precision(sim.model.fc, activation="int17"),
        r"activation='int17': unknown precision 'int17'; accepted \(case-insensitive\): int2, .*int16.*fp16, bf16",
    ),
    (
        "dtype-name-in-list",
        lambda sim, mp: mp.set_precision(sim.model.fc, activation=["float8"]),
        r"unknown precision 'float8'; accepted",
    ),
    (
        "param-dtype-name",
        lambda sim, mp: mp.set_precision(sim.model.fc, activation=None, param={"weight": "int1"}),
        r"param\['weight'\]='int1': unknown precision 'int1'",
    ),
    (
        "io-dtype-name",
        lambda sim, mp: mp.set_model_input_precision("int33"),
        r"model input activation='int33': unknown precision 'int33'",
    ),
    (
        "module-of-another-model",
        lambda sim, mp: mp.set_precision(nn.Linear(2, 2), activation="int16"),
        r"module Linear is not part of sim.model: pass a module of sim.model",
    ),
    (
        "param-typo",
        lambda sim, mp: mp.set_precision(sim.model.fc, activation="int16", param={"wieght": "int8"}),
        r"param 'wieght' is not a parameter of any targeted layer; available: \['bias', 'weight'\]",
    ),
    (
        "param-not-a-dict",
        lambda sim, mp: mp.set_precision(sim.model.fc, activation="int16", param=["weight"]),
        r"param must be a dict of param name -> precision",
    ),
    (
        "name-matching-nothing",
        lambda sim, mp: mp.set_precision("blok1", activation="int16"),
        r"target 'blok1' \(layer name\) matches no quantized layer; close names: .*block1",
    ),
    (
        "glob-matching-nothing",
        lambda sim, mp: mp.set_precision("head.*", activation="int16"),
        r"target 'head\.\*' \(glob\) matches no quantized layer",
    ),
    (
        "regex-matching-nothing",
        lambda sim, mp: mp.set_precision("re:head", activation="int16"),
        r"target 're:head' \(regex\) matches no quantized layer; list names with sim.precision_table\(\)",
    ),
    (
        "invalid-regex",
        lambda sim, mp: mp.set_precision("re:block(", activation="int16"),
        r"target 're:block\(': invalid regex",
    ),
    (
        "bad-target-type",
        lambda sim, mp: mp.set_precision(42, activation="int16"),
        r"target 42 \(int\) is not accepted; pass a module of sim.model, a module class, a function",
    ),
    (
        "class-not-a-module",
        lambda sim, mp: mp.set_precision(int, activation="int16"),
        r"target class int is not a torch.nn.Module subclass",
    ),
    (
        "list-length",
        lambda sim, mp: mp.set_precision(sim.model.fc, activation=["int16", None]),
        r"activation list has 2 entries but layer 'fc' has 1 input\(s\); give one entry per input",
    ),
    (
        "list-length-non-leaf",
        lambda sim, mp: mp.set_precision(sim.model.block1, activation=["int16", "int8"]),
        r"activation list has 2 entries but layer 'block1.0' has 1 input\(s\)",
    ),
]


@pytest.mark.parametrize("call, match", [r[1:] for r in REQUEST_ROWS], ids=[r[0] for r in REQUEST_ROWS])
def test_bad_request_raises_at_call_time_and_records_nothing(call, match) -> None:
    sim, mp, _ = make("small_cnn")
    mp.set_precision(sim.model.stem, activation="int16")
    with pytest.raises(RequestError, match=match):
        call(sim, mp)
    assert len(mp.requests) == 1
    assert isinstance(RequestError("x"), ValueError)


def test_float_models_module_points_to_the_sims_copy() -> None:
    model, example = build("small_cnn")
    mp = MixedPrecisionConfigurator(QuantizationSimModel(model, dummy_input=example))
    with pytest.raises(
        RequestError, match=r"it is the float model's module 'block1'; pass sim.model's copy instead"
    ):
        mp.set_precision(model.block1, activation="int16")


def test_module_that_only_moves_data_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Identity())
    sim = QuantizationSimModel(model, dummy_input=torch.randn(2, 4))
    mp = MixedPrecisionConfigurator(sim)
    with pytest.raises(
        RequestError, match=r"module '1' \(Identity\) has no quantized layer: .*only moves data"
    ):
        mp.set_precision(sim.model[1], activation="int16")


IO_ROWS = [
    (
        "input-list-too-short",
        "input",
        ["int16"],
        r"model input: expected a list of 2 entries shaped like \[P, P\], got \['int16'\]",
    ),
    ("input-list-too-long", "input", ["int16", None, None], r"model input: expected a list of 2 entries"),
    ("input-unknown-key", "input", {"z": "int16"}, r"model input: expected a list of 2 entries"),
    (
        "output-nested-mismatch",
        "output",
        [None, ["int16"], None],
        r"model output\[1\]: expected one precision \(or None\) for a tensor, got \['int16'\]",
    ),
    (
        "output-list-too-short",
        "output",
        [None, "int16"],
        r"model output: expected a list of 3 entries shaped like \[P, P, P\]",
    ),
]


@pytest.mark.parametrize("which, value, match", [r[1:] for r in IO_ROWS], ids=[r[0] for r in IO_ROWS])
def test_model_io_shape_mismatch_raises_at_call_time(which, value, match) -> None:
    sim, mp, _ = make("multi_io")
    call = mp.set_model_input_precision if which == "input" else mp.set_model_output_precision
    with pytest.raises(RequestError, match=match):
        call(value)
    assert not mp.requests


def test_precision_for_a_non_float_model_input_is_refused() -> None:
    sim, mp, _ = make("tied_embedding")
    with pytest.raises(
        RequestError, match=r"model input\[0\] is not a float tensor and cannot be quantized; use None there"
    ):
        mp.set_model_input_precision(["int16"])
    with pytest.raises(RequestError, match=r"the model has no float model input to quantize"):
        mp.set_model_input_precision("int16")


def test_module_class_matching_no_layer_is_not_an_error() -> None:
    sim, mp, _ = make("small_cnn")
    mp.set_precision(nn.AvgPool2d, activation="int16")
    mp.set_precision(torch.sigmoid, activation="int16")
    report = mp.apply(log_file=None)
    assert [u["id"] for u in report.unmatched] == [0, 1]
    assert not report.changes


# -- apply: raised under strict=True, the sim unchanged ------------------------------------------------------


def test_conflicting_strict_requests() -> None:
    sim, mp, example = make("three_readers")
    sim.compute_encodings(forward(example), None)
    mp.set_precision(sim.model.a, activation="int16")
    mp.set_precision(sim.model.b, activation="int8")
    before = full_snapshot(sim)
    with pytest.raises(
        PrecisionConflictError,
        match=r"stem output 0: request 0 .* wants int16 for layer a, but later request 1 .* sets int8",
    ):
        mp.apply(log_file=None, strict=True)
    assert full_snapshot(sim) == before and len(mp.requests) == 2
    with pytest.warns(UserWarning, match="requests conflict"):
        mp.apply(log_file=None, strict=False)


def test_backend_unsupported_kernel() -> None:
    sim, mp, _ = make("reshape_chain", config_file="edge_strict")
    mp.set_precision(sim.model.fc2, activation="int4", param={"weight": "int4"})
    with pytest.raises(
        UnsupportedKernelError,
        match=r"config <preset edge_strict>\):\n  fc2 \(Gemm\): activation int4, weight int4; supported: int8/int8, int16/int8",
    ):
        mp.apply(log_file=None, strict=True)


# -- sim config files (ConfigError, a ValueError) ------------------------------------------------------------

CONFIG_ROWS = [
    (
        "unknown-key",
        '{"defaults": {"ops": {"is_output_quantised": "True"}}}',
        r"defaults.ops.is_output_quantised: unknown key 'is_output_quantised'; did you mean 'is_output_quantized'\?",
    ),
    (
        "bad-bool",
        '{"defaults": {"per_channel_quantization": "yes"}}',
        r"defaults.per_channel_quantization: expected a boolean, got 'yes' \(string\); accepted: true, false",
    ),
    (
        "bad-json",
        '{"defaults": {"ops": {}},}',
        r"is not valid JSON: Expecting property name .* at line 1, column 26",
    ),
]


@pytest.mark.parametrize("text, match", [r[1:] for r in CONFIG_ROWS], ids=[r[0] for r in CONFIG_ROWS])
def test_malformed_config_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "target.json"
    path.write_text(text)
    model, example = build("small_cnn")
    with pytest.raises(ConfigError, match=rf"sim config '{path}'.*{match}" if "JSON" not in match else match):
        QuantizationSimModel(model, dummy_input=example, config_file=str(path))


def test_missing_config_file() -> None:
    with pytest.raises(
        ConfigError, match=r"sim config file 'per_chanel.json' not found; .*preset 'per_channel'"
    ):
        mixprec.load_config("per_chanel.json")


# -- capture (CaptureError, a RuntimeError) ---------------------------------------------------------------------


def test_model_that_fails_on_its_dummy_input() -> None:
    model, _ = build("small_cnn")
    with pytest.raises(
        CaptureError,
        match=r"capturing SmallCNN failed in its forward pass .*expected input\[2, 5, 8, 8\] to have 3 channels",
    ):
        QuantizationSimModel(model, dummy_input=torch.randn(2, 5, 8, 8))


def test_model_without_a_layer_reading_its_inputs() -> None:
    class OnlyMoves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.keep = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.keep(x).view(-1)

    with pytest.raises(CaptureError, match=r"OnlyMoves has no layer reading its inputs: nothing to quantize"):
        QuantizationSimModel(OnlyMoves(), dummy_input=torch.randn(2, 3))


def test_forward_taking_another_path_than_the_capture() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            return torch.relu(y) if x.shape[0] == 2 else torch.sigmoid(y)

    sim = QuantizationSimModel(Branchy(), dummy_input=torch.randn(2, 4))
    sim.compute_encodings(lambda m, _: m(torch.randn(2, 4)), None)
    x = torch.randn(3, 4)
    with pytest.raises(
        EncodingNotComputedError, match=r"layer 'sigmoid' first ran in this forward.*sigmoid output 0"
    ):
        sim.model(x)
    with pytest.warns(UserWarning, match=r"no data reached 1 quantizer\(s\) \(relu output 0\).*keep"):
        sim.compute_encodings(lambda m, _: m(x), None)
    assert "sigmoid" in {row["name"] for row in sim.precision_table()}
    sim.model(x)


# -- calibration ------------------------------------------------------------------------------------------------


def test_quantizer_used_before_calibration() -> None:
    sim, _, example = make("small_cnn")
    with pytest.raises(
        EncodingNotComputedError,
        match=r"quantizer 'model input input\[0\]' \(int8\) has no encoding yet; call sim.compute_encodings",
    ):
        sim.model(example)


@pytest.mark.parametrize("bad", ["nan", "inf"], ids=["nan", "inf"])
def test_non_finite_calibration_data_names_the_layer_and_keeps_encodings(bad: str) -> None:
    sim, _, example = make("small_cnn", config_file={"model_input": {"is_input_quantized": False}})
    sim.compute_encodings(forward(example), None)
    before = full_snapshot(sim)
    poisoned = example.clone()
    poisoned[0, 0, 0, 0] = float(bad)
    with pytest.raises(
        CalibrationError,
        match=r"quantizer 'stem output 0' observed non-finite values during calibration: .*\nno encoding was changed",
    ):
        sim.compute_encodings(forward(poisoned), None)
    assert full_snapshot(sim) == before
    sim.model(example)


def test_non_finite_activation_inside_the_model_names_that_layer() -> None:
    class Log(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(self.fc(x))

    torch.manual_seed(0)
    sim = QuantizationSimModel(Log(), dummy_input=torch.randn(2, 4))
    with pytest.raises(
        CalibrationError,
        match=r"quantizer 'log output 0' observed non-finite values during calibration: \d+ NaN",
    ):
        sim.compute_encodings(lambda m, _: m(torch.randn(64, 4)), None)
    assert all(not q.is_initialized() for _, q in sim.quantizers() if q.needs_encoding)


def test_calibration_that_runs_nothing() -> None:
    sim, _, example = make("small_cnn")
    sim.compute_encodings(forward(example), None)
    before = full_snapshot(sim)
    with pytest.raises(
        CalibrationError,
        match=r"no data reached quantizer 'model input input\[0\]' during calibration; check that the forward",
    ):
        sim.compute_encodings(lambda m, _: None, None)
    assert full_snapshot(sim) == before


def test_callback_that_is_not_callable() -> None:
    sim, _, _ = make("small_cnn")
    with pytest.raises(TypeError, match=r"forward_pass_callback must be callable as callback\(model, args\)"):
        sim.compute_encodings(None, None)


# -- constructor arguments ---------------------------------------------------------------------------------------------


def test_bad_bitwidth() -> None:
    model, example = build("small_cnn")
    with pytest.raises(
        ValueError, match=r"default_output_bw=17 is not a valid int bitwidth; accepted: 2..16 \(or 32\)"
    ):
        QuantizationSimModel(model, dummy_input=example, default_output_bw=17)


def test_configurator_needs_a_sim() -> None:
    model, _ = build("small_cnn")
    with pytest.raises(
        TypeError, match=r"MixedPrecisionConfigurator needs a mixprec.QuantizationSimModel, got SmallCNN"
    ):
        MixedPrecisionConfigurator(model)


def test_warnings_are_not_errors_under_non_strict() -> None:
    sim, mp, _ = make("reshape_chain", config_file="edge_strict")
    mp.set_precision(sim.model.fc2, activation="int4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = mp.apply(log_file=None, strict=False)
    assert report.kernel_findings and any("no kernel" in str(w.message) for w in caught)
    json.dumps(report.to_dict())

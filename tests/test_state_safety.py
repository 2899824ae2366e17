"""State corruption found by trying bad input (issue 16): each case fails with a typed error that
leaves the sim (and the user's model) exactly as it was, or now behaves correctly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from mixprec import MixedPrecisionConfigurator, QuantizationSimModel, load_config, load_profile
from mixprec.errors import CaptureError, ConfigError, EncodingFileError, ProfileError, RequestError
from mixprec.quant.quantizers import IntQuantizer

from .helpers import write_encodings
from .models import SmallCNN, build
from .snapshots import full_snapshot


def calibrated(model: nn.Module, example: torch.Tensor, **kwargs) -> QuantizationSimModel:
    sim = QuantizationSimModel(model, dummy_input=example, quant_scheme="tf", **kwargs)
    sim.compute_encodings(lambda m, _: m(example), None)
    return sim


def outputs(sim: QuantizationSimModel, example: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sim.model(example)


# -- apply(log_file=...) ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["directory", "under-a-file"])
def test_apply_with_unwritable_log_file_changes_nothing(tmp_path: Path, bad: str) -> None:
    model, example = build("small_cnn")
    sim = calibrated(model, example)
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(sim.model.fc, activation="int16")
    before = full_snapshot(sim)
    (tmp_path / "file").write_text("x")
    log_file = tmp_path if bad == "directory" else tmp_path / "file" / "log.txt"
    with pytest.raises(RequestError, match=r"log_file .* cannot be written.*nothing was applied"):
        mp.apply(log_file=log_file)
    assert full_snapshot(sim) == before
    assert len(mp.requests) == 1  # still recorded: a corrected apply can follow
    report = mp.apply(log_file=tmp_path / "mmp_log.txt")
    assert report.changes and (tmp_path / "mmp_log.txt").read_text() == report.to_text()


def test_apply_that_fails_midway_writes_no_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, example = build("small_cnn")
    sim = calibrated(model, example)
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(sim.model.fc, activation="int16", param={"weight": "int16"})

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sim, "set_precision_at", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        mp.apply(log_file=tmp_path / "mmp_log.txt")
    assert list(tmp_path.iterdir()) == []  # neither the log nor its temporary file
    assert len(mp.requests) == 1


# -- load_encodings of another model's file ---------------------------------------------------------------


class Net(nn.Module):
    """The same layer names at any width: files of one width do not fit another."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def net_sim(width: int, **kwargs) -> tuple[QuantizationSimModel, torch.Tensor]:
    torch.manual_seed(width)
    example = torch.randn(2, 3, 6, 6)
    return calibrated(Net(width).eval(), example, **kwargs), example


def test_load_encodings_with_wrong_channel_count_is_refused(tmp_path: Path) -> None:
    narrow, _ = net_sim(8, config_file="per_channel")
    write_encodings(narrow, tmp_path / "narrow.encodings")
    wide, example = net_sim(16, config_file="per_channel")
    before, y = full_snapshot(wide), outputs(wide, example)
    with pytest.raises(EncodingFileError, match=r"'conv.weight'.*8 channels.*needs 16"):
        wide.load_encodings(tmp_path / "narrow.encodings")
    assert full_snapshot(wide) == before
    assert torch.equal(outputs(wide, example), y)


def test_load_encodings_of_another_model_at_another_bitwidth_is_refused(tmp_path: Path) -> None:
    other, _ = net_sim(8, default_param_bw=4)
    write_encodings(other, tmp_path / "other.encodings")
    sim, example = net_sim(16)
    before = full_snapshot(sim)
    with pytest.raises(EncodingFileError, match=r"'conv.weight'.*int4.*this sim has int8.*another model"):
        sim.load_encodings(tmp_path / "other.encodings")
    assert full_snapshot(sim) == before


def test_load_encodings_of_the_same_model_still_switches_precisions(tmp_path: Path) -> None:
    # a mixed precision sim's file must reproduce it in a fresh sim of the same model
    source, example = net_sim(8)
    mp = MixedPrecisionConfigurator(source)
    mp.set_precision(source.model.fc, activation="int16", param={"weight": "int16"})
    mp.apply(log_file=None)
    source.compute_encodings(lambda m, _: m(example), None)
    write_encodings(source, tmp_path / "mixed.encodings")
    fresh, _ = net_sim(8)
    fresh.load_encodings(tmp_path / "mixed.encodings")
    assert fresh.precision_table() == source.precision_table()
    assert torch.equal(outputs(fresh, example), outputs(source, example))


MALFORMED = {
    "item-not-an-object": lambda q: ["oops"],
    "granularity-not-an-object": lambda q: [{**q[0], "granularity": "per_channel"}],
    "unknown-kind": lambda q: [{**q[0], "kind": "bogus"}],
    "slot-not-a-number": lambda q: (
        [{**q[0], "slot": "first"}] if q[0]["kind"] != "param" else [{**q[0], "slot": 3}]
    ),
    "encoding-shape-not-a-list": lambda q: [{**q[0], "encoding_shape": 5}],
    "missing-tensor-entry": lambda q: [{**q[0], "tensor": "nowhere"}],
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_load_encodings_with_malformed_mixprec_section_names_the_entry(tmp_path: Path, case: str) -> None:
    sim, example = net_sim(8)
    document = write_encodings(sim, tmp_path / "good.encodings")
    quantizers = [q for q in document["mixprec"]["quantizers"] if q.get("tensor")]
    document["mixprec"]["quantizers"] = MALFORMED[case](quantizers)
    path = tmp_path / "bad.encodings"
    path.write_text(json.dumps(document))
    fresh, _ = net_sim(8)
    before = full_snapshot(fresh)
    with pytest.raises(EncodingFileError, match=r"bad.encodings: mixprec.quantizers\[0\]"):
        fresh.load_encodings(path)
    assert full_snapshot(fresh) == before


@pytest.mark.parametrize(
    "section",
    [[], {"version": 1, "quantizers": "all"}, {"version": 1}],
    ids=["a-list", "quantizers-not-a-list", "no-quantizers"],
)
def test_load_encodings_with_bad_section_shape_is_typed(tmp_path: Path, section) -> None:
    sim, _ = net_sim(8)
    path = tmp_path / "bad.encodings"
    path.write_text(json.dumps({"version": "0.6.1", "mixprec": section}))
    before = full_snapshot(sim)
    with pytest.raises(EncodingFileError, match="mixprec"):
        sim.load_encodings(path)
    assert full_snapshot(sim) == before


def test_load_encodings_of_deeply_nested_json_is_typed(tmp_path: Path) -> None:
    sim, _ = net_sim(8)
    path = tmp_path / "deep.encodings"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(EncodingFileError, match="nested too deeply"):
        sim.load_encodings(path)


# -- per-channel axis out of range ------------------------------------------------------------------------


def test_per_channel_axis_out_of_range_is_refused_at_the_request() -> None:
    model, example = build("small_cnn")
    sim = calibrated(model, example)
    mp = MixedPrecisionConfigurator(sim)
    spec = {"precision": "int8", "granularity": "per_channel", "axis": 7}
    with pytest.raises(RequestError, match=r"param 'weight'.*axis 7.*4-D.*accepted: -4\.\.3"):
        mp.set_precision(sim.model.stem, activation=None, param={"weight": spec})
    assert mp.requests == ()
    sim.compute_encodings(lambda m, _: m(example), None)  # still calibrates


def test_per_channel_axis_out_of_range_in_a_profile_names_the_entry(tmp_path: Path) -> None:
    model, example = build("small_cnn")
    sim = calibrated(model, example)
    mp = MixedPrecisionConfigurator(sim)
    path = tmp_path / "p.yaml"
    path.write_text(
        "requests:\n"
        "  - set_precision: {target: block1, activation: int16}\n"
        "  - set_precision: {target: stem, param: {weight: {precision: int8, granularity: per_channel, axis: 7}}}\n"
    )
    with pytest.raises(ProfileError, match=r"entry 2 \(line 3\).*axis 7"):
        mp.apply_profile(load_profile(path))
    assert mp.requests == ()


# -- dtype casts of the model -----------------------------------------------------------------------------


def test_half_keeps_encodings_in_float32() -> None:
    q = IntQuantizer(16, label="tiny")
    q.set_range(0.0, 2.2e-5)  # scale ~3.4e-10: 0 in float16
    scale = q.get_encoding().scale
    q.half()
    assert q.scale.dtype == torch.float32 and torch.equal(q.get_encoding().scale, scale)
    x = torch.full((4,), 1e-5)
    assert bool((q(x.half()) != 0).all())  # a float16 input is quantized in float32
    q.float().to(torch.bfloat16).float()
    assert torch.equal(q.get_encoding().scale, scale)


def test_model_half_then_float_keeps_every_scale() -> None:
    model, example = build("small_cnn")
    sim = calibrated(model, example, default_output_bw=16)
    before = full_snapshot(sim)
    sim.model.half()
    assert next(sim.model.parameters()).dtype == torch.float16  # the model itself was cast
    assert all(q.scale.dtype == torch.float32 for _, q in sim.quantizers())
    sim.model.float()
    assert full_snapshot(sim) == before


# -- a sim's model given to another sim -------------------------------------------------------------------


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "copy"])
def test_sim_model_is_refused_as_a_float_model(in_place: bool) -> None:
    model, example = build("small_cnn")
    sim = calibrated(model, example)
    before, y = full_snapshot(sim), outputs(sim, example)
    with pytest.raises(CaptureError, match=r"already the model of a QuantizationSimModel.*float model"):
        QuantizationSimModel(sim.model, dummy_input=example, in_place=in_place)
    assert full_snapshot(sim) == before
    assert torch.equal(outputs(sim, example), y)


# -- BatchNorm statistics of a model in train mode --------------------------------------------------------


def bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n]


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "copy"])
def test_capture_and_calibration_leave_batchnorm_statistics_alone(in_place: bool) -> None:
    torch.manual_seed(0)
    model, example = SmallCNN().train(), SmallCNN.example_input() * 3 + 1
    stats = bn_state(model)
    sim = QuantizationSimModel(model, dummy_input=example, in_place=in_place)
    assert all(torch.equal(a, b) for a, b in zip(bn_state(model), stats, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(bn_state(sim.model), stats, strict=True))
    sim.compute_encodings(lambda m, _: m(example), None)
    assert all(torch.equal(a, b) for a, b in zip(bn_state(sim.model), stats, strict=True))
    assert sim.model.training and all(m.training for m in sim.model.modules())  # the mode is restored
    sim.model(example)  # training itself does update them
    assert not torch.equal(bn_state(sim.model)[0], stats[0])


# -- requests and config/profile files --------------------------------------------------------------------


@pytest.mark.parametrize("target", ["", "   "], ids=["empty", "blank"])
def test_empty_target_name_is_refused(target: str) -> None:
    model, example = build("small_cnn")
    sim = QuantizationSimModel(model, dummy_input=example)
    mp = MixedPrecisionConfigurator(sim)
    with pytest.raises(RequestError, match="empty"):
        mp.set_precision(target, activation="int16")
    with pytest.raises(RequestError, match="empty"):
        mp.set_precision(sim.model.fc, activation="int16", within=target)
    assert mp.requests == ()


def test_deeply_nested_json_config_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"defaults": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(str(path))
    model, example = build("small_cnn")
    with pytest.raises(ConfigError, match="nested too deeply"):
        QuantizationSimModel(model, dummy_input=example, config_file=str(path))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_deeply_nested_profile_is_profile_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"requests": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ProfileError, match="nested too deeply"):
        load_profile(path)


DUPLICATES = {
    ".yaml": (
        "version: 1\nstrict: true\nrequests:\n  - set_precision:\n      target: fc\n"
        "      activation: int16\n      activation: int8\nstrict: false\n",
        [("strict", 8), ("activation", 7)],
    ),
    ".json": (
        '{\n "requests": [\n  {"set_precision": {\n   "target": "fc",\n   "activation": "int16",\n'
        '   "activation": "int8"}}\n ]\n}\n',
        [("activation", 6)],
    ),
}


@pytest.mark.parametrize("suffix", list(DUPLICATES))
def test_duplicate_keys_in_a_profile_name_key_and_line(tmp_path: Path, suffix: str) -> None:
    text, (first, *_) = DUPLICATES[suffix]
    path = tmp_path / f"dup{suffix}"
    path.write_text(text)
    key, line = first
    with pytest.raises(ProfileError, match=rf"line {line}: key {key!r} appears twice"):
        load_profile(path)


@pytest.mark.slow  # one ONNX export (legacy exporter), about 6 s
def test_export_logs_its_summary_instead_of_printing(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    pytest.importorskip("onnx")
    from mixprec.export import trace

    def no_dynamo(*args, **kwargs):
        raise RuntimeError("forced failure")

    monkeypatch.setattr(trace, "_export_dynamo", no_dynamo, raising=False)
    model, example = build("small_cnn")
    sim = calibrated(model, example)
    with caplog.at_level(logging.INFO, logger="mixprec"), pytest.warns(UserWarning):
        result = sim.export(tmp_path, "m", dummy_input=example)
    assert capsys.readouterr().out == ""
    assert result.summary() in caplog.messages

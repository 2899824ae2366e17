"""Tests of the sim config: presets, booleans, resolved queries, round trips and error messages."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from mixprec.config.rules import PRESET_NAMES, KernelSpec, OpRule, ParamRule, SimConfig, load_config
from mixprec.core.precision import FP16, INT8, INT16
from mixprec.errors import ConfigError

FULL: dict[str, Any] = {
    "defaults": {
        "ops": {"is_output_quantized": "True", "is_symmetric": "False"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
        "strict_symmetric": "False",
        "unsigned_symmetric": "True",
        "per_channel_quantization": "False",
        "hw_version": "V73",
        "supported_kernels": [
            {"activation": {"bitwidth": 16, "dtype": "int"}, "param": {"bitwidth": 8, "dtype": "int"}},
            {"activation": {"bitwidth": 16, "dtype": "float"}, "param": {"bitwidth": 16, "dtype": "float"}},
        ],
    },
    "params": {"bias": {"is_quantized": "False"}, "out_proj.weight": {"is_symmetric": False}},
    "op_type": {
        "Conv": {
            "per_channel_quantization": "True",
            "is_input_quantized": "True",
            "is_symmetric": "True",
            "params": {"bias": {"is_quantized": "True"}, "weight": {"is_symmetric": "False"}},
            "supported_kernels": [{"activation": {"bitwidth": 8, "dtype": "int"}}],
        },
        "Squeeze": {"is_output_quantized": "False"},
    },
    "supergroups": [{"op_list": ["Conv", "Relu"]}, {"op_list": ["Add", "Relu"]}],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {"is_output_quantized": "True"},
}


@pytest.fixture
def full() -> SimConfig:
    return SimConfig.from_dict(FULL)


@pytest.mark.parametrize("name", PRESET_NAMES, ids=PRESET_NAMES)
def test_each_preset_loads_and_round_trips(name: str) -> None:
    config = load_config(name)
    assert config.source == f"<preset {name}>"
    assert SimConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert hash(config) == hash(SimConfig.from_dict(config.to_dict()))


def test_none_means_default_preset_and_simconfig_passes_through() -> None:
    config = load_config(None)
    assert config is load_config("default")
    assert load_config(config) is config


def test_default_preset_mirrors_reference_defaults() -> None:
    c = load_config("default")
    assert c.is_output_quantized("Conv") and not c.is_input_quantized("Conv")
    assert [c.is_output_quantized(t) for t in ("Squeeze", "Pad", "Mean")] == [False] * 3
    assert c.is_param_quantized("Conv", "weight") and not c.is_param_quantized("Gemm", "bias")
    assert not c.is_activation_symmetric("Add") and c.is_param_symmetric("Conv", "weight")
    assert not c.is_per_channel("Conv") and c.unsigned_symmetric and not c.strict_symmetric
    assert ("Conv", "Relu") in c.supergroups and ("ConvTranspose", "Relu") in c.supergroups
    assert c.model_input_quantized and c.model_output_quantized is None
    assert c.kernels_for("Conv") is None


def test_per_channel_preset_keeps_reference_exceptions() -> None:
    c = load_config("per_channel")
    assert c.is_per_channel("Conv") and c.is_per_channel("ConvTranspose")
    assert not c.is_per_channel("Gemm") and not c.is_per_channel("LayerNormalization")
    assert not c.is_output_quantized("Gather")


def test_edge_strict_preset_lists_kernels() -> None:
    c = load_config("edge_strict")
    assert c.is_per_channel("Gemm")
    assert c.kernels_for("Conv") == (
        KernelSpec(INT8, INT8),
        KernelSpec(INT16, INT8),
        KernelSpec(INT16, INT16),
        KernelSpec(FP16, FP16),
    )
    assert c.kernels_for("Softmax") == (KernelSpec(INT16), KernelSpec(FP16))
    assert KernelSpec(INT8, INT8) not in c.kernels_for("LayerNormalization")


def test_empty_config_takes_reference_defaults() -> None:
    c = SimConfig.from_dict({})
    assert c == SimConfig()
    assert c.is_output_quantized("X") and not c.is_input_quantized("X")
    assert not c.is_activation_symmetric("X") and not c.is_per_channel("X")
    assert c.is_param_quantized("X", "bias") and c.is_param_symmetric("X", "weight")
    assert c.model_input_quantized and c.model_output_quantized is None
    assert c.supergroups == () and c.kernels_for("X") is None


BOOLEANS = [(True, True), (False, False), ("True", True), ("False", False), ("true", True), ("FALSE", False)]


@pytest.mark.parametrize(("written", "expected"), BOOLEANS, ids=[repr(w) for w, _ in BOOLEANS])
def test_booleans_accept_json_and_reference_strings(written: Any, expected: bool) -> None:
    c = SimConfig.from_dict({"defaults": {"per_channel_quantization": written}})
    assert c.is_per_channel("Conv") is expected


@pytest.mark.parametrize("written", ["yes", 1, 0, None, "1", ""], ids=repr)
def test_other_boolean_spellings_are_errors(written: Any) -> None:
    with pytest.raises(
        ConfigError, match=r"defaults\.per_channel_quantization: expected a boolean.*accepted: true"
    ):
        SimConfig.from_dict({"defaults": {"per_channel_quantization": written}})


@pytest.mark.parametrize(
    ("op_type", "query", "expected"),
    [
        ("Conv", "is_output_quantized", True),
        ("Squeeze", "is_output_quantized", False),
        ("Conv", "is_input_quantized", True),
        ("Relu", "is_input_quantized", False),
        ("Conv", "is_activation_symmetric", True),
        ("Relu", "is_activation_symmetric", False),
        ("Conv", "is_per_channel", True),
        ("Gemm", "is_per_channel", False),
        ("Conv", "kernels_for", (KernelSpec(INT8),)),
        ("Gemm", "kernels_for", (KernelSpec(INT16, INT8), KernelSpec(FP16, FP16))),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_op_type_rule_overrides_defaults(full: SimConfig, op_type: str, query: str, expected: Any) -> None:
    assert getattr(full, query)(op_type) == expected


@pytest.mark.parametrize(
    ("op_type", "param", "quantized", "symmetric"),
    [
        ("Conv", "bias", True, True),  # op_type params beat top-level params
        ("Conv", "weight", True, False),  # op_type params beat defaults, per field
        ("Gemm", "bias", False, True),  # top-level params beat defaults
        ("Gemm", "weight", True, True),  # defaults
        ("Gemm", "in_proj_bias", False, True),  # suffix rule: *_bias -> bias
        ("Gemm", "fc.bias", False, True),  # last dotted component
        ("Conv", "block.conv.bias", True, True),
        ("Conv", "in_proj_weight", True, False),  # suffix rule: *_weight -> weight
        ("Gemm", "attn.out_proj.weight", True, True),  # no exact key: "weight" falls to defaults
        ("Gemm", "out_proj.weight", True, False),  # exact dotted key
        ("Gemm", "bias_k", True, True),  # not a bias by name
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_param_precedence_and_name_matching(
    full: SimConfig, op_type: str, param: str, quantized: bool, symmetric: bool
) -> None:
    assert full.is_param_quantized(op_type, param) is quantized
    assert full.is_param_symmetric(op_type, param) is symmetric


def test_round_trip_through_json_keeps_every_setting(full: SimConfig) -> None:
    data = full.to_dict()
    again = SimConfig.from_dict(json.loads(json.dumps(data)), source="again")
    assert again == full and again.to_dict() == data
    assert data["defaults"]["per_channel_quantization"] == "False"  # the reference's spelling
    assert data["model_output"] == {"is_output_quantized": "True"}
    assert "is_input_quantized" not in data["defaults"]["ops"]  # the reference rejects it there


def test_config_is_immutable_and_hashable(full: SimConfig) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.default_per_channel = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        full.op_types["Conv"] = OpRule()  # type: ignore[index]
    assert full.params == {"bias": ParamRule(False), "out_proj.weight": ParamRule(is_symmetric=False)}
    assert len({full, SimConfig.from_dict(FULL, source="elsewhere")}) == 1


def test_direct_construction_is_validated() -> None:
    assert KernelSpec("Int16", "int8") == KernelSpec(INT16, INT8)
    with pytest.raises(ConfigError, match=r"KernelSpec\.param: bf16 has no \(bitwidth, dtype\) form"):
        KernelSpec("int8", "bf16")
    with pytest.raises(ConfigError, match=r"SimConfig\.default_per_channel must be bool, got 'True'"):
        SimConfig(default_per_channel="True")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least 2 op type names"):
        SimConfig(supergroups=(("Conv",),))


def test_load_from_path_and_str(tmp_path: Path) -> None:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(FULL))
    assert load_config(path) == load_config(str(path)) == SimConfig.from_dict(FULL)
    assert load_config(path).source == str(path)


ERRORS = [
    ("top_level_unknown", {"op_types": {}}, r"op_types: unknown key 'op_types'; did you mean 'op_type'"),
    ("defaults_unknown", {"defaults": {"per_channel": "True"}}, r"defaults\.per_channel: unknown key.*accepted here:"),
    ("defaults_ops_unknown", {"defaults": {"ops": {"is_quantized": "True"}}}, r"defaults\.ops\.is_quantized: unknown"),
    (
        "op_type_unknown",
        {"op_type": {"Conv": {"per_chanel_quantization": "True"}}},
        r"op_type\.Conv\.per_chanel_quantization: unknown key.*did you mean 'per_channel_quantization'",
    ),
    ("params_unknown", {"params": {"bias": {"quantized": "False"}}}, r"params\.bias\.quantized: unknown key"),
    (
        "op_params_unknown",
        {"op_type": {"Conv": {"params": {"weight": {"bits": 8}}}}},
        r"op_type\.Conv\.params\.weight\.bits: unknown key",
    ),
    ("bad_boolean", {"op_type": {"Conv": {"per_channel_quantization": "yes"}}}, r"op_type\.Conv\.per_channel_quantization: expected a boolean, got 'yes'"),
    ("op_entry_not_object", {"op_type": {"Conv": True}}, r"op_type\.Conv: expected an object"),
    ("int_bitwidth", {"defaults": {"supported_kernels": [{"activation": {"bitwidth": 64, "dtype": "int"}}]}}, r"defaults\.supported_kernels\[0\]\.activation\.bitwidth: bitwidth 64 .*accepted: 2, 3,.* 16, 32"),
    ("float_bitwidth", {"op_type": {"Conv": {"supported_kernels": [{"activation": {"bitwidth": 8, "dtype": "int"}, "param": {"bitwidth": 12, "dtype": "float"}}]}}}, r"op_type\.Conv\.supported_kernels\[0\]\.param\.bitwidth: .*accepted: 8 \(fp8_e4m3\), 16"),
    ("string_bitwidth", {"defaults": {"supported_kernels": [{"activation": {"bitwidth": "8", "dtype": "int"}}]}}, r"defaults\.supported_kernels\[0\]\.activation\.bitwidth: bitwidth '8' \(string\) is not valid"),
    ("bad_dtype", {"defaults": {"supported_kernels": [{"activation": {"bitwidth": 8, "dtype": "uint"}}]}}, r"defaults\.supported_kernels\[0\]\.activation\.dtype: expected \"int\" or \"float\", got 'uint'"),
    ("missing_activation", {"defaults": {"supported_kernels": [{"param": {"bitwidth": 8, "dtype": "int"}}]}}, r"defaults\.supported_kernels\[0\]: missing key \"activation\""),
    ("missing_dtype", {"defaults": {"supported_kernels": [{"activation": {"bitwidth": 8}}]}}, r"defaults\.supported_kernels\[0\]\.activation: missing key \"dtype\""),
    ("empty_kernels", {"defaults": {"supported_kernels": []}}, r"defaults\.supported_kernels: expected at least 1"),
    ("short_supergroup", {"supergroups": [{"op_list": ["Conv"]}]}, r"supergroups\[0\]\.op_list: expected at least 2 op type names; got 1"),
    ("non_str_supergroup", {"supergroups": [{"op_list": ["Conv", 3]}]}, r"supergroups\[0\]\.op_list\[1\]: expected an op type name string, got 3"),
    ("supergroup_unknown_key", {"supergroups": [{"ops": ["Conv", "Relu"]}]}, r"supergroups\[0\]\.ops: unknown key"),
    ("supergroup_missing_op_list", {"supergroups": [{}]}, r"supergroups\[0\]: missing key \"op_list\""),
    ("supergroups_not_list", {"supergroups": {"op_list": ["Conv", "Relu"]}}, r"supergroups: expected an array"),
    ("encoding_constraints_unsupported", {"op_type": {"Softmax": {"encoding_constraints": {"min": 0, "max": 1}}}}, r"op_type\.Softmax\.encoding_constraints: not supported: mixprec does not apply fixed output ranges; remove the key"),
    ("hw_version_not_str", {"defaults": {"hw_version": 73}}, r"defaults\.hw_version: expected a string"),
    ("model_output_unknown", {"model_output": {"is_input_quantized": "True"}}, r"model_output\.is_input_quantized: unknown key"),
    ("top_level_not_object", ["defaults"], r"\(top level\): the top level must be a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "match"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_the_file_and_key_path(tmp_path: Path, data: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=r"^sim config '<dict>': " + match):
        SimConfig.from_dict(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"^sim config {re.escape(repr(str(path)))}: {match}"):
        load_config(path)


def test_invalid_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "defaults": {\n    "ops": {,}\n  }\n}\n')
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(path))}' is not valid JSON: .* at line 3, column 13"
    ):
        load_config(path)


def test_duplicate_json_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"key 'Conv' appears twice"):
        SimConfig.from_json('{"op_type": {"Conv": {}, "Conv": {"is_symmetric": "True"}}}')


def test_missing_file_names_path_and_presets(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(path))}' not found.*default, per_channel, edge_strict"
    ):
        load_config(path)
    with pytest.raises(ConfigError, match="'per-channel' not found; did you mean the preset 'per_channel'"):
        load_config("per-channel")


def test_wrong_source_type_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"config_file must be None, a preset name, .*got 42 \(int\)"):
        load_config(42)  # type: ignore[arg-type]

"""Profile files: YAML/JSON round trips that give the same plan, and schema errors naming entry and line."""

import dataclasses
import json

import pytest
import torch
from torch import nn

import mixprec
from mixprec import MixedPrecisionConfigurator, ProfileError, QuantizationSimModel, load_profile
from mixprec.demo import build as build_demo
from mixprec.demo import seed_requests
from mixprec.mixed.profile import ModelInput, ModelOutput, Profile, SetPrecision

from .models import build


def make(name):
    model, example = build_demo() if name == "demo" else build(name)
    return QuantizationSimModel(model, dummy_input=example)


def plan(mp):
    """The preview report minus where each request was made (a profile replays from another place)."""
    data = mp.preview().to_dict()
    for key in ("requests", "unmatched", "shadowed"):
        for row in data[key]:
            row.pop("location")
    return data


def record_mixed(sim, mp):
    """Every kind of target: leaf, non-leaf, class (one matching nothing), function, glob, regex, I/O."""
    mp.set_precision(sim.model.q, activation="int16", param={"weight": "int16"})
    mp.set_precision(torch.matmul, activation="int16")
    mp.set_precision(torch.Tensor.add, activation=["int16", None])
    mp.set_precision(nn.AvgPool2d, activation="int16")
    mp.set_precision("re:k", activation=None, param={"weight": "int4"})
    mp.set_model_input_precision("Int16")
    mp.set_model_output_precision("fp16")


@pytest.mark.parametrize("suffix", [".yaml", ".json"], ids=["yaml", "json"])
def test_round_trip_gives_the_same_plan(tmp_path, suffix):
    sim = make("functional")
    mp = MixedPrecisionConfigurator(sim)
    record_mixed(sim, mp)
    path = tmp_path / f"profile{suffix}"
    written = mp.to_profile(path)
    loaded = load_profile(path)
    assert loaded == written
    replay = MixedPrecisionConfigurator(sim)
    replay.apply_profile(loaded)
    assert plan(replay) == plan(mp)


def test_demo_seed_requests_round_trip(tmp_path):
    sim = make("demo")
    mp = MixedPrecisionConfigurator(sim)
    seed_requests(mp)
    mp.to_profile(tmp_path / "demo.yaml")
    replay = MixedPrecisionConfigurator(sim)
    replay.apply_profile(tmp_path / "demo.yaml")  # a path works too
    assert plan(replay) == plan(mp)


def test_to_profile_spells_targets_as_importable_names():
    sim = make("functional")
    mp = MixedPrecisionConfigurator(sim)
    record_mixed(sim, mp)
    targets = [r.target for r in mp.to_profile().requests if isinstance(r, SetPrecision)]
    assert targets == ["q", "torch.matmul", "torch.Tensor.add", "torch.nn.AvgPool2d", "re:k"]


def test_model_io_lists_round_trip(tmp_path):
    sim = make("multi_io")
    mp = MixedPrecisionConfigurator(sim)
    mp.set_model_input_precision([None, "int16"])
    mp.set_model_output_precision([None, "int16", None])
    profile = mp.to_profile(tmp_path / "io.json")
    assert profile.requests == (ModelInput((None, "int16")), ModelOutput((None, "int16", None)))
    assert json.loads((tmp_path / "io.json").read_text())["requests"][1] == {
        "model_output": {"activation": [None, "int16", None]}
    }
    replay = MixedPrecisionConfigurator(sim)
    replay.apply_profile(load_profile(tmp_path / "io.json"))
    assert plan(replay) == plan(mp)


def test_param_granularity_round_trips(tmp_path):
    sim = make("functional")
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision("k", activation=None, param={"weight": {"precision": "int4", "block_size": 4}})
    mp.to_profile(tmp_path / "blocks.yaml")
    assert (
        "{precision: int4, granularity: per_block, block_size: 4, axis: 1}"
        in (tmp_path / "blocks.yaml").read_text()
    )
    replay = MixedPrecisionConfigurator(sim)
    replay.apply_profile(load_profile(tmp_path / "blocks.yaml"))
    assert replay.requests[0].params == mp.requests[0].params
    assert plan(replay) == plan(mp)


def test_locations_point_at_profile_entries(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "requests:\n  - model_input: {activation: int16}\n  - set_precision: {target: stem, activation: int16}\n"
    )
    mp = MixedPrecisionConfigurator(make("small_cnn"))
    mp.apply_profile(load_profile(path))
    assert [r.location for r in mp.requests] == [f"{path}:entry 1", f"{path}:entry 2"]


def test_class_and_function_paths_resolve_by_import():
    sim = make("small_cnn")
    mp = MixedPrecisionConfigurator(sim)
    mp.apply_profile({"requests": [{"set_precision": {"target": "torch.nn.Conv2d", "activation": "int16"}}]})
    assert mp.requests[0].target == "torch.nn.modules.conv.Conv2d"
    assert len(mp.requests[0].layers) == 3


def test_profile_is_typed_and_frozen():
    profile = Profile.from_dict(
        {"strict": False, "requests": [{"set_precision": {"target": "fc", "activation": "INT16"}}]}
    )
    assert profile.requests == (SetPrecision("fc", "int16"),)
    assert not profile.strict
    assert Profile.from_dict(profile.to_dict()) == profile
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.strict = True  # type: ignore[misc]
    assert mixprec.Profile is Profile and mixprec.load_profile is load_profile


def test_a_bad_entry_records_nothing(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "requests:\n"
        "  - set_precision: {target: stem, activation: int16}\n"
        "  - set_precision: {target: stemm, activation: int16}\n"
    )
    mp = MixedPrecisionConfigurator(make("small_cnn"))
    with pytest.raises(ProfileError, match=r"p\.yaml: entry 2 \(line 3\): target 'stemm'.*close names: stem"):
        mp.apply_profile(path)
    assert mp.requests == ()


def test_unknown_class_path_says_what_is_missing():
    mp = MixedPrecisionConfigurator(make("small_cnn"))
    with pytest.raises(ProfileError, match=r"entry 1: .*torch\.nn has no attribute 'Conv3dd'"):
        mp.apply_profile(
            {"requests": [{"set_precision": {"target": "torch.nn.Conv3dd", "activation": "int8"}}]}
        )


YAML_ERRORS = [
    ("strict: true\ncolour: red\n", r"line 2: unknown key 'colour'"),
    ("version: 2\n", r"line 1: version 2 is not supported"),
    ("strict: yes please\n", r"line 1: strict must be true or false"),
    ("requests: {set_precision: {}}\n", r"line 1: requests must be a list"),
    ("requests:\n  - model_input: {activation: int16}\n  - set_precision: {target: fc, activation: int17}\n",
     r"entry 2 \(line 3\): set_precision\.activation: unknown precision 'int17'"),
    ("requests:\n  - set_precision: {activation: int8}\n", r"entry 1 \(line 2\): set_precision needs 'target'"),
    ("requests:\n  - set_precision: {target: fc}\n", r"entry 1 \(line 2\): set_precision needs 'activation' or 'param'"),
    ("requests:\n  - set_precision: {target: fc, activation: int8, params: {weight: int8}}\n",
     r"entry 1 \(line 2\): set_precision has unknown key\(s\) \['params'\]"),
    ("requests:\n  - set_precision: {target: fc, param: {weight: int99}}\n", r"entry 1 \(line 2\): param 'weight'"),
    ("requests:\n  - model_input: int16\n", r"entry 1 \(line 2\): model_input takes a mapping"),
    ("requests:\n  - model_output: {}\n", r"entry 1 \(line 2\): model_output needs 'activation'"),
    ("requests:\n  - set_model_input_precision: {activation: int16}\n", r"entry 1 \(line 2\): expected a mapping with one key"),
    ("requests:\n  - [fc, int8\n", r"line 3: invalid YAML"),
    ("", r"a profile is a mapping .* got nothing"),
]  # fmt: skip


@pytest.mark.parametrize(
    "text, message",
    YAML_ERRORS,
    ids=["unknown-key", "version", "strict", "requests-type", "precision", "no-target", "nothing-asked",
         "entry-key", "param-precision", "io-shorthand", "io-empty", "unknown-api", "syntax", "empty"],
)  # fmt: skip
def test_yaml_schema_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(
        ProfileError, match=rf"bad\.yaml:? {message}" if message.startswith("line") else message
    ):
        load_profile(path)


def test_json_errors_name_entry_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        '{\n  "requests": [\n    {"model_input": {"activation": "int16"}},\n    {"set_precision": {"target": 3}}\n  ]\n}\n'
    )
    with pytest.raises(ProfileError, match=r"bad\.json: entry 2 \(line 4\): set_precision needs 'target'"):
        load_profile(path)
    path.write_text('{"requests": [}\n')
    with pytest.raises(ProfileError, match=r"bad\.json line 1: invalid JSON"):
        load_profile(path)


@pytest.mark.parametrize("name", ["profile.txt", "missing.yaml"], ids=["suffix", "missing"])
def test_unreadable_or_unknown_files(tmp_path, name):
    with pytest.raises(ProfileError, match="profile"):
        if name == "profile.txt":
            Profile().save(tmp_path / name)
        else:
            load_profile(tmp_path / name)

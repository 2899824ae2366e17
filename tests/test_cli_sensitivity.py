"""``mixprec sensitivity MODEL``: the table, the JSON and HTML files, the suggested profile, errors."""

from __future__ import annotations

import json

import pytest
from torch import nn

from mixprec.cli_sensitivity import parse_params, parse_target

from .test_cli import run_in_process


def test_sensitivity_writes_json_html_and_a_suggested_profile(tmp_path, monkeypatch, capsys) -> None:
    args = ["sensitivity", "demo", "--param", "weight=int4", "--targets", "Conv2d", "--out", "out",
            "--batches", "1", "--suggest-sqnr", "0"]  # fmt: skip
    code, out, err = run_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    deltas = [row["delta"] for row in report["rows"]]
    assert report["tried"] == "weight int4" and deltas == sorted(deltas) and len(deltas) > 3
    assert report["rows"][0]["layer"] in out  # the table shows the most sensitive layer
    assert "<svg" in (tmp_path / "out" / "sensitivity.html").read_text()
    assert "set_precision" in (tmp_path / "out" / "suggested_profile.yaml").read_text()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--param", "weight"], "is not NAME=PRECISION"),
        (["--param", "weight=int4", "--targets", "torch.nn.NoSuchLayer"], "cannot import 'NoSuchLayer'"),
        (["--param", "weight=int99"], "not valid"),
    ],
    ids=["malformed-param", "unknown-class", "bad-precision"],
)
def test_user_errors_are_one_line(tmp_path, monkeypatch, capsys, args, fragment) -> None:
    base = ["sensitivity", "demo", "--out", "out", "--batches", "1"]
    if "--targets" not in args:
        args = [*args, "--targets", "Conv2d"]
    code, _, err = run_in_process([*base, *args], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_targets_and_params_parse_like_the_python_api() -> None:
    assert parse_target("Conv2d") is nn.Conv2d
    assert parse_target("torch.nn.Linear") is nn.Linear
    assert parse_target("layer1.0.conv1") == "layer1.0.conv1"
    assert parse_target("re:layer[12]\\..*") == "re:layer[12]\\..*"
    assert parse_params(["weight=int4"], 32) == {"weight": {"precision": "int4", "block_size": 32}}

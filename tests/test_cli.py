"""The ``mixprec`` command line, run as users run it: in a subprocess, checking files and exit codes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixprec import QuantizationSimModel
from mixprec.cli import main

PROFILE = """\
version: 1
strict: true
requests:
  - set_precision: {target: layer1.conv2, activation: int16, param: {weight: int16}}
  - set_precision: {target: torch.nn.Linear, activation: fp16}
  - model_input: {activation: int16}
"""


def run(*args, cwd, console_script=False):
    """Run ``mixprec ARGS`` (``python -m mixprec.cli`` unless the console script is asked for)."""
    if console_script:
        command = [str(Path(sys.executable).with_name("mixprec")), *args]
    else:
        command = [sys.executable, "-m", "mixprec.cli", *args]
    env = {k: v for k, v in os.environ.items() if k != "MIXPREC_DEBUG"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # subprocess tests: a fresh interpreter importing torch each
def test_demo_writes_the_reports(tmp_path):
    script = Path(sys.executable).with_name("mixprec")
    result = run("demo", "--out", "out", "--calibrate", "1", cwd=tmp_path, console_script=script.exists())
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    for name in ("mmp_log.txt", "report.json", "report.html", "profile.yaml"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert [r["target"] for r in report["unmatched"]] == ["torch.nn.modules.pooling.AvgPool2d"]
    assert {r["api"] for r in report["requests"]} == {
        "set_precision",
        "set_model_input_precision",
        "set_model_output_precision",
    }
    assert "Mixed precision requests after propagation" in (out / "mmp_log.txt").read_text()
    assert '<svg id="graph"' in (out / "report.html").read_text()
    assert "DemoNet: 17 layers" in result.stdout or "17 layers" in result.stdout


@pytest.mark.slow
def test_apply_runs_the_whole_flow(tmp_path):
    (tmp_path / "profile.yaml").write_text(PROFILE)
    args = ["apply", "demo", "--profile", "profile.yaml", "--out", "out", "--calibrate", "1", "--no-export"]
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert [r["location"] for r in report["requests"]] == [f"profile.yaml:entry {i}" for i in (1, 2, 3)]
    assert next(row for row in report["layers"] if row["name"] == "fc")["computes"] == "fp16"
    assert (out / "report.html").is_file() and (out / "mmp_log.txt").is_file()
    assert not list(out.glob("DemoNet*"))


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mixprec.export.exporter") is None,
    reason="mixprec.export.exporter not in this tree",
)
def test_apply_exports_the_model(tmp_path):
    (tmp_path / "profile.yaml").write_text(PROFILE)
    args = ["apply", "demo", "-p", "profile.yaml", "-o", "out", "--calibrate", "1", "--prefix", "net"]
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in (tmp_path / "out").glob("net*")} >= {"net.onnx", "net.encodings"}


def test_apply_without_export_support_says_so(tmp_path, monkeypatch, capsys):
    # In process: a missing exporter (no onnx installed) is simulated by an export that cannot import.
    def no_export(*args, **kwargs):
        raise ImportError("No module named 'onnx'")

    monkeypatch.setattr(QuantizationSimModel, "export", no_export)
    (tmp_path / "profile.yaml").write_text(PROFILE)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["apply", "demo", "-p", "profile.yaml", "-o", "out", "--calibrate", "1"])
    assert exit_info.value.code == 0
    assert "export skipped: No module named 'onnx'" in capsys.readouterr().err
    assert (tmp_path / "out" / "report.html").is_file()


@pytest.mark.slow
def test_apply_takes_a_factory_from_the_working_directory(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n\n"
        "class Tiny(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)\n\n"
        "    def forward(self, x):\n"
        "        return self.b(torch.relu(self.a(x)))\n\n"
        "def tiny():\n"
        "    return Tiny(), torch.randn(2, 4)\n"
    )
    (tmp_path / "p.json").write_text(
        json.dumps({"requests": [{"set_precision": {"target": "a", "activation": "int16"}}]})
    )
    result = run(
        "apply", "mymodels:tiny", "-p", "p.json", "-o", "out", "--calibrate", "1", "--no-export", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["requests"][0]["layers"] == ["a"]


@pytest.mark.slow
def test_inspect_lists_layers(tmp_path, monkeypatch, capsys):
    table = run("inspect", "demo", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert (
        "layer1.conv2" in table.stdout
        and "Conv2d" in table.stdout
        and "model inputs: input[0] int8" in table.stdout
    )
    exit_code, out, _ = run_in_process(
        ["inspect", "mixprec.demo:build", "--json"], tmp_path, monkeypatch, capsys
    )
    assert exit_code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows][:3] == ["stem.0", "stem.1", "stem.2"]
    assert rows[0]["params"]["weight"] == "int8"


def run_in_process(args, cwd, monkeypatch, capsys):
    """``main(args)`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", list(sys.path))  # MODEL loading may add the working directory
    monkeypatch.delenv("MIXPREC_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def write_bad_profiles(folder):
    (folder / "bad.yaml").write_text("requests:\n  - set_precision: {target: fc, activation: int17}\n")
    (folder / "typo.yaml").write_text(
        "requests:\n  - set_precision: {target: layer1.conv22, activation: int8}\n"
    )


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["apply", "demo", "-p", "bad.yaml", "-o", "out"], ["bad.yaml: entry 1 (line 2)", "int17"]),
        (["inspect", "nosuchmodule:build"], ["cannot import module 'nosuchmodule'"]),
    ],
    ids=["bad-profile", "unknown-model"],
)
@pytest.mark.slow
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, args, fragments):
    write_bad_profiles(tmp_path)
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixprec: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written before the inputs check out


IN_PROCESS_ERRORS = [
    (["apply", "demo", "-p", "typo.yaml", "-o", "out"], ["typo.yaml: entry 1 (line 2)", "close names"]),
    (["apply", "demo", "-p", "nothere.yaml", "-o", "out"], ["cannot read profile nothere.yaml"]),
    (["inspect", "torchvision:resnet5"], ["unknown torchvision model 'resnet5'", "resnet50"]),
    (["inspect", "mixprec.demo:nothing"], ["module 'mixprec.demo' has no callable 'nothing'"]),
    (["inspect", "mixprec.demo:INPUT_SHAPE"], ["has no callable 'INPUT_SHAPE'"]),
    (["inspect", "resnet18"], ["is not torchvision:<name>, <module>:<factory> or demo"]),
    (["inspect", "demo", "--config", "nosuchpreset"], ["nosuchpreset", "preset"]),
]


@pytest.mark.parametrize(
    "args, fragments",
    IN_PROCESS_ERRORS,
    ids=["unknown-layer", "missing-profile", "unknown-torchvision", "unknown-factory", "not-callable",
         "malformed-model", "bad-config"],
)  # fmt: skip
def test_more_user_errors_in_process(tmp_path, monkeypatch, capsys, args, fragments):
    write_bad_profiles(tmp_path)
    exit_code, out, err = run_in_process(args, tmp_path, monkeypatch, capsys)
    assert exit_code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixprec: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp_path / "out").exists()

"""The model-zoo sweep script (benchmarks/zoo.py) on a handful of its models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("bert", "llama_eager", "resnet18")


@pytest.mark.slow
def test_zoo_script_runs_models_through_every_stage(tmp_path: Path) -> None:
    out, doc = tmp_path / "zoo.json", tmp_path / "models.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [sys.executable, str(ROOT / "benchmarks/zoo.py"), "--models", ",".join(MODELS)]
    cmd += ["--timeout", "400", "--out", str(out), "--doc", str(doc)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1500)
    rows = {r["model"]: r for r in json.loads(out.read_text())["models"]}
    assert set(rows) == set(MODELS)
    for name, row in rows.items():
        stages = row["stages"]
        assert [s for s in stages if stages[s]["status"] == "ok"] == list(stages), (name, stages)
        assert len(stages) == 7, name
        assert stages["export"]["covered"] == stages["export"]["quantizers"] > 0
        agreement = stages["ort"]["sqnr_vs_sim"]
        assert math.isinf(agreement) or agreement >= 40, (name, agreement)
    table = doc.read_text()
    assert all(f"| {name} | ok | ok |" in table for name in MODELS)

"""Helpers shared by the tests: sims of the tiny models, running and calibrating them, and metrics.

The models themselves and their example inputs are in tests/models.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mixprec import MixedPrecisionConfigurator, QuantizationSimModel

from .models import SmallCNN, WithBlock, build


def run(model: nn.Module, example: Any) -> Any:
    """Call ``model`` on an example input: a tensor, a tuple of positional inputs or a dict of keywords."""
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


def forward(example: Any) -> Callable[[nn.Module, Any], Any]:
    """A ``compute_encodings`` callback that runs ``example`` once."""
    return lambda model, _: run(model, example)


def calibrate(sim: QuantizationSimModel, example: Any) -> None:
    """Compute every encoding of ``sim`` from one forward pass of ``example``."""
    sim.compute_encodings(forward(example), None)


def small_cnn_sim(**kwargs: Any) -> tuple[QuantizationSimModel, torch.Tensor]:
    """A sim of a seeded SmallCNN (constructor keywords passed through) and its example input."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = model.example_input()
    return QuantizationSimModel(model, x, **kwargs), x


def calibrated_small_cnn(**kwargs: Any) -> tuple[QuantizationSimModel, torch.Tensor]:
    """``small_cnn_sim`` with its encodings computed from the example input."""
    sim, x = small_cnn_sim(**kwargs)
    sim.compute_encodings(lambda m: m(x))
    return sim, x


def precision_rows(sim: QuantizationSimModel) -> dict[str, dict]:
    """``sim.precision_table()`` keyed by layer name."""
    return {row["name"]: row for row in sim.precision_table()}


def make(name: str, **kwargs: Any) -> tuple[QuantizationSimModel, MixedPrecisionConfigurator, Any]:
    """A sim of the tiny model ``name`` (see tests/models.py), its configurator and its example input."""
    model, example = build(name)
    sim = QuantizationSimModel(model, dummy_input=example, **kwargs)
    return sim, MixedPrecisionConfigurator(sim), example


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB."""
    return (10 * torch.log10(reference.pow(2).mean() / (reference - test).pow(2).mean())).item()


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1.3e-6, atol: float = 1e-5) -> None:
    """Like torch.testing.assert_close, without its ~2 s first-call import cost."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a64, b64 = a.double(), b.double()
    assert torch.allclose(a64, b64, rtol=rtol, atol=atol), f"max abs diff {(a64 - b64).abs().max().item()}"


def write_encodings(sim: QuantizationSimModel, path: Path) -> dict:
    """Write the ``.encodings`` document export writes, with made-up tensor names (no ONNX needed)."""
    from mixprec.export.encodings import Row, build_encodings

    rows = [Row(place, q, (f"t{i}",)) for i, (place, q) in enumerate(sim.quantizers())]
    rows += [Row(place, None, ()) for place in sim.places() if sim.quantizer_at(place) is None]
    document = build_encodings(sim, rows)
    path.write_text(json.dumps(document))
    return document


def launch_ranks(script: str, out_dir: Path, world: int, timeout_s: float) -> list[Any]:
    """Run ``script RANK STORE OUT_DIR`` in ``world`` processes (a gloo group) and load each
    rank's ``rank{r}.pt``; a hang or a failing rank fails the test with that rank's log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(r), str(out_dir / "store"), str(out_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout_s
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"distributed workers did not finish in {timeout_s} s (a hang)")
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def with_block_sim() -> tuple[nn.Module, torch.Tensor, QuantizationSimModel]:
    """``WithBlock`` (a submodule to call on its own), an input and its calibrated sim."""
    torch.manual_seed(0)
    model = WithBlock().eval()
    x = torch.randn(4, 6)
    sim = QuantizationSimModel(model, dummy_input=x)
    sim.compute_encodings(lambda m, _: m(x), None)
    return model, x, sim

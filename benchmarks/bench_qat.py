"""CPU time of a quantization-aware training step: float model, sim with frozen encodings, sim
with learnable encodings (``training_range_learning_with_tf_init``), side by side in one process.

One step is forward + backward + ``Adam.step`` on torchvision's ResNet-18 (random weights, int8,
per-channel weights) with a batch of 8 images of 3x64x64; inference is a ``no_grad`` forward.

Usage:
    python benchmarks/bench_qat.py [--threads N] [--repeats R]

Prints a table and writes ``benchmarks/results/qat.json``. Times are the median and minimum
wall time of ``R`` runs after warm-up, and the median process CPU time; ratios are against the
float model measured in the same process. On a busy machine trust the minimum, or the CPU time
with ``--threads 1``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mixprec import QuantizationSimModel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: python benchmarks/...
    sys.path.insert(0, str(ROOT))

from benchmarks._timing import time_runs  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "qat.json"


timeit = functools.partial(time_runs, warmup=2)


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


def infer(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10).eval()
    x, target = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    sims = {}
    for name, scheme in (("frozen", "tf"), ("learnable", "training_range_learning_with_tf_init")):
        sim = QuantizationSimModel(
            copy.deepcopy(model), dummy_input=x[:1], quant_scheme=scheme, config_file="per_channel"
        )
        sim.compute_encodings(lambda m, _: m(x), None)
        sims[name] = sim
    rows = {
        "train step: float model": timeit(train_step(model, x, target), args.repeats),
        "train step: sim, frozen encodings": timeit(
            train_step(sims["frozen"].model, x, target), args.repeats
        ),
        "train step: sim, learnable encodings": timeit(
            train_step(sims["learnable"].model, x, target), args.repeats
        ),
        "inference: float model": timeit(infer(model, x), args.repeats),
        "inference: sim, frozen encodings": timeit(infer(sims["frozen"].model, x), args.repeats),
        "inference: sim, learnable encodings": timeit(infer(sims["learnable"].model, x), args.repeats),
    }
    print(f"{'case':40} {'median ms':>10} {'min ms':>10} {'cpu ms':>10} {'x float (min)':>14}")
    for case, t in rows.items():
        base = rows[("train step" if case.startswith("train") else "inference") + ": float model"]
        ratio = t["min_ms"] / base["min_ms"]
        t["ratio_to_float_min"] = ratio
        print(
            f"{case:40} {t['median_ms']:10.1f} {t['min_ms']:10.1f} {t['cpu_median_ms']:10.1f} {ratio:14.2f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    RESULTS.write_text(
        json.dumps({"machine": machine, "repeats": args.repeats, "rows": rows}, indent=1) + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

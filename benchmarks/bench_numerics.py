"""Sim vs float accuracy on torchvision resnet18 (random weights, fixed random batch 4x3x128x128).

Usage: python benchmarks/bench_numerics.py   (prints a table, writes benchmarks/results/numerics.json)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torchvision.models import resnet18

import mixprec


def main() -> None:
    torch.manual_seed(0)
    model = resnet18(weights=None).eval()
    x = torch.randn(4, 3, 128, 128)
    with torch.no_grad():
        y_float = model(x)
    rows = []
    for bw, data_type in [(8, "int"), (16, "int"), (16, "float")]:
        start = time.perf_counter()
        sim = mixprec.QuantizationSimModel(
            model, dummy_input=x[:1], default_output_bw=bw, default_param_bw=bw, default_data_type=data_type
        )
        build = time.perf_counter() - start
        start = time.perf_counter()
        sim.compute_encodings(lambda m, _: m(x), None)
        calib = time.perf_counter() - start
        with torch.no_grad():
            y_sim = sim.model(x)
        noise = (y_float - y_sim).pow(2).mean()
        rows.append(
            {
                "precision": f"{data_type}{bw}",
                "sqnr_db": round((10 * torch.log10(y_float.pow(2).mean() / noise)).item(), 1),
                "relative_error": float(f"{((y_float - y_sim).norm() / y_float.norm()).item():.2e}"),
                "build_s": round(build, 2),
                "compute_encodings_s": round(calib, 2),
            }
        )
    print(f"{'precision':<10} {'SQNR dB':>8} {'rel err':>9} {'build s':>8} {'calib s':>8}")
    for r in rows:
        print(
            f"{r['precision']:<10} {r['sqnr_db']:>8} {r['relative_error']:>9} {r['build_s']:>8} {r['compute_encodings_s']:>8}"
        )
    out = Path(__file__).parent / "results" / "numerics.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

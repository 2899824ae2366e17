"""The model zoo sweep: every model of benchmarks/_zoo_models.py through what a new user does.

    python benchmarks/zoo.py                         # all models, 300 s each
    python benchmarks/zoo.py --models resnet18,bert  # a subset
    python benchmarks/zoo.py --timeout 120 --doc ''  # no docs/models.md

One subprocess per model (a crash or hang costs one row), each with a time limit. Stages, in
order (a failed stage ends the model's run): build (QuantizationSimModel at w8a8), mixed
(MixedPrecisionConfigurator: int16 activations on one layer type), calibrate (compute_encodings,
SQNR of the sim's first output vs the float model's), other shapes (the sim on inputs of other
batch/sequence/image sizes), export (coverage), ort (onnxruntime on the QDQ model vs the sim:
SQNR), time (float and sim forward, side by side). Writes benchmarks/results/zoo.json and
docs/models.md (the supported-models table; rerun before each release).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGES = ("build", "mixed", "calibrate", "other_shapes", "export", "ort", "time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated names (default: all)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/zoo.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs/models.md"), help="'' to skip")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # worker mode: one model, JSON to --out
    args = parser.parse_args()
    if args.one:
        from benchmarks._zoo_worker import run_one

        Path(args.out).write_text(json.dumps(run_one(args.one), indent=1))
        return
    from benchmarks._zoo_models import MODELS

    names = [n for n in args.models.split(",") if n] or list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    results = _previous(args.out, names) if args.models else []
    for name in names:
        row = _run_subprocess(name, args.timeout)
        results = [r for r in results if r["model"] != name] + [row]
        print(_line(row), flush=True)
        _write(results, args)
    _write(results, args)


def _previous(out: str, names: list[str]) -> list[dict]:
    """Rows of an earlier sweep (a rerun of some models replaces just their rows)."""
    path = Path(out)
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text()).get("models", []) if r["model"] not in names]


def _run_subprocess(name: str, timeout: float) -> dict:
    out = ROOT / f"benchmarks/results/.zoo_{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        error = proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
    except subprocess.TimeoutExpired:
        error = [f"time limit {timeout:.0f} s reached"]
    row = json.loads(out.read_text()) if out.exists() else {"model": name, "stages": {}}
    out.unlink(missing_ok=True)
    if error and not any(s.get("status") == "fail" for s in row["stages"].values()):
        done = [s for s in STAGES if s in row["stages"]]
        stage = STAGES[len(done)] if len(done) < len(STAGES) else "time"
        row["stages"][stage] = {"status": "fail", "error": error[0][:300]}
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _line(row: dict) -> str:
    cells = []
    for stage in STAGES:
        s = row["stages"].get(stage)
        cells.append(f"{stage}={'-' if s is None else s['status']}")
    fail = next((f"{k}: {s['error']}" for k, s in row["stages"].items() if s["status"] == "fail"), "")
    return f"{row['model']:40s} {' '.join(cells)} {row['seconds']:.0f}s {fail[:160]}"


def _machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }


def _write(results: list[dict], args: argparse.Namespace) -> None:
    from benchmarks._zoo_models import MODELS

    order = {name: i for i, name in enumerate(MODELS)}
    results = sorted(results, key=lambda r: order.get(r["model"], len(order)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "models": results,
    }
    Path(args.out).write_text(json.dumps(payload, indent=1))
    if args.doc:
        from benchmarks._zoo_report import render

        Path(args.doc).write_text(render(payload))


if __name__ == "__main__":
    main()

"""mixprec benchmark runner (issue 6): prints a table and writes benchmarks/results/latest.json.

    python benchmarks/run.py            # default settings, a 240 s budget (runs < 5 min)
    python benchmarks/run.py --quick    # smaller inputs, fewer reps, a 120 s budget

Sections: (a) sim build vs float forward, (b) calibrated sim forward vs float forward, (c)
compute_encodings, (d) configurator apply vs layer count, (e) the same (a)-(c) with aimet-torch
when its venv is there (another python, run as a subprocess; never a dependency).
Every section fits its repetitions to its share of ``--budget``; see docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

STARTED = time.perf_counter()  # total runtime includes importing torch, torchvision and mixprec

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import _models  # noqa: E402
from benchmarks._apply_bench import apply_section  # noqa: E402
from benchmarks._backends import MixprecBackend  # noqa: E402
from benchmarks._report import render, targets  # noqa: E402
from benchmarks._sections import (  # noqa: E402
    build_section,
    calibration_section,
    compiled_forward_section,
    forward_section,
)
from benchmarks._timing import (  # noqa: E402
    Budget,
    cpu_share,
    git_revision,
    load_average,
    machine_info,
    now,
    speed_probe,
    split_deadline,
    usable_cores,
)

SHARES = {"a": 0.16, "b": 0.30, "c": 0.18, "d": 0.10, "e": 0.26}
DEFAULT_AIMET_PYTHON = os.environ.get("AIMET_PYTHON", str(ROOT.parent / "aimet-venv" / "bin" / "python"))


def settings_from(args: argparse.Namespace) -> dict:
    quick = args.quick
    return {
        "threads": args.threads or usable_cores(),
        "build_models": ["resnet50", "mobilenet_v2", "vit_b_16", _models.TRANSFORMER],
        "build_reps": 2 if quick else 3,
        "forward_models": ["resnet50", "mobilenet_v2"],
        "forward_batches": [8, 32],
        "forward_image": args.forward_image or (112 if quick else 224),
        "forward_max_reps": 3 if quick else 7,
        "calib_models": ["resnet50", "mobilenet_v2"],
        "calib_batches": 32,
        "calib_batch": 8,
        "calib_image": args.calib_image or (32 if quick else 64),
        "apply_sizes": [500, 1000, 2000, 5000],
        "apply_reps": 1 if quick else 3,
    }


def notes(s: dict) -> dict:
    return {
        "all": _models.FLUSH_DENORMAL_NOTE,
        "build": "QuantizationSimModel(model, dummy) with default args: tf_enhanced, int8/int8, default config; "
        "float fwd = the same batch-1 dummy input; " + _models.TRANSFORMER_NOTE,
        "forward": f"{s['forward_image']}x{s['forward_image']}, torch.no_grad, {s['threads']} threads; "
        "config per_channel (per-tensor activations, per-channel weights), encodings from min-max on the dummy; "
        "mixed = every 3rd Conv2d in module order set to activation+weight int16 via MixedPrecisionConfigurator "
        "(strict=False); float and sims interleaved per round after a warm-up, ratio = median of per-round ratios",
        "calibration": f"{s['calib_batches']} batches of {s['calib_batch']} random images {s['calib_image']}x"
        f"{s['calib_image']}, quant_scheme tf_enhanced, config per_channel, every Conv2d activation+weight int16 "
        "via set_precision(nn.Conv2d, ...) + apply; 'est.' = the observing pass stopped at its time budget and the "
        "remaining batches are extrapolated from the last ones",
    }


_FIND_AIMET = "import importlib.util, sys; sys.exit(importlib.util.find_spec('aimet_torch') is None)"


def aimet_unavailable(python: str) -> str | None:
    """Why aimet-torch cannot run from ``python``, or None when it can."""
    if not Path(python).exists():
        return f"not available: no python at {python}"
    try:
        probe = subprocess.run([python, "-c", _FIND_AIMET], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return f"not available: looking for aimet_torch timed out in {python}"
    return None if probe.returncode == 0 else f"not available: no aimet_torch module in {python}"


def run_aimet(python: str, settings: dict, budget_s: float) -> dict:
    """Sections (a)-(c) in the AIMET venv; a dict with 'status' and, when it ran, its sections."""
    worker = {**settings, "budget_s": budget_s, "sections": ["build", "forward", "calibration"]}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aimet.json"
        cmd = [python, "-m", "benchmarks._aimet_worker", json.dumps(worker), str(out)]
        with subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        ) as proc:
            try:
                tail = proc.communicate(timeout=budget_s + 30)[1][-2000:]
            except subprocess.TimeoutExpired:
                proc.terminate()  # the worker saves what it measured, then exits
                try:
                    tail = proc.communicate(timeout=30)[1][-2000:]
                except subprocess.TimeoutExpired:
                    proc.kill()
                    tail = proc.communicate()[1][-2000:]
        data = json.loads(out.read_text()) if out.exists() else {"status": "failed", "note": tail}
    if data.get("status") == "running":
        data["status"] = "partial"
    data["python"] = python
    if data.get("status") not in ("done", "partial"):
        data.setdefault("note", tail)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer reps")
    parser.add_argument(
        "--budget", type=float, default=None, help="wall-clock seconds for all sections (240; quick 120)"
    )
    parser.add_argument("--sections", default="abcde", help="subset of abcde to run")
    parser.add_argument("--forward-image", type=int, help="image size of section (b)")
    parser.add_argument("--calib-image", type=int, help="image size of section (c)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the usable cores)")
    parser.add_argument(
        "--aimet-python", default=DEFAULT_AIMET_PYTHON, help="python of a venv with aimet-torch"
    )
    parser.add_argument(
        "--aimet-budget",
        type=float,
        help="seconds for section (e) on top of --budget (default: a share of it)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    args = parser.parse_args(argv)
    started = STARTED
    cpu_start = time.process_time()
    warnings.filterwarnings("ignore")
    s = settings_from(args)
    torch.set_num_threads(s["threads"])
    torch.set_flush_denormal(True)  # see _models.FLUSH_DENORMAL_NOTE
    budget_s = args.budget or (120 if args.quick else 240)
    sections = args.sections
    aimet_note = (
        aimet_unavailable(args.aimet_python) if "e" in sections else "not run (section e not selected)"
    )
    if aimet_note or args.aimet_budget:
        sections = sections.replace("e", "")  # no share of the main budget
    budget = Budget(budget_s, {k: v for k, v in SHARES.items() if k in sections})
    backend = MixprecBackend()
    result: dict = {
        "machine": machine_info(),
        "mixprec_version": backend.version,
        "git": git_revision(ROOT),
        "settings": {**s, "quick": args.quick, "budget_s": budget_s, "flush_denormal": True},
        "notes": notes(s),
    }
    result["speed_probe_ms"] = {}
    mode = "quick" if args.quick else "default"
    result["settings_note"] = f"{mode}, budget {budget_s:.0f} s, sections {sections}"

    def step(key: str, label: str, fn) -> None:  # type: ignore[no-untyped-def]
        if key not in sections:
            return
        result["speed_probe_ms"][key] = speed_probe()
        print(f"[{now() - started:5.0f}s] {label} ...", file=sys.stderr, flush=True)
        fn(budget.section(key))

    step(
        "a",
        "(a) sim build",
        lambda end: result.update(
            build=build_section(backend, s["build_models"], reps=s["build_reps"], deadline=end)
        ),
    )
    calib = {"batches": s["calib_batches"], "batch": s["calib_batch"], "image": s["calib_image"]}
    step(
        "c",
        "(c) compute_encodings",
        lambda end: result.update(
            calibration=calibration_section(backend, s["calib_models"], deadline=end, **calib)
        ),
    )
    note = "deep stack of x + relu(linear(x)) blocks, width 8; set_precision(nn.Linear, p) + 100 set_precision(relu_i, p)"
    step(
        "d",
        "(d) apply vs layers",
        lambda end: result.update(
            apply={"note": note, **apply_section(s["apply_sizes"], reps=s["apply_reps"], deadline=end)}
        ),
    )
    # (b) runs last: its batch-32 cells are the longest and fault in gigabytes of fresh memory
    # per call, so they go where running out of time costs the least.
    fwd = {"batches": s["forward_batches"], "image": s["forward_image"], "max_reps": s["forward_max_reps"]}
    cuda_parts = 2 if torch.cuda.is_available() else 1
    step("b", "(b) forward", lambda end: result.update(
        forward=forward_section(backend, s["forward_models"], deadline=split_deadline(end, cuda_parts), **fwd),
        forward_compiled=compiled_forward_section(backend, s["forward_models"], deadline=end, **fwd),
    ))  # fmt: skip
    if aimet_note:
        result["aimet"] = {"status": "not run", "note": aimet_note}
    else:
        print(f"[{now() - started:5.0f}s] (e) aimet-torch subprocess ...", file=sys.stderr, flush=True)
        aimet_s = args.aimet_budget or max(30.0, budget.section("e") - now())
        result["aimet"] = run_aimet(args.aimet_python, s, aimet_s)
    result["speed_probe_ms"]["end"] = speed_probe()
    result["load_average_end"] = load_average()
    result["targets"] = targets(result)
    result["total_runtime_s"] = now() - started
    result["cpu_share"] = cpu_share(result["total_runtime_s"], time.process_time() - cpu_start, s["threads"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(render(result))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sensitivity sweep benchmark (issue 17): mixprec's ``analyze_sensitivity`` vs the reference's
per-layer analysis, on the same model and images, side by side in one run.

    python benchmarks/bench_sensitivity.py                 # resnet50, 8 images at 224, all Conv2d at int4 weights
    python benchmarks/bench_sensitivity.py --quick         # resnet18, 8 images at 64
    python benchmarks/bench_sensitivity.py --full-forward  # also mixprec without prefix reuse (fast=False)
    python benchmarks/bench_sensitivity.py --full-forward --no-aimet --out benchmarks/results/sensitivity_ablation.json

The reference runs in its own venv (``$AIMET_PYTHON``, default ``../aimet-venv/bin/python``) as a
subprocess, never imported here; it is skipped when that python is missing. Prints a table and
writes benchmarks/results/sensitivity.json. Wall times move with the machine's load: the table
also gives process CPU seconds and a speed probe before each side (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks._models import build, images  # noqa: E402
from benchmarks._timing import load_average, machine_info, speed_probe  # noqa: E402

AIMET_PYTHON = os.environ.get("AIMET_PYTHON") or next(
    (str(p / "aimet-venv" / "bin" / "python") for p in ROOT.parents if (p / "aimet-venv").is_dir()),
    str(ROOT.parent / "aimet-venv" / "bin" / "python"),
)
OUT = ROOT / "benchmarks" / "results" / "sensitivity.json"


def mixprec_side(settings: dict, fast: bool) -> dict:
    import mixprec
    from mixprec.analysis import sweep

    sweep.CLOCK = time.process_time  # rep.timings in process CPU seconds (one thread: the work done)

    model, dummy = build(settings["model"], settings["image"])
    data = images(settings["images"], settings["image"])
    start = time.perf_counter()
    sim = mixprec.QuantizationSimModel(model, dummy_input=dummy)
    build_s = time.perf_counter() - start
    probe = speed_probe()
    wall, cpu = time.perf_counter(), time.process_time()
    rep = mixprec.analyze_sensitivity(
        sim, [data], targets=nn.Conv2d, param={"weight": f"int{settings['param_bw']}"}, fast=fast
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    floor = compute_floor(model, sim, data) if fast else {}  # after the timed call
    return {
        **floor,
        "fast": fast,
        "speed_probe_ms": probe,
        "build_s": build_s,
        "wall_s": wall,
        "cpu_s": cpu,
        "candidates": len(rep.rows),
        "timings_s": rep.timings,
        "counts": rep.counts,
        "baseline_db": rep.baseline,
        "ranking": [r.layer for r in rep.rows[:10]],
        # a perturbation that vanished (a later quantizer rounding the tail back onto the baseline)
        # would leave the output, hence the metric, exactly at the baseline's
        "rows_equal_to_baseline": sum(1 for r in rep.rows if r.delta == 0.0),
    }


def compute_floor(model: nn.Module, sim, data: torch.Tensor) -> dict:
    """What exact per-candidate scores cannot avoid: each candidate's forward from its layer on.

    Counted in conv MACs (candidates in execution order, each cut at its own layer) as forward
    equivalents, and timed as that many full quantized forwards (process CPU seconds).
    """
    order: list[tuple[str, int]] = []

    def count(name: str) -> Callable:
        return lambda mod, a, out: order.append((name, out.numel() * mod.weight[0].numel()))

    hooks = [m.register_forward_hook(count(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(data[:1])
    for h in hooks:
        h.remove()
    macs = [m for _, m in order]
    tails = sum(sum(macs[i:]) for i in range(len(macs))) / sum(macs)
    # a candidate on a residual block's main branch leaves the block's shortcut input unchanged:
    # its downsample conv (run after the main branch in torchvision's blocks) could be reused
    where = {n: i for i, (n, _) in enumerate(order)}
    shortcut = sum(
        order[where[block + ".downsample.0"]][1]
        for name, i in where.items()
        for block in [name.rpartition(".")[0]]
        if ".downsample." not in name and where.get(block + ".downsample.0", -1) > i
    ) / sum(macs)
    sim.compute_encodings(lambda m, _: m(data), None)
    with torch.no_grad():
        sim.model(data[:1])  # fake-quantized weights cached, as in the sweep
        cpu = []
        for _ in range(2):
            start = time.process_time()
            sim.model(data)
            cpu.append(time.process_time() - start)
    return {
        "tail_forward_equivalents": round(tails, 2),
        "shortcut_reuse_forward_equivalents": round(shortcut, 3),
        "quantized_forward_cpu_s": min(cpu),
        "tails_floor_cpu_s": tails * min(cpu),
    }


def aimet_side(settings: dict, limit_s: float) -> dict:
    if not Path(AIMET_PYTHON).exists():
        return {"status": "skipped", "reason": f"no aimet python at {AIMET_PYTHON}"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aimet.json"
        cmd = [AIMET_PYTHON, "-m", "benchmarks._aimet_sensitivity", json.dumps(settings), str(out)]
        proc = subprocess.Popen(cmd, cwd=ROOT)
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=60)
        if not out.exists():
            return {"status": "failed", "returncode": proc.returncode}
        result = json.loads(out.read_text())
    evals = result.get("evaluations") or []
    if result.get("status") == "interrupted" and evals:
        # stopped at the limit: the remaining wrappers at the mean time of the evaluations done
        mean = sum(evals) / len(evals)
        result["estimated_wall_s"] = result["per_layer_wall_s"] + mean * (result["wrappers"] - len(evals))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64x64")
    parser.add_argument("--full-forward", action="store_true", help="also time mixprec with fast=False")
    parser.add_argument(
        "--aimet-limit", type=float, default=1500.0, help="seconds before the reference is stopped"
    )
    # one thread: on a shared 2-core machine a second thread waits for a free core on every op
    # (see _timing.speed_probe), which inflates wall time several times on both sides
    parser.add_argument("--no-aimet", action="store_true", help="skip the reference")
    parser.add_argument(
        "--out", type=Path, default=OUT, help="result JSON (default results/sensitivity.json)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    settings = {
        "model": "resnet18" if args.quick else "resnet50",
        "image": 64 if args.quick else 224,
        "images": 8,
        "param_bw": 4,
        "threads": args.threads,
    }
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # both sides: see benchmarks/_models.FLUSH_DENORMAL_NOTE
    result: dict = {"machine": machine_info(), "settings": settings, "load_average_start": load_average()}
    result["mixprec"] = mixprec_side(settings, fast=True)
    if args.full_forward:
        result["mixprec_full_forward"] = mixprec_side(settings, fast=False)
    result["aimet"] = {"status": "skipped"} if args.no_aimet else aimet_side(settings, args.aimet_limit)
    result["load_average_end"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))


def render(result: dict) -> str:
    s, m, a = result["settings"], result["mixprec"], result["aimet"]
    lines = [
        f"{s['model']}, {s['images']} images at {s['image']}x{s['image']}, all Conv2d at int{s['param_bw']} weights, "
        f"{s['threads']} thread(s); machine {result['machine'].get('cpu_model')}",
        f"{'side':<34}{'evaluations':>12}{'wall s':>10}{'cpu s':>10}{'s / eval':>10}{'probe ms':>10}",
    ]

    def row(name: str, n: int, wall: float, cpu: float | None, probe: float | None) -> None:
        cpu_text = f"{cpu:>10.1f}" if cpu is not None else f"{'-':>10}"
        probe_text = f"{probe:>10.1f}" if probe is not None else f"{'-':>10}"
        lines.append(f"{name:<34}{n:>12}{wall:>10.1f}{cpu_text}{wall / max(n, 1):>10.2f}{probe_text}")

    row("mixprec analyze_sensitivity", m["candidates"], m["wall_s"], m["cpu_s"], m["speed_probe_ms"])
    if "mixprec_full_forward" in result:
        f = result["mixprec_full_forward"]
        row("mixprec, fast=False", f["candidates"], f["wall_s"], f["cpu_s"], f["speed_probe_ms"])
    if a.get("per_layer_wall_s") is not None:
        done = a.get("layers") or len(a.get("evaluations") or [])
        wall = a.get("estimated_wall_s", a["per_layer_wall_s"])
        name = "aimet per-layer (enabling)" + (" est." if "estimated_wall_s" in a else "")
        row(
            name,
            a.get("wrappers") if "estimated_wall_s" in a else done,
            wall,
            a.get("per_layer_cpu_s"),
            a["speed_probe_ms"].get("start"),
        )
        cpu_ratio = a["per_layer_cpu_s"] / m["cpu_s"] if a.get("per_layer_cpu_s") else float("nan")
        lines.append(
            f"reference / mixprec CPU: {cpu_ratio:.2f}x; wall: {wall / m['wall_s']:.2f}x; per evaluation (wall): "
            f"{(a['per_layer_wall_s'] / max(len(a.get('evaluations') or [1]), 1)) / (m['wall_s'] / m['candidates']):.1f}x"
        )
    else:
        lines.append(f"reference: {a.get('status')} {a.get('reason') or a.get('error') or ''}")
    lines.append("mixprec passes (CPU s): " + ", ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items()))
    lines.append(f"mixprec counts: {m['counts']}")
    if "tail_forward_equivalents" in m:
        t = m["timings_s"]
        lines.append(
            f"mixprec candidates' forwards: {t.get('candidates_forward_s', 0.0):.1f} s CPU for "
            f"{m['tail_forward_equivalents']} forward equivalents of conv MACs; one quantized forward "
            f"{m['quantized_forward_cpu_s']:.2f} s CPU, so the floor for exact rows is "
            f"{m['tails_floor_cpu_s']:.1f} s CPU; reusable: downsample convs on unchanged shortcuts "
            f"{m['shortcut_reuse_forward_equivalents']} forward equivalents, rows exactly at the baseline "
            f"(a vanished perturbation) {m['rows_equal_to_baseline']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

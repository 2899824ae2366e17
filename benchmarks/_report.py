"""Targets (PASS/FAIL) and the plain-text table of a benchmark result."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FORWARD_RATIO_MAX = 1.3
RESNET50_BUILD_MAX_S = 0.5
APPLY_5000_MAX_S = 1.0
APPLY_EXPONENT_MAX = 1.15  # t ~ n**b fitted over the sizes; 1.0 is linear


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


FEW_REPS = 3  # verdicts from fewer reps get a "?"


def verdict(ok: bool | None, reps: int | None = None) -> str:
    if ok is None:
        return "-"
    return ("PASS" if ok else "FAIL") + ("?" if reps is not None and reps < FEW_REPS else "")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)


def _by(rows: Any, *keys: str) -> dict:
    if not isinstance(rows, list):
        return {}
    return {tuple(r.get(k) for k in keys): r for r in rows}


def targets(result: dict) -> list[dict]:
    """One entry per target figure: what, value, limit, PASS/FAIL (None when not measured)."""
    out = []
    for row in result.get("forward") or []:
        for profile in ("int8", "mixed"):
            ratio = row.get(f"{profile}_ratio")
            out.append(
                {
                    "target": f"sim forward {profile} {row['model']} b{row['batch']} CPU <= {FORWARD_RATIO_MAX}x float",
                    "value": ratio,
                    "pass": None if ratio is None else ratio <= FORWARD_RATIO_MAX,
                    "reps": row.get("reps"),
                }
            )
    build = _by(result.get("build"), "model").get(("resnet50",), {}).get("build_s")
    out.append(
        {
            "target": f"sim build resnet50 < {RESNET50_BUILD_MAX_S} s",
            "value": build,
            "pass": None if build is None else build < RESNET50_BUILD_MAX_S,
        }
    )
    apply = result.get("apply") or {}
    rows = apply.get("rows") or []
    big = rows[-1] if rows and rows[-1]["requested_layers"] >= 5000 else None
    out.append(
        {
            "target": f"apply at 5000 layers < {APPLY_5000_MAX_S} s (process CPU time)",
            "value": big and big["apply_cpu_s"],
            "pass": None if big is None else big["apply_cpu_s"] < APPLY_5000_MAX_S,
        }
    )
    exponent = apply.get("apply_exponent")
    out.append(
        {
            "target": f"apply linear in layer count (CPU time ~ layers^b, b <= {APPLY_EXPONENT_MAX})",
            "value": exponent,
            "pass": None if exponent is None else exponent <= APPLY_EXPONENT_MAX,
        }
    )
    return out


def render(result: dict) -> str:
    from ._render_sections import render_sections

    m = result["machine"]
    head = (
        f"mixprec {result['mixprec_version']} ({result.get('git') or 'no git'}) benchmark, {m['date_utc']}\n"
        f"{m['cpu_model']}, {m['cores_usable']} usable cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"torchvision {m['torchvision']}, CUDA: {m['cuda'] or 'none'}, load average at start {m['load_average_1_5_15']}"
        f"{', at end ' + str(result.get('load_average_end')) if result.get('load_average_end') else ''}\n"
        f"settings: {result['settings_note']}; flush denormals on (see docs/performance.md)"
    )
    parts = [head, *render_sections(result)]
    lines = [
        [
            t["target"],
            t["value"] if not isinstance(t["value"], float) else f"{t['value']:.3g}",
            verdict(t["pass"], t.get("reps")),
        ]
        for t in result["targets"]
    ]
    parts.append("Targets\n" + table(["target", "value", "verdict"], lines))
    probes = result.get("speed_probe_ms") or {}
    if probes:
        lo, hi = min(probes.values()), max(probes.values())
        steady = (
            "steady"
            if hi <= 1.5 * lo
            else "NOT steady: multi-threaded ops waited for a busy or sleeping core; trust sections with a "
            "low probe, rerun on an idle machine or with --threads 1"
        )
        parts.append(
            "machine speed probe (ms, fixed matmul workload, before each section): "
            + ", ".join(f"{k} {v:.1f}" for k, v in probes.items())
            + f"; max/min {hi / lo:.1f}x ({steady})"
        )
    parts.append(
        f"total runtime {result['total_runtime_s']:.0f} s; this process got {100 * result['cpu_share']:.0f}% of "
        f"{m['torch_threads']} cores over the run (low = other processes competed: wall times are inflated)"
    )
    return "\n\n".join(parts)

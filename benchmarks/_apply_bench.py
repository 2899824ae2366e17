"""(d) MixedPrecisionConfigurator.apply time against layer count, on deep synthetic stacks (mixprec only)."""

from __future__ import annotations

import gc
import math
import warnings
from typing import Any

from torch import nn

from . import _models
from ._timing import median, now, split_deadline, timed_cpu

SCATTERED = 100


def _requests(mp: Any, scattered: list[nn.Module], precision: str) -> float:
    """Record one type-wide request and ``len(scattered)`` leaf requests; seconds it took."""
    start = now()
    mp.set_precision(nn.Linear, activation=precision)
    for module in scattered:
        mp.set_precision(module, activation=precision)
    return now() - start


def apply_section(sizes: list[int], *, reps: int, deadline: float) -> dict:
    """Sim build, request recording and apply time per size, their time per layer and growth exponent.

    Each rep records ``set_precision(nn.Linear, p)`` plus 100 ``set_precision(relu_i, p)`` on
    ReLUs spread evenly through the stack, then applies; ``p`` alternates int16 / int8 so every
    rep changes the same number of quantizers. Wall and process CPU time are both kept; the
    verdicts use CPU time, which other processes on a shared machine inflate far less.
    """
    rows = []
    for i, size in enumerate(sizes):  # never skipped: the largest size carries the targets
        rows.append(_size_row(size, reps, split_deadline(deadline, len(sizes) - i)))
        gc.collect()
    layers = [r["layers"] for r in rows]
    return {
        "rows": rows,
        "apply_exponent": growth_exponent(layers, [r["apply_cpu_s"] for r in rows]),
        "apply_exponent_wall": growth_exponent(layers, [r["apply_s"] for r in rows]),
        "build_exponent": growth_exponent(layers, [r["build_cpu_s"] for r in rows]),
        "apply_per_layer_ratio_last_first": rows[-1]["apply_cpu_per_layer_us"]
        / rows[0]["apply_cpu_per_layer_us"]
        if len(rows) > 1
        else None,
    }


def _size_row(size: int, reps: int, cell_end: float) -> dict:
    import mixprec

    model, x = _models.deep_stack(size)
    box: dict = {}
    wall, cpu = timed_cpu(lambda: box.update(sim=mixprec.QuantizationSimModel(model, dummy_input=x)))
    sim = box.pop("sim")
    row: dict = {
        "requested_layers": size,
        "layers": len(sim.graph.layers),
        "build_s": wall,
        "build_cpu_s": cpu,
    }
    relus = [m for m in sim.model.modules() if isinstance(m, nn.ReLU)]
    scattered = relus[:: max(1, len(relus) // SCATTERED)][:SCATTERED]
    applies, applies_cpu, records = [], [], []
    for r in range(reps):
        if r > 0 and now() + applies[-1] + records[-1] > cell_end:
            break
        mp = mixprec.MixedPrecisionConfigurator(sim)
        records.append(_requests(mp, scattered, "int16" if r % 2 == 0 else "int8"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wall, cpu = timed_cpu(lambda mp=mp: box.update(report=mp.apply(log_file=None, strict=False)))
        applies.append(wall)
        applies_cpu.append(cpu)
        row.setdefault("quantizers_changed", len(box["report"].changes))
    n = row["layers"]
    row.update(
        scattered_requests=len(scattered),
        record_s=median(records),
        apply_s=median(applies),
        apply_cpu_s=median(applies_cpu),
        apply_runs=applies,
        reps=len(applies),
        apply_cpu_per_layer_us=1e6 * median(applies_cpu) / n,
        build_cpu_per_layer_us=1e6 * row["build_cpu_s"] / n,
    )
    return row


def growth_exponent(sizes: list[int], seconds: list[float]) -> float | None:
    """Least-squares ``b`` in ``seconds ~ a * sizes**b`` (1.0 = linear)."""
    pts = [(math.log(n), math.log(t)) for n, t in zip(sizes, seconds, strict=True) if n > 0 and t and t > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None

"""Sections (a) sim build, (b) sim vs float forward, (c) compute_encodings, for either backend.

Every section takes a deadline (a ``_timing.now()`` value) and fits its repetitions to it:
a cell always runs once, repeats while the time allows, and is skipped (with the reason in its
row) when one run is projected to overrun the section by far.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

from . import _models
from ._backends import convs
from ._timing import median, now, split_deadline, timed, timed_cpu


def build_section(backend: Any, names: list[str], *, reps: int, deadline: float) -> list[dict]:
    """(a) Sim construction time (median of ``reps``) next to the float forward of the dummy input."""
    rows = []
    for i, name in enumerate(names):
        if i > 0 and now() >= deadline:
            rows.append({"model": name, "skipped": "out of time"})
            continue
        rows.append(_build_row(backend, name, reps, split_deadline(deadline, len(names) - i)))
        gc.collect()
    return rows


def _build_row(backend: Any, name: str, reps: int, cell_end: float) -> dict:
    model, dummy = _models.build(name)
    row: dict = {"model": name, "input": list(dummy.shape)}
    with torch.no_grad():
        model(dummy)  # warm-up
        forwards = [timed(lambda: model(dummy))]
        while len(forwards) < 3 and now() + 8 * forwards[-1] < cell_end:
            forwards.append(timed(lambda: model(dummy)))
    row.update(float_forward_s=median(forwards), float_forward_reps=len(forwards))
    runs, cpu, infos = [], [], []
    for r in range(reps):
        if r > 0 and now() + runs[-1] > cell_end:
            break
        box: dict = {}
        try:
            wall, cpu_s = timed_cpu(
                lambda box=box: box.update(out=backend.build(model, dummy, config=None, scheme="tf_enhanced"))
            )
        except Exception as exc:  # noqa: BLE001  (a failing model is a row, not a crash)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            break
        runs.append(wall)
        cpu.append(cpu_s)
        infos.append(box.pop("out")[1])
        gc.collect()
    row.update(build_s=median(runs), build_cpu_s=median(cpu), build_runs=runs, reps=len(runs))
    if infos:
        row.update({k: v for k, v in infos[0].items() if not k.endswith("_s")})
        for key in ("prepare_s", "sim_s"):
            if key in infos[0]:
                row[key] = median([info[key] for info in infos])
    return row


SETUP_IMAGE = 64  # (b) builds and calibrates its sims on one 64x64 image, then times the real size


def _forward_setup(backend: Any, name: str, image: int, device: str, compile_: bool) -> dict[str, Any]:
    """Float model, int8 sim and mixed sim (a third of the convs int16), calibrated with "tf"."""
    model, dummy = _models.build(name, min(image, SETUP_IMAGE))  # capture/calibrate small: cheaper setup
    sim8, _ = backend.build(model, dummy, config="per_channel", scheme="tf")
    simmix, _ = backend.build(model, dummy, config="per_channel", scheme="tf")
    backend.int16(simmix, convs(backend.model(simmix))[::3])
    variants = {"float": model, "int8": backend.model(sim8), "mixed": backend.model(simmix)}
    calib = dummy.to(device)
    for key, sim in (("int8", sim8), ("mixed", simmix)):
        variants[key].to(device)
        backend.calibrate(sim, lambda m, _: m(calib))
    model.to(device)
    if compile_:
        return {key: torch.compile(module) for key, module in variants.items()}
    return variants


def interleaved(
    variants: dict[str, Any], x: torch.Tensor, *, deadline: float, max_reps: int, device: str
) -> dict:
    """Warm-up each variant, then rounds of one call each until ``max_reps`` or the deadline."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        warmup_s = sum(timed(lambda f=f: f(x), device) for f in variants.values())
        round_s = warmup_s
        for r in range(max_reps):
            if r > 0 and now() + round_s > deadline:
                break
            for key, fn in variants.items():
                times[key].append(timed(lambda f=fn: f(x), device))
            round_s = sum(t[-1] for t in times.values())
    out: dict = {"reps": len(times["float"]), "warmup_round_s": warmup_s}
    for key, values in times.items():
        out[f"{key}_s"] = median(values)
        if key != "float":
            out[f"{key}_ratio"] = median([s / f for s, f in zip(values, times["float"], strict=True)])
    out["round_s"] = sum(out[f"{key}_s"] for key in times)
    return out


def forward_section(
    backend: Any,
    names: list[str],
    *,
    batches: list[int],
    image: int,
    max_reps: int,
    deadline: float,
    device: str = "cpu",
    compile: bool = False,
) -> list[dict]:
    """(b) Calibrated sim forward vs float forward, interleaved in this process.

    Cells run smallest batch first for every model; a model's float model and sims are built
    when its first cell runs. After the first cell, cells are skipped once the deadline passed.
    """
    setups: dict[str, Any] = {}
    rows: list[dict] = []
    cells = [(name, b) for b in batches for name in names]
    seen: dict[str, tuple[int, float]] = {}
    for i, (name, batch) in enumerate(cells):
        cell_end = split_deadline(deadline, len(cells) - i)
        row: dict = {"model": name, "batch": batch, "image": image, "device": device}
        rows.append(row)
        if i > 0 and now() >= deadline:
            row["skipped"] = "out of time"
            continue
        if name in seen:  # project from the smaller batch: warm-up round + one round
            b0, round0 = seen[name]
            projected, left = 2 * round0 * batch / b0, max(0.0, cell_end - now())
            if projected > 2 * left + 5:
                row["skipped"] = f"projected {projected:.0f}s > budget {left:.0f}s"
                continue
        try:
            if name not in setups:
                start = now()
                setups[name] = _forward_setup(backend, name, image, device, compile)
                row["setup_s"] = now() - start
            x = _models.images(batch, image).to(device)
            row.update(interleaved(setups[name], x, deadline=cell_end, max_reps=max_reps, device=device))
        except Exception as exc:  # noqa: BLE001  (a failing model or torch.compile is a row, not a crash)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        else:
            seen.setdefault(name, (batch, row["round_s"]))
    return rows


def compiled_forward_section(
    backend: Any, names: list[str], *, deadline: float, **kwargs: Any
) -> list[dict] | str:
    """(b) on CUDA, eager then ``torch.compile``; a reason string where there is no CUDA."""
    if not torch.cuda.is_available():
        return "skipped: no CUDA device (eager CPU only; torch.compile is measured on CUDA)"
    rows = []
    for mode, compile_ in (("eager", False), ("torch.compile", True)):
        part_end = split_deadline(deadline, 2 if not compile_ else 1)
        for row in forward_section(
            backend, names, deadline=part_end, device="cuda", compile=compile_, **kwargs
        ):
            rows.append({"mode": mode, **row})
    return rows


def calibration_section(
    backend: Any, names: list[str], *, batches: int, batch: int, image: int, deadline: float
) -> list[dict]:
    """(c) compute_encodings over ``batches`` batches, all convs int16 (activation + weight), per-channel.

    The observing pass stops early when it would leave less than 30% of the cell's time for
    the encodings; the full-run time is then estimated (``estimated: true``).
    """
    rows = []
    for i, name in enumerate(names):
        if i > 0 and now() >= deadline:
            rows.append({"model": name, "skipped": "out of time"})
            continue
        cell_end = split_deadline(deadline, len(names) - i)
        rows.append(_calibration_row(backend, name, batches, batch, image, cell_end))
        gc.collect()
    return rows


def _calibration_row(backend: Any, name: str, batches: int, batch: int, image: int, cell_end: float) -> dict:
    row: dict = {"model": name, "image": image, "batch": batch, "batches_wanted": batches}
    model, dummy = _models.build(name, image)
    data = [_models.images(batch, image, seed=s) for s in range(batches)]
    with torch.no_grad():
        model(data[0])
        row["float_forward_per_batch_s"] = timed(lambda: model(data[0]))
    sim, _ = backend.build(model, dummy, config="per_channel", scheme="tf_enhanced")
    row["int16_convs_apply_s"] = backend.int16(sim, nn.Conv2d)["apply_s"]
    observe_end = now() + 0.7 * max(0.0, cell_end - now())
    per_batch: list[float] = []

    def callback(m: nn.Module, _: Any) -> None:
        for b in data:
            if per_batch and now() > observe_end:
                break
            per_batch.append(timed(lambda b=b: m(b)))

    total = timed(lambda: backend.calibrate(sim, callback))
    tail = per_batch[-3:]
    missing = batches - len(per_batch)
    row.update(
        batches_run=len(per_batch),
        measured_s=total,
        observe_per_batch_s=sum(per_batch) / len(per_batch),
        finalize_s=total - sum(per_batch),
        compute_encodings_s=total + missing * sum(tail) / len(tail),
        estimated=missing > 0,
    )
    return row

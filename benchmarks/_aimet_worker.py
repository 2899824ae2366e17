"""Sections (a)-(c) with aimet-torch, run by ``run.py`` in the AIMET venv's python.

Usage (from the repo root): ``<aimet python> -m benchmarks._aimet_worker '<settings json>' out.json``.
The result file is rewritten after every section, so a run killed at its time limit still
leaves what it measured.
"""

from __future__ import annotations

import json
import signal
import sys
import traceback
from pathlib import Path

import torch

from ._backends import AimetBackend
from ._sections import build_section, calibration_section, forward_section
from ._timing import Budget, Interrupted, machine_info, raise_interrupted, speed_probe

SHARES = {"build": 0.3, "forward": 0.4, "calibration": 0.3}


def main(settings: dict, out: Path) -> None:
    torch.set_num_threads(settings["threads"])
    torch.set_flush_denormal(True)  # as in run.py: see _models.FLUSH_DENORMAL_NOTE
    result: dict = {"machine": machine_info(), "settings": settings, "status": "running"}
    result["speed_probe_ms"] = {"start": speed_probe()}

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    try:
        backend = AimetBackend()
    except Exception as exc:  # noqa: BLE001
        result.update(status="unavailable", error=f"{type(exc).__name__}: {exc}")
        save()
        return
    result["version"] = backend.version
    budget = Budget(settings["budget_s"], {k: v for k, v in SHARES.items() if k in settings["sections"]})
    runs = {
        "build": lambda end: build_section(
            backend, settings["build_models"], reps=settings["build_reps"], deadline=end
        ),
        "forward": lambda end: forward_section(
            backend,
            settings["forward_models"],
            batches=settings["forward_batches"],
            image=settings["forward_image"],
            max_reps=settings["forward_max_reps"],
            deadline=end,
        ),
        "calibration": lambda end: calibration_section(
            backend,
            settings["calib_models"],
            batches=settings["calib_batches"],
            batch=settings["calib_batch"],
            image=settings["calib_image"],
            deadline=end,
        ),
    }
    signal.signal(signal.SIGTERM, raise_interrupted)
    for name in SHARES:
        if name not in settings["sections"]:
            continue
        try:
            result[name] = runs[name](budget.section(name))
        except Interrupted:
            result[name] = "interrupted: the worker reached its time limit in this section"
            result["speed_probe_ms"]["end"] = speed_probe()
            save()
            return
        except Exception as exc:  # noqa: BLE001
            result[name] = f"error: {type(exc).__name__}: {exc}"
            traceback.print_exc()
        save()
    result["speed_probe_ms"]["end"] = speed_probe()
    result["status"] = "done"
    save()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), Path(sys.argv[2]))

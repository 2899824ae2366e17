"""docs/models.md from the zoo sweep's JSON (benchmarks/zoo.py)."""

from __future__ import annotations

import math

HEADER = """# Supported models

Written by `python benchmarks/zoo.py` (do not edit by hand; rerun before each release).
Each model runs in its own process with random weights (BatchNorm statistics re-estimated on
random data), tiny configs for transformers, small inputs. Stages: **build** (sim at w8a8),
**mixed** (int16 activations on one layer type through `MixedPrecisionConfigurator`),
**calibrate** (`compute_encodings` on the export input and on the other shapes' input, as a user
calibrates with data covering the shapes they run: layers that run only at some shapes get
encodings; SQNR of the sim's outputs vs the float model, worst output), **other shapes** (the
sim on other batch/sequence/image sizes, SQNR vs float), **export** (quantizers covered by the
exported files / quantizers in the sim; an export has the static shapes of its input, so a sim
with call sites per sequence position, as Mamba's reference scan has, exports them only up to
the input's length: Mamba's other shapes are shorter than its export input), **ORT** (onnxruntime on the QDQ model vs the sim,
SQNR of the worst output; 40 dB or more is agreement; in parentheses the sim against itself on
the input perturbed by 1e-6 or with PyTorch's other convolution kernels, whichever is worse: the
best agreement the model allows, see docs/export.md), and the
sim's forward time over the float model's, measured side by side. A rerun of some models
(`--models a,b`) replaces their rows, so rows may come from runs minutes apart; the JSON under
benchmarks/results/zoo.json has every number.

"""


def _db(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "exact"
    return f"{value:.1f} dB"


def _cell(stages: dict, stage: str) -> str:
    s = stages.get(stage)
    if s is None:
        return "-"
    if s["status"] != "ok":
        return "**fail**"
    if stage in ("calibrate", "other_shapes"):
        return _db(s.get("sqnr_vs_float"))
    if stage == "export":
        return f"{s['covered']}/{s['quantizers']}" + (" (ts)" if s.get("exporter") == "torchscript" else "")
    if stage == "ort":
        floor = s.get("sim_perturbed_sqnr")
        return _db(s.get("sqnr_vs_sim")) + ("" if floor is None else f" ({_db(floor)})")
    if stage == "time":
        return f"{s['ratio']:.1f}x"
    return "ok"


def render(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        HEADER,
        f"Measured {payload['date']} on {m['cpu']} ({m['cores']} cores, shared; {m['threads']} torch "
        f"threads), torch {m['torch']}.\n",
        "| model | build | mixed | calibrate | other shapes | export | ORT vs sim | sim/float time | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for row in payload["models"]:
        st = row["stages"]
        cells = [
            _cell(st, s) for s in ("build", "mixed", "calibrate", "other_shapes", "export", "ort", "time")
        ]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {row.get('seconds', 0):.0f} |")
        for stage, s in st.items():
            if s["status"] != "ok":
                notes.append(f"- **{row['model']}**, {stage}: {' '.join(s['error'].split())}")
        for message in row.get("warnings", [])[:3]:
            notes.append(f"- {row['model']} (warning): {' '.join(message.split())}")
    if notes:
        lines += ["", "## Failures and warnings", "", *notes]
    return "\n".join(lines) + "\n"

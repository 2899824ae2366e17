"""The worked example of docs/sensitivity.md: analyze -> suggest -> edit the YAML -> apply -> report.

    PYTHONPATH=src python docs/examples/sensitivity_resnet18.py out/

resnet18 with random weights (no download) and 8 random images at 64x64: the numbers show the
flow, not what a trained network would give.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

import mixprec

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()
images = [torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))]

# 1. analyze: every Conv2d alone at int4 weights, the rest of the sim as it is (int8)
sim = mixprec.QuantizationSimModel(model, dummy_input=images[0][:1])
rep = mixprec.analyze_sensitivity(sim, images, targets=nn.Conv2d, param={"weight": "int4"})
print(rep.table(8))
rep.to_html(out / "sensitivity.html", title="resnet18: Conv2d weights at int4")
rep.to_json(out / "sensitivity.json")

# 2. suggest: the fewest Conv2d layers kept at int8 for an output SQNR of at least 20 dB
profile = rep.suggest(min_sqnr_db=20.0)
profile.save(out / "profile.yaml")
print(profile.source)

# 3. edit the YAML as a person would: keep the stem conv at int8 too (it reads the raw image)
text = (out / "profile.yaml").read_text()
lines = text.splitlines()
stem = next(i for i, line in enumerate(lines) if line.strip() == "target: conv1")
lines[stem + 2] = lines[stem + 2].replace("int4", "int8")
(out / "profile.yaml").write_text("\n".join(lines) + "\n")

# 4. apply the edited profile to a fresh sim, calibrate on the same images
sim = mixprec.QuantizationSimModel(model, dummy_input=images[0][:1])
mp = mixprec.MixedPrecisionConfigurator(sim)
mp.apply_profile(mixprec.load_profile(out / "profile.yaml"))
report = mp.apply(log_file=out / "mmp_log.txt", strict=False)
sim.compute_encodings(lambda m, _: [m(x) for x in images], None)

# 5. report: the mixed-precision report and the SQNR reached
report.to_html(out / "report.html")
with torch.no_grad():
    ref, got = model(images[0]), sim.model(images[0])
sqnr = 10 * math.log10(float(ref.double().square().sum() / (got - ref).double().square().sum()))
int4 = sum(
    1 for row in sim.precision_table() if row["type"] == "Conv2d" and row["params"].get("weight") == "int4"
)
print(f"applied: {int4} of 20 Conv2d at int4 weights; output SQNR {sqnr:.2f} dB")

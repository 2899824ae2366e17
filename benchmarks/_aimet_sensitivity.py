"""The reference's per-layer analysis, run by ``bench_sensitivity.py`` in the AIMET venv's python.

Usage (from the repo root): ``<aimet python> -m benchmarks._aimet_sensitivity '<settings json>' out.json``.

aimet-torch 2.42 ``QuantAnalyzer.perform_per_layer_analysis_by_enabling_quant_wrappers``: every
quantizer off, then for each quant wrapper in turn its quantizers on and one evaluation. The sim
is the reference's usual flow (prepare_model, fold_all_batch_norms, 4-bit weights, 8-bit
activations, tf_enhanced, encodings from the same images) and the evaluation callback is the
same metric mixprec's sweep uses: output SQNR against the float model on the same images. The
result file is rewritten after every evaluation, so a run stopped at its time limit still says
how many evaluations it did and how long each took.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from ._models import build, images
from ._timing import Interrupted, machine_info, raise_interrupted, speed_probe


def main(settings: dict, out: Path) -> None:
    torch.set_num_threads(settings["threads"])
    torch.set_flush_denormal(True)  # as the mixprec side: see _models.FLUSH_DENORMAL_NOTE
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    result: dict = {"machine": machine_info(), "settings": settings, "status": "running"}
    result["speed_probe_ms"] = {"start": speed_probe()}

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        import aimet_torch
        from aimet_torch.batch_norm_fold import fold_all_batch_norms
        from aimet_torch.common.defs import QuantScheme
        from aimet_torch.model_preparer import prepare_model
        from aimet_torch.quant_analyzer import QuantAnalyzer
        from aimet_torch.v2.quantsim import QuantizationSimModel
    except Exception as exc:  # noqa: BLE001
        result.update(status="unavailable", error=f"{type(exc).__name__}: {exc}")
        save()
        return
    result["version"] = getattr(aimet_torch, "__version__", "?")
    model, dummy = build(settings["model"], settings["image"])
    data = images(settings["images"], settings["image"])
    with torch.no_grad():
        reference = model(data)
    start = time.perf_counter()
    prepared = prepare_model(model)
    fold_all_batch_norms(prepared, input_shapes=tuple(dummy.shape), dummy_input=dummy)
    sim = QuantizationSimModel(
        prepared,
        dummy_input=dummy,
        quant_scheme=QuantScheme.post_training_tf_enhanced,
        default_output_bw=8,
        default_param_bw=settings["param_bw"],
    )
    with torch.no_grad():
        sim.compute_encodings(lambda m, _: m(data), None)
    result["setup_s"] = time.perf_counter() - start
    from aimet_torch.nn.base import BaseQuantizationMixin

    result["wrappers"] = sum(1 for m in sim.model.modules() if isinstance(m, BaseQuantizationMixin))
    evals: list[float] = []
    result["evaluations"] = evals

    def evaluate(m: torch.nn.Module, _: object = None) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            out = m(data)
        noise = (out - reference).double().square().sum()
        value = 10 * math.log10(float(reference.double().square().sum() / noise)) if noise > 0 else math.inf
        evals.append(time.perf_counter() - t)
        save()
        return value

    analyzer = QuantAnalyzer(prepared, dummy, lambda m, _=None: m(data), evaluate)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scores = analyzer.perform_per_layer_analysis_by_enabling_quant_wrappers(sim, tmp)
        result["per_layer_wall_s"] = time.perf_counter() - wall
        result["per_layer_cpu_s"] = time.process_time() - cpu
        result["layers"] = len(scores)
        result["ranking"] = sorted(scores, key=scores.get)[:10]
        result["status"] = "done"
    except Interrupted:
        result["per_layer_wall_s"] = time.perf_counter() - wall
        result["per_layer_cpu_s"] = time.process_time() - cpu
        result["status"] = "interrupted"
    except Exception as exc:  # noqa: BLE001
        result.update(status="error", error=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    result["speed_probe_ms"]["end"] = speed_probe()
    save()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), Path(sys.argv[2]))

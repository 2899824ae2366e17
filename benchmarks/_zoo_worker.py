"""One model of the zoo sweep, in its own process: the stages of benchmarks/zoo.py."""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree


def _call(model: nn.Module, x: Any) -> Any:
    with torch.no_grad():
        if isinstance(x, dict):
            return model(**x)
        if isinstance(x, tuple):
            return model(*x)
        return model(x)


def _tensors(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _sqnr(reference: torch.Tensor, value: torch.Tensor) -> float | None:
    if reference.numel() == 0 or not reference.is_floating_point():
        return None
    reference, value = reference.detach().double(), value.detach().double().reshape(reference.shape)
    signal, noise = reference.pow(2).mean(), (reference - value).pow(2).mean()
    if noise == 0:
        return math.inf
    return round(float(10 * torch.log10(signal / noise)), 1) if signal > 0 else None


def _min_sqnr(references: list, values: list) -> float | None:
    pairs = [_sqnr(r, v) for r, v in zip(references, values, strict=False) if r.shape == tuple(v.shape)]
    pairs = [p for p in pairs if p is not None]
    return min(pairs) if pairs else None


class _Logs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:300])


def _linear_like(model: nn.Module) -> type:
    types = {type(m) for m in model.modules()}
    for candidate in (nn.Linear, nn.Conv2d, nn.Conv3d):
        if candidate in types:
            return candidate
    return nn.Linear


def _ort_inputs(session: Any, dummy: Any) -> dict:
    names = [i.name for i in session.get_inputs()]
    if isinstance(dummy, dict) and all(n in dummy for n in names):
        return {n: dummy[n].numpy() for n in names}
    leaves = [t for t in pytree.tree_leaves(dummy) if isinstance(t, torch.Tensor)]
    return {n: t.numpy() for n, t in zip(names, leaves, strict=False)}


def run_one(name: str) -> dict:
    """Every stage for ``name``; a failed stage records its error and ends the run."""
    torch.set_flush_denormal(True)
    import mixprec
    from benchmarks._zoo_models import MODELS

    logs = _Logs()
    logging.getLogger("mixprec").addHandler(logs)
    caught = warnings.catch_warnings(record=True)
    recorded = caught.__enter__()
    warnings.simplefilter("always")
    row: dict[str, Any] = {"model": name, "stages": {}}
    stages = row["stages"]
    state: dict[str, Any] = {}

    def build() -> dict:
        model, dummy, other = MODELS[name]()
        state.update(model=model, dummy=dummy, other=other)
        state["reference"] = _tensors(_call(model, dummy))
        sim = mixprec.QuantizationSimModel(model, dummy, default_output_bw=8, default_param_bw=8)
        state["sim"] = sim
        return {"layers": len(sim.graph.layers), "quantizers": sum(1 for _ in sim.quantizers())}

    def mixed() -> dict:
        target = _linear_like(state["model"])
        mp = mixprec.MixedPrecisionConfigurator(state["sim"])
        mp.set_precision(target, activation="int16", param={"weight": "int8"})
        mp.apply()
        return {"target": target.__name__}

    def calibrate() -> dict:
        sim, dummy, other = state["sim"], state["dummy"], state["other"]
        sim.compute_encodings(lambda m, _: (_call(m, dummy), _call(m, other)), None)
        state["sim_out"] = _tensors(_call(sim.model, dummy))
        return {"sqnr_vs_float": _min_sqnr(state["reference"], state["sim_out"])}

    def other_shapes() -> dict:
        ref = _tensors(_call(state["model"], state["other"]))
        return {"sqnr_vs_float": _min_sqnr(ref, _tensors(_call(state["sim"].model, state["other"])))}

    def export() -> dict:
        folder = tempfile.mkdtemp(prefix=f"zoo_{name}_")
        result = state["sim"].export(folder, "model", dummy_input=state["dummy"])
        state["qdq"] = result.qdq_onnx_path
        return {
            "covered": result.covered,
            "quantizers": result.quantizers,
            "exporter": result.exporter,
            "notes": list(result.notes),
        }

    def ort() -> dict:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = onnxruntime.InferenceSession(str(state["qdq"]), options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, _ort_inputs(session, state["dummy"]))
        values = [torch.from_numpy(o) for o in outputs]
        # The noise floor of that comparison: the sim against itself on the input perturbed by
        # 1e-6 (relative), and with PyTorch's other convolution kernels (no oneDNN). ORT's float
        # kernels sum in another order, which moves values near a rounding boundary by one step;
        # a net that amplifies such flips cannot agree better.
        gen = torch.Generator().manual_seed(0)
        perturbed = pytree.tree_map(
            lambda t: (
                t * (1 + 1e-6 * torch.randn(t.shape, generator=gen))
                if isinstance(t, torch.Tensor) and t.is_floating_point()
                else t
            ),
            state["dummy"],
        )
        floors = [_min_sqnr(state["sim_out"], _tensors(_call(state["sim"].model, perturbed)))]
        with torch.backends.mkldnn.flags(enabled=False):  # PyTorch's other convolution kernels
            floors.append(_min_sqnr(state["sim_out"], _tensors(_call(state["sim"].model, state["dummy"]))))
        floors = [f for f in floors if f is not None]
        floor = min(floors) if floors else None
        return {"sqnr_vs_sim": _min_sqnr(state["sim_out"], values), "sim_perturbed_sqnr": floor}

    def timing() -> dict:
        model, sim, dummy = state["model"], state["sim"], state["dummy"]
        float_s, sim_s = [], []
        for _ in range(3):  # alternate, so both see the same machine load
            t = time.perf_counter()
            _call(model, dummy)
            float_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            _call(sim.model, dummy)
            sim_s.append(time.perf_counter() - t)
        f, s = statistics.median(float_s), statistics.median(sim_s)
        return {"float_ms": round(f * 1e3, 2), "sim_ms": round(s * 1e3, 2), "ratio": round(s / f, 2)}

    steps = (build, mixed, calibrate, other_shapes, export, ort, timing)
    names = ("build", "mixed", "calibrate", "other_shapes", "export", "ort", "time")
    for stage, step in zip(names, steps, strict=True):
        started = time.perf_counter()
        try:
            info = step()
            stages[stage] = {"status": "ok", **info}
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            stages[stage] = {
                "status": "fail",
                "error": _shorten(f"{type(exc).__name__}: {exc}"),
                "at": f"{Path(where.filename).name}:{where.lineno}",
            }
            break
        finally:
            if stage in stages:
                stages[stage]["seconds"] = round(time.perf_counter() - started, 2)
    caught.__exit__(None, None, None)
    mixprec_warnings = [str(w.message)[:300] for w in recorded if _from_mixprec(w)]
    row["warnings"] = list(dict.fromkeys(logs.messages + mixprec_warnings))[:20]
    return row


def _shorten(text: str, keep: int = 300) -> str:
    """The start and the end of a long message (errors end with their cause)."""
    text = " ".join(text.split())
    return text if len(text) <= 2 * keep else f"{text[:keep]} ... {text[-keep:]}"


def _from_mixprec(w: warnings.WarningMessage) -> bool:
    text = str(w.message)
    return issubclass(w.category, UserWarning) and any(k in text for k in ("quantiz", "exporter", "mixprec"))

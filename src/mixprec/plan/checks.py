"""Checks of a planned state: backend kernels (docs/rules.md, rule 5) and precision changes.

Both read a :class:`~mixprec.sim.state.PrecisionView` (the plan laid over the sim), so they run
before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixprec.config.rules import SimConfig
from mixprec.core.precision import FP32, Precision
from mixprec.sim.effective import compute_precision, effective_input_precisions, value_precision
from mixprec.sim.placement import Place, PlaceKind
from mixprec.sim.state import PrecisionView


@dataclass(frozen=True)
class KernelFinding:
    """A layer whose final (activation, weight) precision pair is not among its kernels."""

    layer: int
    op_type: str
    activation: Precision | None
    param: Precision | None
    supported: tuple[str, ...]


@dataclass(frozen=True)
class PrecisionChange:
    """A layer whose inputs differ among themselves or from its output: a convert or mixed kernel."""

    layer: int
    inputs: tuple[Precision | None, ...]  # per input slot; None for a non-float or constant input
    outputs: tuple[Precision | None, ...]  # per output slot, what the tensor carries; None if not float


def _weight_precision(state: PrecisionView, layer_index: int) -> tuple[bool, Precision | None]:
    layer = state.graph.layers[layer_index]
    for name, ref in layer.params.items():
        if ref.attr == "weight" or (ref.ndim >= 2 and name.endswith("weight")):
            return True, state.precision_at(Place(PlaceKind.PARAM, layer_index, name))
    return False, None


def check_kernels(state: PrecisionView, config: SimConfig) -> list[KernelFinding]:
    """Rule 5: each layer's final (activation, weight) precision must be in its kernel list."""
    findings = []
    memo: dict[int, Precision | None] = {}
    for layer in state.graph.layers:
        if layer.data_movement:
            continue
        kernels = config.kernels_for(layer.op_type)
        if not kernels:
            continue
        activation = compute_precision(state, layer, memo)
        has_weight, weight = _weight_precision(state, layer.index)
        if activation is None and weight is None:
            continue
        act = activation or FP32
        ok = any(
            (activation is None or k.activation == act)
            and (not has_weight or k.param is None or k.param == (weight or FP32))
            for k in kernels
        )
        if not ok:
            supported = tuple(f"{k.activation.name}/{k.param.name if k.param else '*'}" for k in kernels)
            findings.append(KernelFinding(layer.index, layer.op_type, activation, weight, supported))
    return findings


def find_precision_changes(state: PrecisionView) -> list[PrecisionChange]:
    """Every layer whose inputs differ among themselves or from what it emits (docs/rules.md, "The report").

    An input or output without a quantizer reads as fp32; constants and non-float slots are left out.
    """
    graph = state.graph
    memo: dict[int, Precision | None] = {}
    result = []
    for layer in graph.layers:
        if layer.data_movement:
            continue
        effective = effective_input_precisions(state, layer, memo)
        inputs = tuple(
            (effective[s] or FP32) if f and t is not None else None
            for s, (f, t) in enumerate(zip(layer.input_is_float, layer.inputs, strict=True))
        )
        if all(p is None for p in inputs):
            continue
        outputs = tuple(
            (value_precision(state, t, memo) or FP32) if f else None
            for f, t in zip(layer.output_is_float, layer.outputs, strict=True)
        )
        if len({p for p in inputs + outputs if p is not None}) > 1:
            result.append(PrecisionChange(layer.index, inputs, outputs))
    return result

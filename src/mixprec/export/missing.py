"""Why a quantizer of the sim has no marker in the exported graph, as an error the user can act on.

While an exporter traces the model, the sim's runtime records which quantizers ran
(:class:`mixprec.export.trace.MarkerTracing`). A quantizer missing from the graph either did not
run during the trace (its layer sits on a path the trace did not take), or ran and the exporter
left its value out (torch.export drops values the outputs do not depend on; ONNX passes fold
constants). The torch.export-based exporter's program tells which of the two steps removed it.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence

from mixprec.capture.graph import LayerKind
from mixprec.errors import ExportCoverageError
from mixprec.export.trace import TracedModel
from mixprec.quant.quantizers import QuantizerBase
from mixprec.sim.placement import Place
from mixprec.sim.state import PrecisionState

SHOWN = 12  # layer groups named per cause; the error's attributes list all


FLOAT = (
    "MixedPrecisionConfigurator.set_precision(layer, activation='fp32'), with "
    "param={'weight': 'fp32'} for layers with weights"
)


class MissingCause(enum.Enum):
    """Why a quantizer left no marker in the exported graph."""

    CALLS_DIFFER = (
        "did not line up with the exporter's trace: in their modules the trace made calls the sim's "
        "forwards never made ({calls}), as libraries take other code paths when traced (transformers "
        "builds attention masks with other ops; torchvision's detection code takes its tracing "
        "branches). mixprec tells calls of a function apart by their order in the module, so the "
        "trace's calls got other sites, and those first seen under the trace ran unquantized. The "
        f"sim is unaffected; to export, set these layers to float ({FLOAT}), and report the model"
    )
    NOT_TRACED = (
        "did not run while the exporter traced the model: the trace took another path than the "
        "forwards that created and calibrated them (data-dependent control flow: a loop count or a "
        "sequence length, a branch on tensor values, a number of detections; or library code that "
        "branches when traced). Export with a dummy_input that takes this path (an exported graph "
        "has the static shapes of its input), or set these layers to float if the exported model "
        f"need not quantize them ({FLOAT})"
    )
    REMOVED_BY_TORCH_EXPORT = (
        "ran during the trace, but torch.export left their values out of the program: nothing the "
        "model returns is computed from them (they are used in Python only, e.g. by .item(), "
        ".tolist() or as a size, or were folded into constants), so the graph has no tensor to "
        f"quantize. Set these layers to float to export ({FLOAT})"
    )
    REMOVED_IN_ONNX = (
        "were in the torch.export program, but its translation to ONNX removed them (constant "
        "folding or dead-code elimination of the ONNX passes, or an op decomposed around them). "
        f"Set these layers to float to export ({FLOAT}), and report the model"
    )
    REMOVED_BY_TORCHSCRIPT = (
        "ran during the TorchScript trace, but the traced graph does not use their values (they "
        "are used in Python only, e.g. by .item() or as a size, or were folded into constants). "
        f"Set these layers to float to export ({FLOAT})"
    )


def cause_of(sim: PrecisionState, place: Place, index: int, traced: TracedModel | None) -> MissingCause:
    """Why quantizer ``index`` (at ``place``) is missing from ``traced``'s graph."""
    if traced is not None and place.layer is not None and _call_of(sim, place) in traced.unseen_calls:
        return MissingCause.CALLS_DIFFER
    if traced is None or index not in traced.reached:
        return MissingCause.NOT_TRACED
    if traced.exporter == "torchscript":
        return MissingCause.REMOVED_BY_TORCHSCRIPT
    if traced.in_program is not None and index in traced.in_program:
        return MissingCause.REMOVED_IN_ONNX
    return MissingCause.REMOVED_BY_TORCH_EXPORT


def missing_error(
    sim: PrecisionState,
    entries: Sequence[tuple[Place, QuantizerBase]],
    lost: list[int],
    traced: TracedModel | None,
) -> ExportCoverageError:
    """The error for quantizers ``lost`` (indices into ``entries``), grouped by cause and layer."""
    by_cause: dict[MissingCause, list[str]] = {}
    counts: Counter[MissingCause] = Counter()
    calls: dict[tuple[str, str], int] = {}
    for i in lost:
        place = entries[i][0]
        layer = "<model input>" if place.layer is None else sim.graph.layers[place.layer].name
        cause = cause_of(sim, place, i, traced)
        counts[cause] += 1
        names = by_cause.setdefault(cause, [])
        if layer not in names:
            names.append(layer)
        if cause is MissingCause.CALLS_DIFFER and traced is not None:
            call = _call_of(sim, place)
            calls[call] = traced.unseen_calls[call]
    exporter = "torch.export-based" if traced is None or traced.exporter == "dynamo" else "TorchScript"
    parts = [
        f"export would drop {len(lost)} of {len(entries)} quantizers (the {exporter} exporter's graph lacks them):"
    ]
    extra = ", ".join(
        f"{n} more calls of {fn or 'the module'} in {module or 'the model'!r}"
        for (module, fn), n in calls.items()
    )
    for cause, layers in by_cause.items():
        why = cause.value.replace("{calls}", extra)
        parts.append(f"- {counts[cause]} quantizers of {len(layers)} layers ({compact(layers)}) {why}.")
    parts.append("Nothing was written.")
    return ExportCoverageError(
        "\n".join(parts),
        not_traced=tuple(by_cause.get(MissingCause.NOT_TRACED, ())),
        removed=tuple(n for c, names in by_cause.items() if c.name.startswith("REMOVED") for n in names),
        misaligned=tuple(by_cause.get(MissingCause.CALLS_DIFFER, ())),
    )


def compact(layers: list[str]) -> str:
    """Layer names with the calls of one module merged: ``a.conv#1``, ``a.conv#2`` -> ``a.conv#1,#2``."""
    calls: dict[str, list[str]] = {}
    for name in layers:
        base, sep, call = name.partition("#")
        calls.setdefault(base, []).append(f"#{call}" if sep else "")
    groups = [base + ",".join(c for c in suffixes) for base, suffixes in calls.items()]
    shown = ", ".join(repr(g) for g in groups[:SHOWN])
    return shown + (f" and {len(groups) - SHOWN} more" if len(groups) > SHOWN else "")


def _call_of(sim: PrecisionState, place: Place) -> tuple[str, str]:
    """The (module, function) key under which the runtime reports a layer's unseen calls."""
    layer = sim.graph.layers[place.layer]  # type: ignore[index]
    if layer.kind is LayerKind.MODULE:  # reported as the module's own call
        return layer.module_name, ""
    return layer.module_name, layer.type_name

"""Export ``sim.model`` to ONNX with a marker node at every quantizer.

While exporting, the sim's runtime holds a :class:`MarkerTracing` (its per-sim tracing state; nothing
global is patched): wherever the runtime would apply a quantizer it calls the custom op
``mixprec::export_marker(x, index)`` instead, an identity that the ONNX exporters write as
``ai.mixprec.export::Marker`` with the quantizer's index as an attribute.
The sim's own forward does the rest: it calls every quantizer exactly where the simulation
quantizes, including model inputs and functional layers, so markers sit where the sim's
quantizers act. Later passes turn markers into nothing (float model) or Q/DQ pairs.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
from torch import nn

from mixprec.quant.quantizers import QuantizerBase

MARKER_DOMAIN = "ai.mixprec.export"
MARKER_OP = "Marker"
TORCHSCRIPT_MAX_OPSET = 17  # well supported by the legacy exporter; the result is converted up


@torch.library.custom_op("mixprec::export_marker", mutates_args=())
def export_marker(x: torch.Tensor, index: int) -> torch.Tensor:
    """Identity that the ONNX exporters write as a ``Marker`` node carrying ``index``."""
    return x.clone()


@export_marker.register_fake
def _export_marker_fake(x: torch.Tensor, index: int) -> torch.Tensor:
    return torch.empty_like(x)


def _register_onnx_schema() -> None:
    # onnxscript builds nodes from registered schemas, so the marker op needs one
    if onnx.defs.has(MARKER_OP, MARKER_DOMAIN):
        return
    schema = onnx.defs.OpSchema(
        MARKER_OP,
        MARKER_DOMAIN,
        1,
        inputs=[onnx.defs.OpSchema.FormalParameter("x", "T")],
        outputs=[onnx.defs.OpSchema.FormalParameter("y", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "float types")
        ],
        attributes=[
            onnx.defs.OpSchema.Attribute("index", onnx.defs.OpSchema.AttrType.INT, "quantizer index")
        ],
    )
    onnx.defs.register_schema(schema)


def _marker_translation() -> Callable[..., Any]:
    import onnxscript

    opset = onnxscript.values.Opset(MARKER_DOMAIN, 1)

    def marker(x: Any, index: int) -> Any:
        return opset.Marker(x, index=index)

    return marker


def _torchscript_symbolic() -> None:
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "i")
    def marker(g: Any, x: Any, index: int) -> Any:
        return g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, index_i=index).setType(x.type())

    torch.onnx.register_custom_op_symbolic("mixprec::export_marker", marker, 1)


def marked_forward(index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward a quantizer gets during export: non-float tensors pass, as in the sim."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return export_marker(x, index) if x.is_floating_point() else x

    return forward


# Set on each quantizer while exporting. An attribute, not a table keyed by object identity: some
# of torch.onnx's capture strategies trace a deep copy of the model (seen on Gemma, T5 and BART),
# and a copied quantizer keeps its attributes but not its identity.
MARKER_INDEX = "_mixprec_marker_index"


class MarkerTracing:
    """The runtime's tracing state during export: quantizer ``quantizers[i]`` becomes ``Marker(i)``."""

    def __init__(self, quantizers: Sequence[QuantizerBase]) -> None:
        self.forwards = {i: marked_forward(i) for i in range(len(quantizers))}
        # indices whose quantizer ran while an exporter traced: a quantizer missing from the graph
        # that is not here sat on a path the trace did not take (export/coverage.py explains it)
        self.reached: set[int] = set()
        # (module, function) -> calls first seen under the trace ("" for calls of the module
        # itself): the trace took other code paths there, so calls may not line up with sites
        self.unseen_calls: Counter[tuple[str, str]] = Counter()

    def mark(self, q: nn.Module, x: torch.Tensor) -> torch.Tensor:
        index = q.__dict__.get(MARKER_INDEX)
        if index is None:
            return q(x)
        if x.is_floating_point():  # as in the sim, other tensors pass unmarked
            self.reached.add(index)
        return self.forwards[index](x)

    def unseen(self, module: str, call: str) -> None:
        self.unseen_calls[(module, call)] += 1

    def reset(self) -> None:
        """Forget what an exporter that failed ran: it says nothing about the next one."""
        self.reached.clear()
        self.unseen_calls.clear()


@contextlib.contextmanager
def marking(quantizers: Sequence[QuantizerBase], runtime: Any) -> Iterator[MarkerTracing]:
    """Make ``quantizers[i]`` emit ``Marker(index=i)`` instead of quantizing, until exit.

    ``runtime`` is the sim's ``SimRuntime``: it calls every quantizer through its tracing state, so
    parameters are marked too (no cached fake-quantized weights), and call sites first seen under
    the trace (libraries take other paths when they detect tracing) pass through: export checks on
    its own that every quantizer reached the graph.
    """
    previous = runtime.tracing
    tracing = runtime.tracing = MarkerTracing(quantizers)
    for i, q in enumerate(quantizers):
        q.__dict__[MARKER_INDEX] = i
    try:
        yield tracing
    finally:
        runtime.tracing = previous
        for q in quantizers:
            q.__dict__.pop(MARKER_INDEX, None)


@dataclass
class TracedModel:
    """An ONNX model with markers, and how it was made.

    ``reached``: indices of the quantizers that ran while the exporter that succeeded traced;
    ``in_program``: for the torch.export-based exporter, the indices whose marker is in the
    exported program (before ONNX translation and its optimizations), None for TorchScript;
    ``unseen_calls``: calls the sim's forwards never made, per (module, function) (see
    :class:`MarkerTracing`).
    """

    model: onnx.ModelProto
    exporter: str  # "dynamo" or "torchscript"
    notes: list[str]
    reached: frozenset[int] = frozenset()
    in_program: frozenset[int] | None = None
    unseen_calls: dict[tuple[str, str], int] = field(default_factory=dict)


def export_with_markers(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    quantizers: Sequence[QuantizerBase],
    opset: int,
    runtime: Any = None,
) -> TracedModel:
    """Export ``model`` (the sim's) with markers: the torch.export-based exporter first, then the
    legacy TorchScript exporter if that fails (with a note saying why)."""
    _register_onnx_schema()
    with marking(quantizers, runtime) as tracing, torch.no_grad():
        try:
            proto, in_program = _export_dynamo(model, args, kwargs, opset)
            return TracedModel(
                proto, "dynamo", [], frozenset(tracing.reached), in_program, dict(tracing.unseen_calls)
            )
        except Exception as exc:  # any exporter failure: try the other exporter before giving up
            reason = _reason(exc)
        tracing.reset()
        try:
            traced = _export_torchscript(model, args, kwargs, min(opset, TORCHSCRIPT_MAX_OPSET))
        except Exception as exc:
            raise RuntimeError(
                f"both ONNX exporters failed; torch.export-based: {reason}; TorchScript: {type(exc).__name__}: {exc}"
            ) from exc
    note = f"the torch.export-based ONNX exporter failed ({reason}); used the legacy TorchScript exporter"
    return TracedModel(
        traced, "torchscript", [note], frozenset(tracing.reached), None, dict(tracing.unseen_calls)
    )


def _reason(exc: Exception) -> str:
    """One line on why the exporter failed: the root cause from its report, without colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    causes = [line for line in text.splitlines() if line.startswith("<class '")]
    if causes:  # the exporter's summary lists "<class 'X'>: message" lines, root cause first
        return re.sub(r"^<class '(?:[\w.]*\.)?(\w+)'>", r"\1", causes[0])
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}"


def _export_dynamo(
    model: nn.Module, args: tuple, kwargs: dict, opset: int
) -> tuple[onnx.ModelProto, frozenset[int] | None]:
    table = {torch.ops.mixprec.export_marker.default: _marker_translation()}
    # the exporter prints progress lines on stdout; an export call of a library should not
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            args,
            kwargs=kwargs or None,
            dynamo=True,
            opset_version=opset,
            custom_translation_table=table,
            verbose=False,
        )
    return program.model_proto, _program_markers(getattr(program, "exported_program", None))


def _program_markers(program: Any) -> frozenset[int] | None:
    """Marker indices in a torch.export program, including its subgraphs; None if unknown."""
    if program is None:
        return None
    marker = torch.ops.mixprec.export_marker.default
    found = set()
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in [] if graph is None else graph.nodes:
            if node.op == "call_function" and node.target is marker:
                found.add(int(node.args[1]))
    return frozenset(found)


class _KeywordCall(nn.Module):
    """Calls ``model(*args, **kwargs)`` from positional tensors only: the TorchScript exporter
    does not pass keyword inputs on (transformers then sees no ``input_ids``)."""

    def __init__(self, model: nn.Module, n_args: int, names: list[str], fixed: dict) -> None:
        super().__init__()
        self.model, self.n_args, self.names, self.fixed = model, n_args, names, fixed

    def forward(self, *flat: torch.Tensor) -> Any:
        keywords = dict(zip(self.names, flat[self.n_args :], strict=True))
        return self.model(*flat[: self.n_args], **keywords, **self.fixed)


def _export_torchscript(model: nn.Module, args: tuple, kwargs: dict, opset: int) -> onnx.ModelProto:
    _torchscript_symbolic()
    buffer = io.BytesIO()
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    wrapped = _KeywordCall(model, len(args), names, fixed) if kwargs else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (*args, *(kwargs[k] for k in names)),
            buffer,
            dynamo=False,
            opset_version=opset,
            custom_opsets={MARKER_DOMAIN: 1},
        )
    return onnx.load_from_string(buffer.getvalue())

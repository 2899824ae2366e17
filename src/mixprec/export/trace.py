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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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

    def mark(self, q: nn.Module, x: torch.Tensor) -> torch.Tensor:
        index = q.__dict__.get(MARKER_INDEX)
        return q(x) if index is None else self.forwards[index](x)


@contextlib.contextmanager
def marking(quantizers: Sequence[QuantizerBase], runtime: Any) -> Iterator[None]:
    """Make ``quantizers[i]`` emit ``Marker(index=i)`` instead of quantizing, until exit.

    ``runtime`` is the sim's ``SimRuntime``: it calls every quantizer through its tracing state, so
    parameters are marked too (no cached fake-quantized weights), and call sites first seen under
    the trace (libraries take other paths when they detect tracing) pass through: export checks on
    its own that every quantizer reached the graph.
    """
    previous = runtime.tracing
    runtime.tracing = MarkerTracing(quantizers)
    for i, q in enumerate(quantizers):
        q.__dict__[MARKER_INDEX] = i
    try:
        yield
    finally:
        runtime.tracing = previous
        for q in quantizers:
            q.__dict__.pop(MARKER_INDEX, None)


@dataclass
class TracedModel:
    """An ONNX model with markers, and how it was made."""

    model: onnx.ModelProto
    exporter: str  # "dynamo" or "torchscript"
    notes: list[str]


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
    with marking(quantizers, runtime), torch.no_grad():
        try:
            return TracedModel(_export_dynamo(model, args, kwargs, opset), "dynamo", [])
        except Exception as exc:  # any exporter failure: try the other exporter before giving up
            reason = _reason(exc)
        try:
            traced = _export_torchscript(model, args, kwargs, min(opset, TORCHSCRIPT_MAX_OPSET))
        except Exception as exc:
            raise RuntimeError(
                f"both ONNX exporters failed; torch.export-based: {reason}; TorchScript: {type(exc).__name__}: {exc}"
            ) from exc
    note = f"the torch.export-based ONNX exporter failed ({reason}); used the legacy TorchScript exporter"
    return TracedModel(traced, "torchscript", [note])


def _reason(exc: Exception) -> str:
    """One line on why the exporter failed: the root cause from its report, without colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    causes = [line for line in text.splitlines() if line.startswith("<class '")]
    if causes:  # the exporter's summary lists "<class 'X'>: message" lines, root cause first
        return re.sub(r"^<class '(?:[\w.]*\.)?(\w+)'>", r"\1", causes[0])
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}"


def _export_dynamo(model: nn.Module, args: tuple, kwargs: dict, opset: int) -> onnx.ModelProto:
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
    return program.model_proto


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

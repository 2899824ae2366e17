"""Insert the sim's quantizers into the float ONNX model as QuantizeLinear/DequantizeLinear pairs.

Integer quantizers: the sim computes ``clamp(round(x/scale), lo, hi) * scale`` with ``lo = offset``
(``offset + 1`` under strict symmetry) and ``hi = offset + 2**b - 1``. A QuantizeLinear to a
``c``-bit type (``c`` = 4, 8 or 16) with zero point ``-offset`` (unsigned) or
``-offset - 2**(b-1)`` (signed) saturates to exactly that range when ``b == c``. Signed types are
used where every offset is ``-2**(b-1)`` (symmetric: zero point 0), unsigned ones otherwise. Other
widths (int2, int3, int5..int7, int9..int15) and strict grids clip in float to
``[lo*scale, hi*scale]`` first (``Max``/``Min``), which rounds to the same codes. 32-bit quantizers,
and 16-bit ones below opset 21, have no QuantizeLinear type: they are written as the sim's own
float ops (``Mul(1/scale)``, ``Round``, ``Max``, ``Min``, ``Mul(scale)``). fp16/bf16 are Cast pairs,
fp8 a QuantizeLinear to a float8 type. Non-float32 tensors are cast to float32 around the pair,
as the sim computes in float32. Parameter initializers hold the sim's quantized values (see
``_put_on_grid``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixprec.core.granularity import Granularity, PerBlock, PerChannel, PerTensor
from mixprec.core.precision import Precision
from mixprec.export.onnx_graph import set_nodes, tensor_names, unique_name

_FLOAT_CAST = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_FP8 = {"fp8_e4m3": TensorProto.FLOAT8E4M3FN, "fp8_e5m2": TensorProto.FLOAT8E5M2}
_INT_TYPES = {
    (4, True): TensorProto.INT4,
    (4, False): TensorProto.UINT4,
    (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8,
    (16, True): TensorProto.INT16,
    (16, False): TensorProto.UINT16,
}


@dataclass(frozen=True)
class QdqSpec:
    """One quantizer to insert on tensor ``key`` of the float model."""

    key: str
    label: str  # the sim's name of the quantizer, for messages
    precision: Precision
    granularity: Granularity
    scale: np.ndarray | None = None  # float32, shape () or (C,)
    offset: np.ndarray | None = None  # int64, same shape (integers only)
    strict_lower: bool = False  # the grid drops its lowest code
    grid_values: np.ndarray | None = None  # a parameter as the sim quantizes it (see insert_qdq)
    mask_threshold: float | None = None  # values <= it pass unquantized (docs/masks.md)


@dataclass(frozen=True)
class Form:
    """How a quantizer is written: ``qdq``, ``qdq+clip``, ``cast`` or ``emulated``, and the
    element type it quantizes to (the QuantizeLinear zero point's type, or the Cast target)."""

    kind: str
    elem_type: int | None


def form_of(spec: QdqSpec, opset: int) -> Form:
    """The form ``spec`` takes at ``opset``.

    Raises:
        ValueError: the precision has no ONNX form at that opset (fp8 below 19).
    """
    p = spec.precision
    if p.name in _FLOAT_CAST:
        return Form("cast", _FLOAT_CAST[p.name])
    if p.name in _FP8:
        if opset < 19:
            raise ValueError(f"{spec.label}: {p} needs ONNX opset >= 19 (float8 types), got {opset}")
        return Form("qdq", _FP8[p.name])
    bits = p.bits
    # int4/int16 and blocked Q/DQ arrived in opset 21
    native = (8,) if opset < 21 else (4, 8, 16)
    container = next((c for c in native if bits <= c), None)
    if container is None or (isinstance(spec.granularity, PerBlock) and opset < 21):
        return Form("emulated", None)
    assert spec.offset is not None
    signed = bool((spec.offset == -(2 ** (bits - 1))).all())
    clip = bits < container or spec.strict_lower
    return Form("qdq+clip" if clip else "qdq", _INT_TYPES[(container, signed)])


class _Builder:
    """Collects the nodes and initializers of one quantizer's chain."""

    def __init__(self, graph: onnx.GraphProto, used: set[str], key: str) -> None:
        self.graph, self.used, self.key = graph, used, key
        self.nodes: list[onnx.NodeProto] = []

    def const(self, suffix: str, array: np.ndarray, elem_type: int | None = None) -> str:
        name = unique_name(f"{self.key}_{suffix}", self.used)
        if elem_type is None:
            tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        else:
            tensor = helper.make_tensor(name, elem_type, list(array.shape), array.flatten().tolist())
        self.graph.initializer.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: object) -> str:
        out = output or unique_name(f"{self.key}_{op.lower()}", self.used)
        name = unique_name(f"{self.key}/{op}", self.used)
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out


def _layout(array: np.ndarray, g: Granularity, dims: list[int | None] | None, label: str) -> list[int]:
    """Shape that puts an encoding-shaped constant on its tensor's axes (1 elsewhere)."""
    if isinstance(g, PerTensor) or array.ndim == 0:
        return list(array.shape)
    if dims is None and (isinstance(g, PerBlock) or g.axis >= 0):
        raise ValueError(f"{label}: the rank of its tensor is unknown; cannot place a {g} encoding")
    if isinstance(g, PerChannel):
        axis = g.axis - len(dims) if g.axis >= 0 else g.axis  # type: ignore[arg-type]
        return [array.shape[0]] + [1] * (-axis - 1)
    shape = [1] * len(dims)  # type: ignore[arg-type]
    shape[0], shape[g.axis % len(shape)] = array.shape
    return shape


def _broadcast(array: np.ndarray, g: Granularity, dims: list[int | None] | None, label: str) -> np.ndarray:
    """A constant for elementwise ops (Max/Min/Mul): per-block values repeated over each block."""
    out = array.reshape(_layout(array, g, dims, label))
    if isinstance(g, PerBlock):
        out = np.repeat(out, g.block_size, axis=g.axis % out.ndim)
    return out


def _qparam(array: np.ndarray, g: Granularity, dims: list[int | None] | None, label: str) -> np.ndarray:
    """A Q/DQ scale or zero point: 1-D per channel; per block, the input's shape with the block
    axis divided by the block size (what QuantizeLinear's ``block_size`` expects)."""
    if not isinstance(g, PerBlock):
        return array
    shaped = array.reshape(_layout(array, g, dims, label))
    target = list(dims)  # type: ignore[arg-type]
    target[g.axis % len(target)] = array.shape[1]
    if any(d is None for d in target):
        raise ValueError(f"{label}: the shape of its tensor is not static; cannot place a {g} encoding")
    return np.ascontiguousarray(np.broadcast_to(shaped, target))


def _chain(b: _Builder, spec: QdqSpec, form: Form, x: str, out: str, dims: list[int | None] | None) -> None:
    g = spec.granularity
    if form.kind == "cast":
        b.node("Cast", [b.node("Cast", [x], to=form.elem_type)], out, to=TensorProto.FLOAT)
        return
    scale = spec.scale.astype(np.float32)  # type: ignore[union-attr]
    attrs: dict[str, int] = {}
    if isinstance(g, PerChannel):
        attrs = {"axis": g.axis}
    elif isinstance(g, PerBlock):
        attrs = {"axis": g.axis, "block_size": g.block_size}
    if spec.precision.is_float:  # fp8
        zp = b.const(
            "zero_point", np.zeros(_qparam(scale, g, dims, spec.label).shape, np.float32), form.elem_type
        )
        s = b.const("scale", _qparam(scale, g, dims, spec.label))
        b.node(
            "DequantizeLinear",
            [b.node("QuantizeLinear", [x, s, zp], saturate=1, **attrs), s, zp],
            out,
            **attrs,
        )
        return
    bits, offset = spec.precision.bits, spec.offset.astype(np.int64)  # type: ignore[union-attr]
    lo_code = (offset + (1 if spec.strict_lower else 0)).astype(np.float64)
    hi_code = (offset + (2**bits - 1)).astype(np.float64)

    def const(suffix: str, array: np.ndarray) -> str:
        return b.const(suffix, _broadcast(array.astype(np.float32), g, dims, spec.label))

    if form.kind == "emulated":
        # exactly the sim's arithmetic: multiply by the float32 reciprocal, round half to even
        t = b.node("Round", [b.node("Mul", [x, const("inv_scale", np.float32(1.0) / scale)])])
        t = b.node("Min", [b.node("Max", [t, const("lo", lo_code)]), const("hi", hi_code)])
        b.node("Mul", [t, const("scale", scale)], out)
        return
    if form.kind == "qdq+clip":
        x = b.node("Max", [x, const("clip_lo", lo_code * scale.astype(np.float64))])
        x = b.node("Min", [x, const("clip_hi", hi_code * scale.astype(np.float64))])
    signed = form.elem_type in (TensorProto.INT4, TensorProto.INT8, TensorProto.INT16)
    zp = b.const(
        "zero_point",
        _qparam(-offset - (2 ** (bits - 1) if signed else 0), g, dims, spec.label),
        form.elem_type,
    )
    s = b.const("scale", _qparam(scale, g, dims, spec.label))
    b.node("DequantizeLinear", [b.node("QuantizeLinear", [x, s, zp], **attrs), s, zp], out, **attrs)


def _put_on_grid(graph: onnx.GraphProto, index: int, values: np.ndarray) -> None:
    """Replace a parameter initializer by its values on the sim's grid.

    QuantizeLinear divides by the scale where the sim multiplies by the reciprocal; the two
    round differently for a value within an ulp of a rounding tie (a few dozen of resnet18's
    11M weights). A value already on the grid quantizes to its own code either way, so the QDQ
    model holds exactly the sim's integer weights. Only this chain reads the initializer.
    """
    old = graph.initializer[index]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
    graph.initializer[index].CopyFrom(
        numpy_helper.from_array(values.astype(dtype).reshape(tuple(old.dims)), old.name)
    )


def _tensor_types(graph: onnx.GraphProto) -> dict[str, tuple[int, list[int | None] | None]]:
    """(element type, dims or None) of every tensor whose type the graph records."""
    types: dict[str, tuple[int, list[int | None] | None]] = {}
    for v in (*graph.input, *graph.value_info, *graph.output):
        t = v.type.tensor_type
        dims = (
            [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            if t.HasField("shape")
            else None
        )
        types[v.name] = (t.elem_type, dims)
    for init in graph.initializer:
        types[init.name] = (init.data_type, list(init.dims))
    return types


def insert_qdq(
    model: onnx.ModelProto, specs: list[QdqSpec], opset: int
) -> tuple[onnx.ModelProto, dict[str, Form]]:
    """A copy of the float ``model`` with each spec's quantizer inserted on its tensor.

    Readers of ``key`` read the dequantized ``<key>_dq``; where ``key`` is a graph output the
    output keeps its name (the DequantizeLinear writes it) and the tensor it quantizes is
    renamed ``<key>_float``.

    Raises:
        ValueError: a quantizer has no ONNX form (see ``form_of``), or its tensor is unknown.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    types = _tensor_types(graph)
    used = tensor_names(graph) | {o.name for o in graph.output} | {n.name for n in graph.node}
    outputs = {o.name for o in graph.output}
    original = list(graph.node)
    producer = {name: i for i, n in enumerate(original) for name in n.output}
    present = tensor_names(graph)
    initializers = {t.name: i for i, t in enumerate(graph.initializer)}
    head: list[onnx.NodeProto] = []
    after: dict[int, list[onnx.NodeProto]] = {}
    rewire: dict[str, str] = {}
    forms: dict[str, Form] = {}
    for spec in specs:
        if spec.key in forms:
            continue
        if spec.key not in present:
            raise ValueError(f"{spec.label}: tensor {spec.key!r} is not in the exported graph")
        form = forms[spec.key] = form_of(spec, opset)
        b = _Builder(graph, used, spec.key)
        x = spec.key
        if spec.key in outputs:
            if spec.key not in producer:
                raise ValueError(f"{spec.label}: tensor {spec.key!r} is both a graph input and output")
            x = unique_name(f"{spec.key}_float", used)
            node = original[producer[spec.key]]
            node.output[list(node.output).index(spec.key)] = x
            final = spec.key
        else:
            final = rewire[spec.key] = unique_name(f"{spec.key}_dq", used)
        elem, dims = types.get(spec.key, (TensorProto.FLOAT, None))
        if spec.grid_values is not None and spec.key in initializers:
            _put_on_grid(graph, initializers[spec.key], spec.grid_values)
        own_type = elem not in (TensorProto.FLOAT, TensorProto.UNDEFINED)
        wrap = own_type and form.kind != "cast"
        src = b.node("Cast", [x], to=TensorProto.FLOAT) if wrap else x
        dst = unique_name(f"{spec.key}_dq_float", used) if wrap else final
        if spec.mask_threshold is None:
            _chain(b, spec, form, src, dst, dims)
        else:  # additive-mask values pass through, as in the sim
            quantized = unique_name(f"{spec.key}_quantized", used)
            _chain(b, spec, form, src, quantized, dims)
            threshold = b.const("mask_threshold", np.array(spec.mask_threshold, np.float32))
            b.node("Where", [b.node("LessOrEqual", [src, threshold]), src, quantized], dst)
        if form.kind == "cast" and own_type:
            b.nodes[-1].attribute[0].i = elem  # cast back to the tensor's own type
        if wrap:
            b.node("Cast", [dst], final, to=elem)
        at = producer.get(spec.key)
        (head if at is None else after.setdefault(at, [])).extend(b.nodes)
    ordered = list(head)
    for i, node in enumerate(original):
        for j, name in enumerate(node.input):
            if name in rewire:
                node.input[j] = rewire[name]
        ordered.append(node)
        ordered.extend(after.get(i, []))
    set_nodes(graph, ordered)
    return out, forms

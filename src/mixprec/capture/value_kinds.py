"""Which float tensors of a captured graph hold integers (counts, indices, booleans).

Quantizing such a tensor changes its meaning, not its precision: fake-quantized expert counts
from ``torch.histc`` that a ``cumsum(dtype=int32)`` then truncates send tokens to the wrong
experts. These tensors get no quantizer by default (docs/rules.md, "Integer-valued tensors").

A float tensor is integer-valued when
- a function whose result is integer by definition produced it (``histc``, ``bincount``,
  ``argmax``, comparisons, ...);
- a cast or integer-preserving op (data movement, ``add``, ``mul``, ``cumsum``, ...) produced it
  from integer-valued or integer-dtype tensors only (``ids.float()``, ``counts + 1``);
- every reader casts it to an integer or bool dtype next (``x.long()``, ``cumsum(x, dtype=int32)``).
"""

from __future__ import annotations

from mixprec.capture.graph import Graph, Layer

INTEGER_RESULT_FUNCTIONS = frozenset(
    {
        "histc", "bincount", "argmax", "argmin", "argsort", "argwhere", "nonzero", "count_nonzero",
        "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
        "isnan", "isinf", "isfinite", "logical_and", "logical_or", "logical_not", "searchsorted",
        "bucketize", "floor_divide", "__floordiv__", "sign", "one_hot",
    }
)  # fmt: skip
"""Functions whose float results (if any) can only hold integers."""

INTEGER_PRESERVING_FUNCTIONS = frozenset(
    {
        "add", "__add__", "__radd__", "iadd", "__iadd__", "sub", "__sub__", "__rsub__", "rsub",
        "mul", "__mul__", "__rmul__", "neg", "__neg__", "abs", "cumsum", "cumprod", "sum", "max",
        "min", "maximum", "minimum", "clamp", "clip", "clamp_min", "clamp_max", "where", "cat",
        "stack", "sort", "topk", "masked_fill", "zeros_like", "ones_like", "float", "double", "half",
        "bfloat16", "int", "long", "short", "byte", "char", "bool", "to", "type", "type_as",
        "round", "floor", "ceil", "trunc", "remainder", "__mod__", "fmod",
    }
)  # fmt: skip
"""Functions that give integers when every tensor they read holds integers."""

CAST_FUNCTIONS = frozenset(
    {"to", "type", "type_as", "int", "long", "short", "byte", "char", "bool", "cumsum", "cumprod"}
)
"""Functions that may cast to an integer dtype (then their output is not float)."""


def _preserves_integers(layer: Layer) -> bool:
    return layer.data_movement or (not layer.is_module and layer.type_name in INTEGER_PRESERVING_FUNCTIONS)


def integer_valued_tensors(graph: Graph) -> set[int]:
    """Ids of the float tensors of ``graph`` that hold integers (see the module docstring)."""
    integer: set[int] = set()

    def holds_integers(tid: int | None) -> bool:
        return tid is not None and (not graph.tensors[tid].is_float or tid in integer)

    for layer in graph.layers:  # capture order is a topological order
        floats = [t for t, f in zip(layer.outputs, layer.output_is_float, strict=True) if f]
        if not floats:
            continue
        if not layer.is_module and layer.type_name in INTEGER_RESULT_FUNCTIONS:
            integer.update(floats)
        elif _preserves_integers(layer) and not layer.params:
            # a constant (None slot) may hold fractions: ``positions.float() * inv_freq``
            if layer.inputs and all(holds_integers(t) for t in layer.inputs):
                integer.update(floats)
    for tid, node in graph.tensors.items():
        if not node.is_float or tid in integer or not node.consumers:
            continue
        if all(_casts_to_integer(graph.layers[c]) for c, _ in node.consumers):
            integer.add(tid)
            integer.add(graph.source(tid))
    return integer


def _casts_to_integer(layer: Layer) -> bool:
    return (
        not layer.is_module
        and layer.type_name in CAST_FUNCTIONS
        and bool(layer.output_is_float)
        and not any(layer.output_is_float)
    )

"""Identifying a functional call site without looking at the Python stack.

A functional call (``x + y``, ``torch.matmul``, ``F.softmax``) made while a model runs is
identified by three things that capture and the quantized forward both observe the same way
(see docs/capture.md):

- the innermost module of the model whose forward is executing (its qualified name; the root
  is ``""``), tracked by forward hooks, so nothing depends on file names or bytecode offsets;
- the function's canonical name (``x + y``, ``torch.add`` and ``x += y`` are all ``add``);
- its ordinal among calls of that function made by that module so far in this forward, so a
  loop's iterations and a module invoked twice each get their own site.

Only calls of *counted* functions (those that can be layers with quantizers) need an identity at
run time; ordinals are per function, so counting every function at capture and only the counted
ones at run time gives the same ordinals.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import torch

from mixprec.capture import op_types as ops

# (scope module name, canonical function name, ordinal within that scope in one forward)
SiteKey = tuple[str, str, int]

_CANONICAL_CACHE: dict[Callable, str] = {}


def remember_torch_function_names() -> None:
    """Memoize the names of every overridable torch function and Tensor method (once, ~20 ms).

    Dynamo reads only the memo (see :func:`canonical_name`); with it filled, a function that no
    eager forward called is still recognized under ``torch.compile`` on a path first taken there.
    """
    if _CANONICAL_CACHE.get(torch.add):
        return
    for funcs in torch.overrides.get_overridable_functions().values():
        for func in funcs:
            if isinstance(func, types.MethodWrapperType):
                continue  # property getters: dynamo cannot hash them as dict keys (a graph break)
            try:
                _CANONICAL_CACHE.setdefault(func, ops.function_name(func))
            except TypeError:  # unhashable
                pass


def canonical_name(func: Callable) -> str:
    """``ops.function_name`` memoized per function object (it runs for every torch call).

    Under dynamo only the memo is read (dynamo cannot evaluate the name logic on every kind of
    callable); :func:`remember_torch_function_names` fills it when a sim is built. A callable
    that is in neither (not a torch function) is not a site there (``""``).
    """
    if torch.compiler.is_compiling():
        return _CANONICAL_CACHE.get(func, "")
    try:
        return _CANONICAL_CACHE[func]
    except (KeyError, TypeError):
        pass
    name = ops.function_name(func)
    try:
        _CANONICAL_CACHE[func] = name
    except TypeError:  # an unhashable callable: just do not memoize it
        pass
    return name


# Functions that take tensors but compute nothing a quantizer could sit on.
_NEVER_LAYERS = frozenset(
    {
        "size", "dim", "numel", "__len__", "__bool__", "item", "tolist", "is_floating_point",
        "is_contiguous", "__set__", "data_ptr", "element_size", "stride", "storage_offset",
        "__format__", "__repr__", "__hash__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
        "eq", "ne", "lt", "le", "gt", "ge", "__and__", "__or__", "__invert__", "logical_not",
        "logical_and", "logical_or", "any", "all", "isinf", "isnan", "isfinite", "nonzero", "argmax",
        "argmin", "requires_grad_", "new_empty", "new_zeros", "new_ones", "new_full", "new_tensor",
        "zeros_like", "ones_like", "empty_like", "full_like", "copy", "__reduce_ex__", "__deepcopy__",
        "__setstate__", "__array__", "unique", "bincount", "arange", "full", "zeros", "ones", "empty",
        "set_", "record_stream", "untyped_storage", "get_device",
    }
)  # fmt: skip

# Compute functions with no op type of their own in the sim config (a layer of one takes the
# CamelCase of its name, at capture as at run time). Masks are built with ``where``/``masked_fill``,
# which stay out: a new padding pattern must not become a layer to calibrate.
_OTHER_COMPUTE = frozenset(
    {
        "erf", "erfc", "log", "log1p", "log2", "expm1", "exp2", "sin", "cos", "tan", "atan", "atan2",
        "sinh", "cosh", "asin", "acos", "abs", "reciprocal", "square", "sign", "floor", "ceil", "round",
        "trunc", "frac", "fmod", "remainder", "hypot", "maximum", "minimum", "clamp_min", "clamp_max",
        "lerp", "addcmul", "addcdiv", "addmm", "addbmm", "outer", "cumsum", "cumprod", "logsumexp",
        "amax", "amin", "prod", "var", "std", "norm", "leaky_relu", "elu", "selu", "celu",
        "hardswish", "hardsigmoid", "hardshrink", "softshrink", "tanhshrink", "softplus", "softsign",
        "mish", "prelu", "rrelu", "glu", "logsigmoid", "group_norm", "instance_norm", "batch_norm",
        "rms_norm", "normalize", "local_response_norm", "conv3d", "conv_transpose1d",
        "conv_transpose2d", "conv_transpose3d", "avg_pool1d", "avg_pool3d", "max_pool1d", "max_pool3d",
        "adaptive_avg_pool1d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
        "lp_pool2d", "grid_sample", "upsample", "bilinear", "cosine_similarity", "pairwise_distance",
    }
)  # fmt: skip

# Functions that become layers on a path first seen at run time even if the capture never called
# them: compute ops, with an op type in the sim config or not.
KNOWN_COMPUTE = (
    frozenset(name for name in ops.known_function_names() if name not in ops.DATA_MOVEMENT_FUNCTIONS)
    | _OTHER_COMPUTE
)


def is_counted(canonical: str) -> bool:
    """Whether a call of this function may be a quantized layer (and so needs a site identity)."""
    return canonical not in ops.DATA_MOVEMENT_FUNCTIONS and canonical not in _NEVER_LAYERS


def site_name(scope: str, canonical: str, ordinal: int, module_names: frozenset[str] | set[str]) -> str:
    """``<scope>.<function>`` for the first call, ``<scope>.<function>_<k>`` for the k-th.

    A name that a module of the model already has (a submodule called ``add``) gets ``()``
    appended, so layer names stay unique and a function layer never shadows a module.
    """
    base = f"{scope}.{canonical}" if scope else canonical
    name = base if ordinal == 0 else f"{base}_{ordinal}"
    return f"{name}()" if name in module_names else name


# Where a key/value cache of transformers appends new keys and values (the KV cache).
_CACHE_MODULES = ("transformers.cache_utils",)

KV_CACHE_WRITES: dict[str, tuple[int, str] | None] = {"cat": None, "index_copy": (3, "source")}
"""The torch calls by which a transformers cache stores new keys or values: ``cat`` (the dynamic
caches: its output is the cache) and ``index_copy_`` (the static cache, written in place), with
the position and keyword of the argument holding the new states for a write in place. Whichever
the cache, its writes of a module's keys are one layer, ``<module>.kv_cache.key`` (docs/llm_recipes.md)."""


def is_kv_cache_call() -> bool:
    """Whether the torch call being handled was made by a transformers KV-cache update.

    Only for *naming* a site when it is created (capture, or a path first seen in an eager
    forward): identity never depends on the stack, so dynamo never runs this.
    """
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == "torch" or name.startswith(("torch.", "mixprec."))):
            return name.startswith(_CACHE_MODULES)
        frame = frame.f_back
    return False


def is_kv_cache_name(scope: str, name: str) -> bool:
    """Whether ``name`` is one of ``kv_cache_name``'s names for a cache of module ``scope``."""
    return name.startswith(f"{scope}.kv_cache." if scope else "kv_cache.")


def kv_cache_name(scope: str, index: int) -> str:
    """The index-th cache append of a module: keys and values alternate (``kv_cache.key``, ``kv_cache.value``,
    then ``kv_cache.key_1`` ... for a module updating more than one cache in a forward)."""
    role = "key" if index % 2 == 0 else "value"
    n = index // 2
    base = f"{scope}.kv_cache.{role}" if scope else f"kv_cache.{role}"
    return base if n == 0 else f"{base}_{n}"

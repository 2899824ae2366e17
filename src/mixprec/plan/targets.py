"""Turning a ``set_*`` argument into layers or model I/O slots, or a clear error (at call time)."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from mixprec.capture import op_types as ops
from mixprec.core.granularity import PerBlock, PerChannel
from mixprec.core.param_spec import ParamSpec
from mixprec.core.precision import Precision, parse_optional
from mixprec.errors import RequestError
from mixprec.plan.requests import TargetKind
from mixprec.sim.placement import is_quantizable
from mixprec.sim.runtime import original_class
from mixprec.sim.state import PrecisionState

_GLOB_CHARS = set("*?[")


def _quantizable(sim: PrecisionState, index: int) -> bool:
    return is_quantizable(sim.placement, sim.graph.layers[index])


def _qualname(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    return f"{module}.{name}" if module else name


def match_target(sim: PrecisionState, target: Any) -> tuple[tuple[int, ...], TargetKind, str]:
    """The quantizable layers ``target`` names, how it named them, and a readable description."""
    graph = sim.graph
    if isinstance(target, nn.Module):
        name = sim.module_name(target)
        if name is None:
            float_name = sim.float_module_name(target)
            hint = (
                f"it is the float model's module {float_name!r}; pass sim.model's copy instead "
                f"(sim.model.get_submodule({float_name!r}))"
                if float_name is not None
                else "pass a module of sim.model (e.g. sim.model.features[1])"
            )
            raise RequestError(f"module {original_class(target).__name__} is not part of sim.model: {hint}")
        return _match_module(sim, name, target)
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise RequestError(f"target class {target.__name__} is not a torch.nn.Module subclass")
        # nn.Linear names the Linear-like classes too (transformers' Conv1D): docs/rules.md
        linear = target is nn.Linear
        layers = tuple(
            layer.index
            for layer in graph.layers
            if layer.is_module
            and (issubclass(layer.op, target) or (linear and ops.is_linear_like(layer.op)))
            and _quantizable(sim, layer.index)
        )
        return layers, TargetKind.MODULE_CLASS, _qualname(target)
    if isinstance(target, str):
        return _match_string(sim, target)
    if callable(target):
        canonical = ops.function_name(target)
        layers = tuple(
            layer.index
            for layer in graph.layers
            if not layer.is_module and layer.type_name == canonical and _quantizable(sim, layer.index)
        )
        return layers, TargetKind.FUNCTION, _qualname(target)
    raise RequestError(
        f"target {target!r} ({type(target).__name__}) is not accepted; pass a module of sim.model, a module "
        "class, a function (torch.matmul), a layer name, a glob ('features.*.conv.0.0') or a regex ('re:...')"
    )


def _match_module(
    sim: PrecisionState, name: str, module: nn.Module
) -> tuple[tuple[int, ...], TargetKind, str]:
    graph = sim.graph
    leaf = (
        any(layer.is_module and layer.module_name == name for layer in graph.layers)
        and name in sim.leaf_module_names
    )
    if leaf:
        layers = tuple(
            layer.index
            for layer in graph.layers
            if layer.is_module and layer.module_name == name and _quantizable(sim, layer.index)
        )
        kind = TargetKind.LEAF_MODULE
    else:
        prefix = name + "." if name else ""
        layers = tuple(
            layer.index
            for layer in graph.layers
            if (layer.module_name == name or layer.module_name.startswith(prefix))
            and _quantizable(sim, layer.index)
        )
        kind = TargetKind.MODULE
    if not layers:
        raise RequestError(
            f"module {name or '<root>'!r} ({original_class(module).__name__}) has no quantized layer: it is not called in the "
            "forward pass, or it only moves data (reshape, dropout, identity)"
        )
    return layers, kind, name or "<root>"


def _match_string(sim: PrecisionState, text: str) -> tuple[tuple[int, ...], TargetKind, str]:
    if not text.strip():
        # "" is the root module's name: it would silently target every layer
        raise RequestError(
            f"target {text!r} is empty; pass a layer name, a glob ('features.*'), a regex ('re:...'), "
            "or sim.model itself to target every layer"
        )
    graph = sim.graph
    names = [layer.name for layer in graph.layers if _quantizable(sim, layer.index)]
    by_name = {layer.name: layer.index for layer in graph.layers}
    if text.startswith("re:"):
        try:
            pattern = re.compile(text[3:])
        except re.error as exc:
            raise RequestError(f"target {text!r}: invalid regex: {exc}") from exc
        layers = tuple(by_name[n] for n in names if pattern.fullmatch(n))
        kind = TargetKind.REGEX
    elif _GLOB_CHARS & set(text):
        layers = tuple(by_name[n] for n in names if fnmatch.fnmatchcase(n, text))
        kind = TargetKind.GLOB
    else:
        module = sim.named_module(text)
        if module is not None:
            return _match_module(sim, text, module)
        if text in by_name and _quantizable(sim, by_name[text]):
            return (by_name[text],), TargetKind.LAYER_NAME, text
        layers, kind = (), TargetKind.LAYER_NAME
    if not layers:
        close = difflib.get_close_matches(text.removeprefix("re:"), names, n=3)
        hint = f"; close names: {', '.join(close)}" if close else "; list names with sim.precision_table()"
        raise RequestError(f"target {text!r} ({kind.value}) matches no quantized layer{hint}")
    return layers, kind, text


def parse_activation(value: Any) -> tuple[tuple[Precision | None, ...] | None, bool]:
    """``None``, one precision, or a list with one entry (or None) per input."""
    if value is None:
        return None, False
    try:
        if isinstance(value, (list, tuple)):
            return tuple(parse_optional(v) for v in value), True
        return (Precision.parse(value),), False
    except ValueError as exc:
        raise RequestError(f"activation={value!r}: {exc}") from exc


def parse_params(value: Any) -> tuple[tuple[str, ParamSpec], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RequestError(
            f"param must be a dict of param name -> precision (e.g. {{'weight': 'int16'}}), got {value!r}"
        )
    parsed = []
    for name, precision in value.items():
        if not isinstance(name, str):
            raise RequestError(f"param names must be strings, got {name!r}")
        try:
            parsed.append((name, ParamSpec.parse(precision)))
        except ValueError as exc:
            raise RequestError(f"param[{name!r}]={precision!r}: {exc}") from exc
    return tuple(parsed)


def check_layer_arguments(
    sim: PrecisionState, layers: tuple[int, ...], activation, is_list: bool, params
) -> None:
    graph = sim.graph
    if is_list:
        for index in layers:
            layer = graph.layers[index]
            if len(activation) != len(layer.inputs):
                raise RequestError(
                    f"activation list has {len(activation)} entries but layer {layer.name!r} has "
                    f"{len(layer.inputs)} input(s); give one entry per input (None leaves one alone)"
                )
    for name, spec in params:
        if not any(name in graph.layers[i].params for i in layers):
            available = sorted({p for i in layers for p in graph.layers[i].params})
            raise RequestError(
                f"param {name!r} is not a parameter of any targeted layer; available: {available or 'none'}"
            )
        if isinstance(spec.granularity, (PerChannel, PerBlock)):
            _check_axis(sim, layers, name, spec.granularity)
        if isinstance(spec.granularity, PerBlock):
            for i in layers:
                ref = graph.layers[i].params.get(name)
                if ref is None:
                    continue
                owner = sim.model.get_submodule(ref.owner)
                shape = tuple(owner._parameters[ref.attr].shape)
                axis = spec.granularity.axis
                if ops.weight_channel_axis(owner, ref.attr) != 0 or len(shape) < 2 or axis % len(shape) == 0:
                    raise RequestError(
                        f"param {name!r} of layer {graph.layers[i].name!r} (shape {list(shape)}) cannot be quantized "
                        "per block: blocks run along a non-output axis of a weight whose output channels are on "
                        "axis 0 (transformers' Conv1D stores [in, out]); use per-channel there"
                    )
                if shape[axis] % spec.granularity.block_size:
                    raise RequestError(
                        f"param {name!r} of layer {graph.layers[i].name!r} has shape {list(shape)}: its axis {axis} "
                        f"is not a multiple of block_size {spec.granularity.block_size}"
                    )


def match_io(
    skeleton: Any, value: Any, what: str, is_float: Callable[[int], bool], path: str = ""
) -> list[tuple[int, Precision]]:
    """Pair a (possibly nested) precision spec with the model's input/output structure."""
    if isinstance(skeleton, int):
        if isinstance(value, (list, tuple, dict)):
            raise RequestError(f"{what}{path}: expected one precision (or None) for a tensor, got {value!r}")
        try:
            precision = parse_optional(value)
        except ValueError as exc:
            raise RequestError(f"{what}{path}={value!r}: {exc}") from exc
        if precision is None:
            return []
        if not is_float(skeleton):
            raise RequestError(f"{what}{path} is not a float tensor and cannot be quantized; use None there")
        return [(skeleton, precision)]
    if skeleton is None:
        if value is not None:
            raise RequestError(f"{what}{path} is not a tensor; use None there, got {value!r}")
        return []
    if isinstance(skeleton, list):
        if not isinstance(value, (list, tuple)) or len(value) != len(skeleton):
            raise RequestError(
                f"{what}{path}: expected a list of {len(skeleton)} entries shaped like {_shape(skeleton)}, got {value!r}"
            )
        return [
            pair
            for i, (s, v) in enumerate(zip(skeleton, value, strict=True))
            for pair in match_io(s, v, what, is_float, f"{path}[{i}]")
        ]
    if isinstance(value, dict):
        unknown = set(value) - set(skeleton)
        if unknown:
            raise RequestError(f"{what}{path}: unknown key(s) {sorted(unknown)}; keys: {sorted(skeleton)}")
        return [
            pair for k, v in value.items() for pair in match_io(skeleton[k], v, what, is_float, f"{path}.{k}")
        ]
    if isinstance(value, (list, tuple)) and len(value) == len(skeleton):
        return [
            pair
            for (k, s), v in zip(skeleton.items(), value, strict=True)
            for pair in match_io(s, v, what, is_float, f"{path}.{k}")
        ]
    raise RequestError(
        f"{what}{path}: expected a dict with keys {sorted(skeleton)} or a list of {len(skeleton)}, got {value!r}"
    )


def _shape(skeleton: Any) -> str:
    if isinstance(skeleton, list):
        return "[" + ", ".join(_shape(s) for s in skeleton) + "]"
    if isinstance(skeleton, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in skeleton.items()) + "}"
    return "P" if isinstance(skeleton, int) else "None"


def _check_axis(sim: PrecisionState, layers: tuple[int, ...], name: str, granularity: Any) -> None:
    """A granularity's axis must exist on every targeted parameter (else every compute_encodings fails)."""
    for i in layers:
        ref = sim.graph.layers[i].params.get(name)
        if ref is not None and not -ref.ndim <= granularity.axis < ref.ndim:
            shape = list(sim.model.get_submodule(ref.owner)._parameters[ref.attr].shape)
            raise RequestError(
                f"param {name!r} of layer {sim.graph.layers[i].name!r}: {granularity} names axis "
                f"{granularity.axis}, which its {ref.ndim}-D parameter of shape {shape} does not have; "
                f"accepted: {-ref.ndim}..{ref.ndim - 1}"
            )

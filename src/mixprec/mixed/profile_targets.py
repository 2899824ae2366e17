"""Profile targets: from a profile's strings to ``set_precision`` targets, and back from requests."""

from __future__ import annotations

import importlib
import importlib.util
import re
from typing import TYPE_CHECKING, Any

from mixprec.core.precision import Precision
from mixprec.errors import RequestError
from mixprec.plan.requests import Request, TargetKind

if TYPE_CHECKING:
    from mixprec.quantsim import QuantizationSimModel

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# Functions report their qualname from where torch defines them; these are the names users write.
_FUNCTION_ALIASES = (("torch._VariableFunctionsClass.", "torch."), ("TensorBase.", "torch.Tensor."))


def resolve_target(sim: QuantizationSimModel, target: str) -> Any:
    """A profile target as ``set_precision`` takes it: a layer/module name, glob or regex stays a
    string; otherwise a dotted path that imports to a class or function becomes that object."""
    if target == "<root>":
        return sim.model
    if target.startswith("re:") or set("*?[") & set(target):
        return target
    if sim.named_module(target) is not None or any(layer.name == target for layer in sim.graph.layers):
        return target
    if not _DOTTED.fullmatch(target) or importlib.util.find_spec(target.split(".")[0]) is None:
        return target  # not an import path: let set_precision report the close layer names
    obj, problem = _import_path(target)
    if obj is None:
        raise RequestError(
            f"target {target!r} is not a layer of the model, and not an importable class or function: {problem}"
        )
    return obj


def _import_path(path: str) -> tuple[Any, str]:
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return None, f"{module_name} has no attribute {'.'.join(parts[cut:])!r}"
            obj = getattr(obj, attr)
        if not callable(obj):
            return None, f"{path} is a {type(obj).__name__}, not a module class or function"
        return obj, ""
    return None, f"no module {parts[0]!r} to import"


def profile_target(request: Request) -> str:
    """The profile spelling of a recorded request's target (module objects become qualified names)."""
    target = request.target
    if request.target_kind is TargetKind.FUNCTION:
        for prefix, alias in _FUNCTION_ALIASES:
            if target.startswith(prefix) and _import_path(alias + target[len(prefix) :])[0] is not None:
                return alias + target[len(prefix) :]
    if request.target_kind in (TargetKind.MODULE_CLASS, TargetKind.FUNCTION):
        return _shortest_path(target)
    return target


def _shortest_path(path: str) -> str:
    """``torch.nn.modules.pooling.AvgPool2d`` -> ``torch.nn.AvgPool2d``: the shortest import path to the same object."""
    obj, _ = _import_path(path)
    if obj is None:
        return path
    module_parts, name = path.split(".")[:-1], path.split(".")[-1]
    for cut in range(1, len(module_parts)):
        candidate = ".".join(module_parts[:cut]) + "." + name
        if _import_path(candidate)[0] is obj:
            return candidate
    return path


def io_activation(skeleton: Any, ios: list, chosen_pairs: tuple[tuple[int, Precision], ...]) -> Any:
    """Rebuild a model I/O request's ``activation``: one name when it covers every float tensor alike."""
    chosen = {index: p.name for index, p in chosen_pairs}
    floats = {io.index for io in ios if io.is_float}
    if set(chosen) == floats and len(set(chosen.values())) == 1:
        return next(iter(chosen.values()))
    return _shaped(skeleton, chosen)


def _shaped(skeleton: Any, chosen: dict[int, str]) -> Any:
    if isinstance(skeleton, int):
        return chosen.get(skeleton)
    if isinstance(skeleton, list):
        return [_shaped(s, chosen) for s in skeleton]
    if isinstance(skeleton, dict):
        return {k: _shaped(s, chosen) for k, s in skeleton.items()}
    return None

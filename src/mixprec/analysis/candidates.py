"""Sweep candidates: the units a ``targets`` argument names, and the quantizer changes each one makes.

A unit is one module of ``sim.model`` (a leaf such as a Conv2d, or a block such as a decoder
layer) or one functional call site. Its changes are found by asking the sim's own
:class:`MixedPrecisionConfigurator` (so the tried precision means exactly what
``set_precision`` means, propagation included), recording which quantizers the apply replaced,
and putting the previous precisions and encodings back.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mixprec.core.granularity import Granularity
from mixprec.core.precision import Precision
from mixprec.errors import RequestError
from mixprec.mixed.configurator import MixedPrecisionConfigurator
from mixprec.quant.quantizers import QuantizerBase
from mixprec.quantsim import QuantizationSimModel
from mixprec.sim.placement import Place, PlaceKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """One quantizer the tried precision replaces: before and after."""

    place: Place
    old: Precision | None
    old_granularity: Granularity | None
    new: Precision | None
    new_granularity: Granularity | None


@dataclass
class Candidate:
    """One row of the sweep."""

    name: str
    type_name: str
    target: Any  # what set_precision(target, ...) receives
    module: nn.Module | None
    changes: list[Change] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)  # layers whose quantizers change
    cut_modules: list[nn.Module] = field(default_factory=list)  # the first call of any bounds the cut
    params: int = 0
    profile_targets: list[str] = field(default_factory=list)  # set_precision targets a profile names


def expand_targets(sim: QuantizationSimModel, targets: Any) -> list[Candidate]:
    """One candidate per module (or functional call site) that ``targets`` names, in model order.

    Raises:
        RequestError: a target of an unknown kind, or one that names nothing.
    """
    found: dict[str, Candidate] = {}
    for target in targets if isinstance(targets, (list, tuple, set)) else [targets]:
        units = _units(sim, target)
        if not units:
            raise RequestError(f"targets: {_describe(target)} names no module or layer of sim.model")
        for unit in units:
            found.setdefault(unit.name, unit)
    return list(found.values())


def _units(sim: QuantizationSimModel, target: Any) -> list[Candidate]:
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise RequestError(f"targets: class {target.__name__} is not a torch.nn.Module subclass")
        return [
            _module_unit(sim, name, m)
            for name, m in sim.model.named_modules()
            if isinstance(m, target) and not _internal(name, m)
        ]
    if isinstance(target, nn.Module):
        name = sim.module_name(target)
        if name is None:
            raise RequestError(
                f"targets: module {type(target).__name__} is not part of sim.model; pass sim.model's modules"
            )
        return [_module_unit(sim, name, target)]
    if isinstance(target, str):
        module = sim.named_module(target)
        if module is not None and target:
            return [_module_unit(sim, target, module)]
        if target.startswith("re:"):
            try:
                pattern = re.compile(target[3:])
            except re.error as exc:
                raise RequestError(f"targets: invalid regex {target!r}: {exc}") from exc
            return _layer_units(sim, (lay for lay in sim.graph.layers if pattern.fullmatch(lay.name)))
        return _layer_units(sim, (lay for lay in sim.graph.layers if fnmatch.fnmatchcase(lay.name, target)))
    if callable(target):
        return _layer_units(sim, (lay for lay in sim.graph.layers if not lay.is_module and lay.op is target))
    raise RequestError(
        f"targets: {target!r} ({type(target).__name__}) is not accepted; pass a module class, a module of "
        "sim.model, a function (torch.matmul), a layer name, a glob or a 're:' regex, or a list of them"
    )


def _internal(name: str, module: nn.Module) -> bool:
    return isinstance(module, QuantizerBase) or any(part.startswith("mixprec_") for part in name.split("."))


def _module_unit(sim: QuantizationSimModel, name: str, module: nn.Module) -> Candidate:
    type_name = next(
        (lay.type_name for lay in sim.graph.layers if lay.is_module and lay.module_name == name),
        type(module).__name__,
    )
    return Candidate(name or "<root>", type_name, module, module)


def _layer_units(sim: QuantizationSimModel, layers: Iterable[Any]) -> list[Candidate]:
    units = []
    for lay in layers:
        if lay.is_module:
            module = sim.named_module(lay.module_name)
            if module is not None:
                units.append(_module_unit(sim, lay.module_name, module))
                continue
        units.append(Candidate(lay.name, lay.type_name, lay.name, None))
    return units


def plan_changes(
    sim: QuantizationSimModel,
    candidates: list[Candidate],
    activation: Any,
    param: dict[str, Any] | None,
    layers: Any = None,
) -> list[Candidate]:
    """Fill each candidate's changes by applying its request and undoing it; drop the ones that
    change nothing. The sim ends as it began (precisions and encodings)."""
    kept = []
    for c in candidates:
        mp = MixedPrecisionConfigurator(sim)
        try:
            if layers is None:
                mp.set_precision(c.target, activation=activation, param=param)
            else:
                mp.set_precision(layers, activation=activation, param=param, within=c.target)
        except RequestError as exc:
            log.info("sensitivity: skipping %s: %s", c.name, exc)
            continue
        c.changes, encodings = apply_requests(sim, mp)
        revert(sim, c.changes, encodings)
        if not c.changes:
            log.info("sensitivity: skipping %s: the tried precision changes no quantizer there", c.name)
            continue
        _describe_candidate(sim, c, layers)
        kept.append(c)
    return kept


def apply_requests(
    sim: QuantizationSimModel, mp: MixedPrecisionConfigurator
) -> tuple[list[Change], dict[Place, Any]]:
    """``mp.apply()`` (not strict, no log); returns what it replaced and the replaced encodings."""
    before = {p: sim.quantizer_at(p) for p in sim.places()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kernel findings: a sweep tries precisions on purpose
        mp.apply(log_file=None, strict=False)
    changes, encodings = [], {}
    for place, old in before.items():
        new = sim.quantizer_at(place)
        if new is not old:
            changes.append(
                Change(
                    place,
                    None if old is None else old.precision,
                    None if old is None else old.granularity,
                    None if new is None else new.precision,
                    None if new is None else new.granularity,
                )
            )
            encodings[place] = None if old is None else _encoding(old)
    return changes, encodings


def apply_changes(sim: QuantizationSimModel, changes: list[Change]) -> list[tuple[Place, QuantizerBase]]:
    """Put the new quantizers in place; returns each new quantizer once (it still needs an encoding)."""
    for ch in changes:
        sim.set_precision_at(ch.place, ch.new, ch.new_granularity)
    return _distinct(sim, changes)


def revert(sim: QuantizationSimModel, changes: list[Change], encodings: dict[Place, Any]) -> None:
    """Put the previous precisions back, with their encodings (``encodings[place]``, None for none)."""
    for ch in changes:
        sim.set_precision_at(ch.place, ch.old, ch.old_granularity)
    for place, q in _distinct(sim, changes):
        encoding = encodings.get(place)
        if encoding is not None:
            q.set_encoding(encoding)


def _distinct(sim: QuantizationSimModel, changes: list[Change]) -> list[tuple[Place, QuantizerBase]]:
    seen: set[int] = set()
    out = []
    for ch in changes:
        q = sim.quantizer_at(ch.place)
        if q is not None and id(q) not in seen:
            seen.add(id(q))
            out.append((ch.place, q))
    return out


def _encoding(q: QuantizerBase) -> Any:
    return q.get_encoding() if q.needs_encoding and q.is_initialized() else None


def _describe_candidate(sim: QuantizationSimModel, c: Candidate, layers: Any) -> None:
    """Layers touched, modules whose first call bounds where the forward can start to differ, params."""
    graph = sim.graph
    layer_ids: list[int] = []
    for ch in c.changes:
        if ch.place.kind is PlaceKind.MODEL_INPUT:
            c.cut_modules = []  # the very first values change: no prefix to reuse
            layer_ids = []
            break
        if ch.place.kind is PlaceKind.PARAM:
            ref = graph.layers[ch.place.layer].params[str(ch.place.slot)]
            layer_ids.extend(sim.param_layers(ref.key))
        else:
            layer_ids.append(ch.place.layer)
    else:
        modules = {}
        for index in dict.fromkeys(layer_ids):
            # a functional call runs inside its caller's forward: the caller's start bounds it
            module = sim.named_module(graph.layers[index].module_name)
            if module is None or module is sim.model:
                modules = {}
                break
            modules[id(module)] = module
        c.cut_modules = list(modules.values())
    c.layer_names = list(dict.fromkeys(graph.layers[i].name for i in layer_ids))
    c.profile_targets = [c.name]
    if c.module is None:
        refs = {ref.key: ref for i in layer_ids for ref in graph.layers[i].params.values()}
        c.params = sum(sim.model.get_submodule(r.owner)._parameters[r.attr].numel() for r in refs.values())
        return
    modules = [(c.name, c.module)]
    if layers is not None:
        prefix = "" if c.name == "<root>" else c.name + "."
        modules = [(prefix + n, m) for n, m in c.module.named_modules() if _is_layer(m, n, layers)]
        c.profile_targets = [n for n, _ in modules]
    params = {id(p): p.numel() for _, m in modules for p in m.parameters()}
    c.params = sum(params.values())


def _is_layer(module: nn.Module, name: str, layers: Any) -> bool:
    return isinstance(layers, type) and isinstance(module, layers) and not _internal(name, module)


def _describe(target: Any) -> str:
    return getattr(target, "__name__", None) or repr(target)

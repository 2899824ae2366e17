"""The quantized forward: leaf-module wrappers, the functional-call mode, and model-input quantizers.

Leaf modules of ``sim.model`` get a subclass of their own class (so ``isinstance`` and
attribute access keep working) whose forward quantizes inputs, parameters and outputs
around the original forward. The root module's forward enters a ``TorchFunctionMode``
that finds each captured functional call site and quantizes it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from mixprec.capture import op_types as ops
from mixprec.capture.callsite import CallSiteKey, caller_key
from mixprec.errors import CaptureError


def _quantize_leaves(value: Any, quantizers: nn.ModuleList) -> Any:
    """Apply ``quantizers[k]`` to the k-th non-parameter tensor leaf of ``value``."""
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        q = quantizers[0] if len(quantizers) else None
        return value if q is None else q(value)
    leaves, spec = pytree.tree_flatten(value)
    slot = 0
    changed = False
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and not isinstance(leaf, nn.Parameter):
            q = quantizers[slot] if slot < len(quantizers) else None
            slot += 1
            if q is not None:
                leaves[i] = q(leaf)
                changed = True
    return pytree.tree_unflatten(leaves, spec) if changed else value


class LayerQuantizers(nn.Module):
    """The quantizers of one layer (call site): per input slot, per output slot, per param.

    Entries are ``None`` where the layer has no quantizer. A parameter shared by several
    layers has one quantizer object, referenced from each of them.
    """

    def __init__(self, n_inputs: int, n_outputs: int, param_keys: list[str]) -> None:
        super().__init__()
        self.input_quantizers = nn.ModuleList([None] * n_inputs)
        self.output_quantizers = nn.ModuleList([None] * n_outputs)
        self.param_quantizers = nn.ModuleDict({k: None for k in param_keys})

    def has_input_quantizers(self) -> bool:
        return any(q is not None for q in self.input_quantizers)

    def quantize_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not self.has_input_quantizers():
            return args, kwargs
        return _quantize_leaves((args, kwargs), self.input_quantizers)

    def quantize_outputs(self, output: Any) -> Any:
        return _quantize_leaves(output, self.output_quantizers)


def quantized_param(q: nn.Module, param: torch.Tensor) -> torch.Tensor:
    """``q(param)``, reused across forwards while neither the parameter nor the encoding changed.

    Only where no gradient flows (inference, calibration of later layers): training must see a
    fresh fake-quant node every step.
    """
    if (torch.is_grad_enabled() and param.requires_grad) or getattr(q, "is_calibrating", False):
        return q(param)
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _is_fake(param):
        return q(param)  # a tracer must see the quantizer, not a cached real tensor
    key = (
        param.data_ptr(),
        param._version,
        param.dtype,
        *((b.data_ptr(), b._version) for b in q.buffers(recurse=False)),
    )
    cached = q.__dict__.get("_mixprec_param_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    result = q(param)
    q.__dict__["_mixprec_param_cache"] = (key, result)
    return result


def _is_fake(t: torch.Tensor) -> bool:
    try:
        t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return True
    return t.device.type == "meta"


def param_key(name: str) -> str:
    """ModuleDict keys cannot hold dots: ``out_proj.weight`` is stored as ``out_proj:weight``."""
    return name.replace(".", ":")


class SimRuntime:
    """Per-sim state shared by the wrappers: call counters for the current forward."""

    def __init__(self) -> None:
        self.in_forward = False
        self.leaf_depth = 0
        self.counts: dict[Any, int] = {}
        self.sites: dict[CallSiteKey, list[FunctionalSite | None]] = {}
        self.layer_functions: frozenset = frozenset()
        self.input_quantizers: nn.ModuleList | None = None
        self.required: dict[CallSiteKey, int] = {}

    def finalize(self) -> None:
        """Precompute, per code location, how many calls must happen for all its layers to run."""
        # Only layers that can hold a quantizer matter: a skipped integer op (mask arithmetic
        # that takes another path under tracing) loses nothing.
        self.required = {
            key: max(i for i, site in enumerate(sites) if site is not None and site.has_places) + 1
            for key, sites in self.sites.items()
            if any(site is not None and site.has_places for site in sites)
        }

    def check_all_sites_ran(self) -> None:
        """A captured functional layer that did not run means the forward took another path,
        and whatever replaced it ran unquantized: say so instead of returning silent floats."""
        counts = self.counts
        for key, needed in self.required.items():
            ran = counts.get(key, 0)
            if ran < needed:
                missed = self.sites[key][ran:needed]
                name = next(site.name for site in missed if site is not None)
                raise CaptureError(
                    f"layer {name!r} ({ops.function_name(self.sites[key][needed - 1].func)}) did not run in this "
                    "forward: the model's control flow differs from the dummy_input run, so part of it would run "
                    "unquantized. Build the sim with a dummy_input that takes the same path."
                )

    def next_site(self, key: Any, sites: list) -> Any:
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        return sites[n] if n < len(sites) else None


class FunctionalSite:
    """One captured functional call: the function expected there and its quantizers."""

    def __init__(
        self,
        name: str,
        func: Callable,
        quantizers: LayerQuantizers,
        params: list[str],
        has_places: bool = True,
    ) -> None:
        self.name = name
        self.has_places = has_places
        self.func = func
        self.quantizers = quantizers
        self.param_order = [param_key(p) for p in params]
        self.in_place = ops.is_in_place(func)
        self.dunder_in_place = getattr(func, "__name__", "").startswith("__i")

    def call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        if func is not self.func:
            raise CaptureError(
                f"layer {self.name!r}: the forward called {ops.function_name(func)} where the capture "
                f"recorded {ops.function_name(self.func)}; the model's control flow differs from the "
                "dummy_input run. Build the sim with a dummy_input that takes the same path."
            )
        q = self.quantizers
        pq = q.param_quantizers
        if q.has_input_quantizers() or any(pq[k] is not None for k in self.param_order):
            args, kwargs = self._quantize_arguments(args, kwargs)
        output = func(*args, **kwargs)
        oq = q.output_quantizers[0] if len(q.output_quantizers) else None
        if oq is None:
            return output
        if self.in_place and not self.dunder_in_place:
            target = args[0]
            with torch.no_grad():
                target.copy_(oq(target))
            return output
        return q.quantize_outputs(output)

    def _quantize_arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        slot = n_param = 0
        q = self.quantizers
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, nn.Parameter):
                if n_param < len(self.param_order):
                    pq = q.param_quantizers[self.param_order[n_param]]
                    if pq is not None:
                        leaves[i] = pq(leaf)
                n_param += 1
            elif isinstance(leaf, torch.Tensor):
                iq = q.input_quantizers[slot] if slot < len(q.input_quantizers) else None
                if iq is not None:
                    leaves[i] = iq(leaf)
                slot += 1
        return pytree.tree_unflatten(leaves, spec)


class QuantizationMode(TorchFunctionMode):
    """Active during ``sim.model``'s forward: routes captured functional calls to their quantizers."""

    def __init__(self, runtime: SimRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        rt = self.runtime
        if rt.leaf_depth or func not in rt.layer_functions:
            return func(*args, **kwargs)
        key = caller_key()
        sites = rt.sites.get(key)
        if sites is None:
            return func(*args, **kwargs)
        site = rt.next_site(key, sites)
        if site is None:
            return func(*args, **kwargs)
        return site.call(func, args, kwargs)


class QuantizedLeaf:
    """Mixin placed before a leaf module's own class: quantizes around its forward."""

    mixprec_sites: nn.ModuleList
    _mixprec_runtime: SimRuntime
    _mixprec_param_slots: list[tuple[nn.Module, str, str]]

    @property
    def input_quantizers(self) -> nn.ModuleList:
        return self.mixprec_sites[0].input_quantizers

    @property
    def output_quantizers(self) -> nn.ModuleList:
        return self.mixprec_sites[0].output_quantizers

    @property
    def param_quantizers(self) -> nn.ModuleDict:
        return self.mixprec_sites[0].param_quantizers

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rt = self._mixprec_runtime
        sites = self.mixprec_sites
        site = sites[0]
        if len(sites) > 1 and rt.in_forward:
            site = rt.next_site(id(self), sites)
            if site is None:
                raise CaptureError(
                    f"module {type(self).__name__} was called more times in this forward than in the "
                    f"capture run ({len(sites)}); build the sim with a dummy_input that takes the same path"
                )
        swapped = []
        pq = site.param_quantizers
        # Quantizer math runs inside the depth guard too, so the mode passes it straight through.
        rt.leaf_depth += 1
        try:
            args, kwargs = site.quantize_inputs(args, kwargs)
            for owner, attr, key in self._mixprec_param_slots:
                q = pq[key]
                if q is not None:
                    original = owner._parameters[attr]
                    swapped.append((owner, attr, original))
                    owner._parameters[attr] = quantized_param(q, original)
            output = super().forward(*args, **kwargs)
            return site.quantize_outputs(output)
        finally:
            for owner, attr, original in swapped:
                owner._parameters[attr] = original
            rt.leaf_depth -= 1


class QuantizedRoot:
    """Mixin placed before the root module's class: quantizes model inputs, enters the mode."""

    _mixprec_runtime: SimRuntime

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rt = self._mixprec_runtime
        if rt.in_forward:
            return super().forward(*args, **kwargs)
        rt.in_forward = True
        rt.counts.clear()
        try:
            if rt.input_quantizers is not None and any(q is not None for q in rt.input_quantizers):
                args, kwargs = _quantize_leaves((args, kwargs), rt.input_quantizers)
            with QuantizationMode(rt):
                output = super().forward(*args, **kwargs)
            rt.check_all_sites_ran()
            return output
        finally:
            rt.in_forward = False
            rt.leaf_depth = 0


class SequentialRootView:
    """For an ``nn.Sequential`` root: its forward, ``len`` and indexing see only the model's own
    children, not the quantizer holders mixprec registers on the root."""

    def _own_children(self) -> list[nn.Module]:
        return [m for name, m in self._modules.items() if not name.startswith("mixprec_")]

    def __iter__(self):
        return iter(self._own_children())

    def __len__(self) -> int:
        return len(self._own_children())

    def __getitem__(self, idx: int | slice) -> nn.Module:
        children = self._own_children()
        return nn.Sequential(*children[idx]) if isinstance(idx, slice) else children[idx]


_CLASS_CACHE: dict[tuple[type, ...], type] = {}
_CLASS_MODULE = sys.modules[__name__]


def quantized_class(cls: type, *, leaf: bool, root: bool) -> type:
    """A subclass of ``cls`` with the wrappers mixed in, cached and picklable by name."""
    sequential_root = root and issubclass(cls, nn.Sequential)
    mixins = tuple(
        m
        for m, on in ((QuantizedRoot, root), (SequentialRootView, sequential_root), (QuantizedLeaf, leaf))
        if on
    )
    key = (*mixins, cls)
    if key not in _CLASS_CACHE:
        name = f"Quantized{'Root' if root else ''}{cls.__name__}"
        while hasattr(_CLASS_MODULE, name):
            name += "_"
        new = type(name, (*mixins, cls), {"__module__": __name__, "_mixprec_original_class": cls})
        setattr(_CLASS_MODULE, name, new)
        _CLASS_CACHE[key] = new
    return _CLASS_CACHE[key]


def original_class(module: nn.Module) -> type:
    return getattr(type(module), "_mixprec_original_class", type(module))

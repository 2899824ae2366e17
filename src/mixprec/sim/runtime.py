"""The quantized forward: per-instance forward wrappers, scope hooks and the functional-call mode.

Nothing is class-swapped (see docs/capture.md): each leaf module of ``sim.model`` gets an instance
``forward`` (a :class:`LeafForward`) that quantizes inputs, parameters and outputs; every other
module gets forward pre/post hooks that keep the stack of executing modules; the root gets a
``RootForward`` that quantizes the model inputs and enters a ``QuantizationMode`` for the duration
of the forward (both in :mod:`mixprec.sim.mode`). All of these are plain picklable objects, so ``torch.save``,
``copy.deepcopy`` and ``torch.compile`` see ordinary modules.

Per-forward state (:class:`ForwardState`: the scope stack, call counters) lives in a thread-local
slot of the sim's :class:`SimRuntime` (a plain attribute while dynamo traces, which it can follow),
never in process globals, so threads and sims do not interfere.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from mixprec.capture import sdpa
from mixprec.capture.callsite import SiteKey, canonical_name
from mixprec.errors import CaptureError
from mixprec.sim.forwards import LeafForward, quantize_leaves
from mixprec.sim.rootview import original_class, quantized_class
from mixprec.sim.sitecall import FunctionalSite
from mixprec.sim.weight_cache import MIN_CACHED, WeightCache

__all__ = [
    "ForwardState", "FunctionalSite", "LayerQuantizers", "LeafForward", "SimRuntime", "original_class",
    "param_key", "quantized_class",
]  # fmt: skip

MISSING = object()
# per-process state of a runtime, rebuilt on unpickling
_TRANSIENT = {"_local", "_trace_state", "_param_cache", "_lock", "factory", "tracing", "_counted_memo"}


def param_key(name: str) -> str:
    """ModuleDict keys cannot hold dots: ``out_proj.weight`` is stored as ``out_proj:weight``."""
    return name.replace(".", ":")


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

    # hot paths read ``_modules`` directly: nn.Module.__getattr__ is a Python call per attribute
    def has_input_quantizers(self) -> bool:
        for q in self._modules["input_quantizers"]._modules.values():
            if q is not None:
                return True
        return False

    def quantize_inputs(self, args: tuple, kwargs: dict, rt: SimRuntime) -> tuple[tuple, dict]:
        if not self.has_input_quantizers():
            return args, kwargs
        return quantize_leaves((args, kwargs), self._modules["input_quantizers"], rt)

    def quantize_outputs(self, output: Any, rt: SimRuntime) -> Any:
        return quantize_leaves(output, self._modules["output_quantizers"], rt)

    def all_quantizers(self) -> list[nn.Module]:
        found = [*self.input_quantizers, *self.output_quantizers, *self.param_quantizers.values()]
        return [q for q in found if q is not None]


class Tracing(Protocol):
    """What export installs on a runtime while it traces: a marker instead of each quantizer."""

    def mark(self, q: nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    def unseen(self, module: str, call: str) -> None:
        """A call the sim's forwards never made ran under the trace (it runs unquantized)."""


class SiteFactory(Protocol):
    """Creates the quantizers of a call site first seen at run time (implemented by the sim)."""

    def new_function_site(
        self, key: SiteKey, func: Callable, args: tuple, kwargs: dict, output: Any
    ) -> FunctionalSite | None: ...

    def new_module_site(
        self, name: str, index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> LayerQuantizers | None: ...


class ForwardState:
    """One forward of ``sim.model`` in one thread: executing modules and call counters.

    ``scope`` holds qualified names of the executing non-leaf modules of the model; ``None`` marks
    a module that is not part of the model (run from inside it), whose calls are left alone.
    ``opened_by`` names the submodule whose own call started this forward (``generate()`` calls
    an encoder-decoder's encoder directly); None for a forward of ``sim.model`` itself.
    """

    __slots__ = ("counts", "leaf_depth", "mode", "opened_by", "rt", "scope")

    def __init__(self, rt: SimRuntime, opened_by: str | None = None) -> None:
        self.rt = rt
        self.scope: list[str | None] = [""]
        self.counts: dict[Any, int] = {}
        self.leaf_depth = 0
        self.mode: TorchFunctionMode | None = None  # the mode of this forward, once entered (eager)
        self.opened_by = opened_by

    def pop_mode(self) -> TorchFunctionMode | None:
        """Take this forward's mode off the torch-function mode stack if it is on top (a leaf's own
        calls are never sites, and each call under a mode costs a Python call); returns it, to push
        back after the leaf, or None where nothing was popped."""
        mode = self.mode
        if mode is None or not torch._C._len_torch_function_stack():
            return None
        top = torch._C._pop_torch_function_stack()
        if top is not mode:
            torch._C._push_on_torch_function_stack(top)
            return None
        return mode


class SimRuntime:
    """Per-sim runtime state shared by the wrappers, hooks and mode of one ``sim.model``.

    Attributes:
        sites: functional call sites -> their quantizers (None: that call is not quantized).
        counted: canonical names of functions whose calls need a site identity.
        factory: creates sites first seen at run time; None in a model unpickled without its sim.
        calibration_scheme: set while ``compute_encodings`` runs, so new quantizers observe.
        tracing: set while export traces, so quantizers become markers.
        cache_weights: reuse fake-quantized parameters across inference forwards (see
            docs/performance.md); False trades speed for no memory.
    """

    # model_inputs.InputSlots: which argument takes which input quantizer (a class default for
    # runtimes pickled before it existed, which take them by position)
    input_slots: Any = None

    def __init__(self) -> None:
        self.sites: dict[SiteKey, FunctionalSite | None] = {}
        self.counted: frozenset[str] = frozenset()
        self.input_quantizers: nn.ModuleList | None = None
        self.factory: SiteFactory | None = None
        self.calibration_scheme: Any = None
        self.tracing: Tracing | None = None
        self.cache_weights = True
        self._init_transient()

    def _init_transient(self) -> None:
        self._local = threading.local()
        self._trace_state: ForwardState | None = None
        self._param_cache = WeightCache()
        self._lock = threading.RLock()
        self._counted_memo: tuple[frozenset[str], dict[Any, str | None]] = (self.counted, {})

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}

    def counted_name(self, func: Callable) -> str | None:
        """``func``'s canonical name if its calls are counted (or it is sdpa), else None; memoized
        per function object for the current ``counted`` (the mode asks for every torch call)."""
        memo = self._counted_memo
        if memo[0] is not self.counted:
            memo = self._counted_memo = (self.counted, {})
        try:
            return memo[1][func]
        except (KeyError, TypeError):
            pass
        canonical = canonical_name(func)
        found = canonical if canonical in self.counted or canonical == sdpa.NAME else None
        try:
            memo[1][func] = found
        except TypeError:  # an unhashable callable is not memoized
            pass
        return found

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.factory = None
        self.tracing = None
        self._init_transient()

    # per-forward state ------------------------------------------------------------------
    def state(self) -> ForwardState | None:
        """The forward in progress in this thread (under dynamo: the one being traced)."""
        if torch.compiler.is_compiling():
            return self._trace_state
        return self._local.__dict__.get("state")

    def set_state(self, state: ForwardState | None) -> None:
        if not torch.compiler.is_compiling():
            self._local.state = state
        # also in eager: when a graph break makes dynamo run this forward eagerly, the frames it
        # compiles on their own inside it (hooks, leaf forwards) read the traced slot
        self._trace_state = state

    # quantizer application --------------------------------------------------------------
    def apply(self, q: nn.Module, x: torch.Tensor) -> torch.Tensor:
        tracing = self.tracing
        if tracing is not None:
            return tracing.mark(q, x)
        if q._forward_pre_hooks or q._forward_hooks or q._backward_hooks or q._backward_pre_hooks:
            return q(x)
        # the sim's own modules: called directly in eager mode, without nn.Module.__call__ and its hooks
        return q(x) if torch.compiler.is_compiling() else q.forward(x)

    def quantized_param(self, q: nn.Module, param: torch.Tensor) -> torch.Tensor:
        """``q(param)``, reused across forwards while valid (:class:`~mixprec.sim.weight_cache.WeightCache`)
        where no gradient flows: training must see a fresh fake-quant node every step."""
        if self.tracing is not None:
            return self.tracing.mark(q, param)
        if param.numel() < MIN_CACHED and q.__dict__.get("_uint8") is not None:
            return self.apply(q, param)  # never cached (WeightCache.get): skip the checks below
        if (
            not self.cache_weights
            or (param.requires_grad and torch.is_grad_enabled())
            or getattr(q, "_observing", False)
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()
        ):
            return self.apply(q, param)
        return self._param_cache.get(q, param, self.apply, self._local.__dict__.get("state"))

    def clear_cache(self) -> None:
        """Drop the cached fake-quantized parameters (they are rebuilt on the next forward)."""
        self._param_cache.clear()

    # sites first seen at run time ---------------------------------------------------------
    def new_function_call(self, func: Callable, key: SiteKey, args: tuple, kwargs: dict) -> Any:
        name = f"{key[0]}.{key[1]}" if key[0] else key[1]
        if self.tracing is None and torch.compiler.is_compiling():
            if not any(
                isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.is_floating_point()
                for t in pytree.tree_leaves((args, kwargs))
            ):
                return func(*args, **kwargs)  # masks, indices, shapes: no site, as in eager
            from mixprec.sim import compiled

            what = f"function call {name} (call {key[2]} of {key[1]} in its module)"
            compiled.announce(what)
            return compiled.run_eagerly(self.new_function_call, func, key, args, kwargs)
        output = func(*args, **kwargs)
        if self.tracing is not None:
            # export checks on its own which quantizers reached the graph
            self.tracing.unseen(key[0], key[1])
            return output
        self._check_can_grow(f"function call {name} (call {key[2]} in its module)")
        with self._lock:
            site = self.sites.get(key, MISSING)
            if site is MISSING:
                site = self.factory.new_function_site(key, func, args, kwargs, output)
                self.sites[key] = site
        if site is None:
            return output
        q = site.quantizers
        if site.written is not None:
            # a cache write in place already stored the new states: store them again, quantized
            self._finish_new(q, site.name)
            return site.call(func, args, kwargs, self)
        if self._finish_new(q, site.name):
            q.quantize_inputs(args, kwargs, self)  # observing: records, returns values unchanged
            return q.quantize_outputs(output, self)
        if site.in_place:
            return site.quantize_in_place(args, output, self)
        return site.call(func, args, kwargs, self)

    def new_module_call(self, wrapper: LeafForward, index: int, args: tuple, kwargs: dict) -> Any:
        module = wrapper.module
        label = wrapper.name if index == 0 else f"{wrapper.name}#{index}"
        if self.tracing is None and torch.compiler.is_compiling():
            from mixprec.sim import compiled

            what = f"module {label} ({type(module).__name__})"
            compiled.announce(what)
            return compiled.run_eagerly(self.new_module_call, wrapper, index, args, kwargs)
        output = wrapper.original(*args, **kwargs)
        if self.tracing is not None:
            self.tracing.unseen(wrapper.name, "")
            return output
        self._check_can_grow(f"module {label} ({type(module).__name__})")
        with self._lock:
            sites = module._modules.get("mixprec_sites")
            if sites is None or index >= len(sites):
                lq = self.factory.new_module_site(wrapper.name, index, module, args, kwargs, output)
            else:
                lq = sites[index]
        if lq is None:
            return output
        if self._finish_new(lq, label):
            lq.quantize_inputs(args, kwargs, self)
            return lq.quantize_outputs(output, self)
        return wrapper.run(lq, args, kwargs)

    def _check_can_grow(self, what: str) -> None:
        if self.factory is None:
            raise CaptureError(
                f"{what} did not run when the sim was built, and this model was loaded without its "
                "QuantizationSimModel, so it cannot get quantizers: build the sim with a dummy_input "
                "taking this path, or keep the sim (copy.deepcopy(sim) keeps it)"
            )

    def _finish_new(self, lq: LayerQuantizers, name: str) -> bool:
        """True while calibrating (the new quantizers observe); raise if they need encodings."""
        quantizers = lq.all_quantizers()
        if any(getattr(q, "is_calibrating", False) for q in quantizers):
            return True
        missing = [q.label for q in quantizers if q.needs_encoding and not q.is_initialized()]
        if missing:
            from mixprec.errors import EncodingNotComputedError

            raise EncodingNotComputedError(
                f"layer {name!r} first ran in this forward, on a path dummy_input did not take; it now has "
                f"quantizers from the config defaults ({', '.join(missing)}) without encodings: run "
                "sim.compute_encodings(forward_pass_callback, args) on data that takes this path"
            )
        return False

"""The functional-call mode and the hooks that drive it: the other half of :mod:`mixprec.sim.runtime`.

:class:`RootForward` (the root's instance ``forward``) starts a :class:`~mixprec.sim.runtime.ForwardState`
and enters a :class:`QuantizationMode` for the forward; :class:`ScopeHook` keeps the stack of executing
non-leaf modules, which names the scope of each functional call site (see docs/capture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mixprec.capture import sdpa
from mixprec.capture.callsite import canonical_name
from mixprec.sim import foreign
from mixprec.sim.forwards import OwnForwardView, quantize_leaves
from mixprec.sim.runtime import MISSING, ForwardState, SimRuntime

__all__ = ["QuantizationMode", "RootForward", "ScopeHook"]


class QuantizationMode(TorchFunctionMode):
    """Active during ``sim.model``'s forward: routes functional calls to their sites' quantizers."""

    def __init__(self, runtime: SimRuntime, state: ForwardState, publish: bool = False) -> None:
        super().__init__()
        self.runtime = runtime
        self.fstate = state
        self.publish = publish

    # with publish (compiled forwards), entering makes ``state`` the runtime's forward in progress
    # and leaving clears it, also when the forward raises: dynamo resumes a graph broken inside a
    # mode's ``with`` block, but not one broken inside try/finally (see RootForward)
    def __enter__(self) -> QuantizationMode:
        if self.publish:
            self.runtime.set_state(self.fstate)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if self.publish:
            self.runtime.set_state(None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # the mode sees every torch call outside leaf modules (shape reads, views, indexing): the
        # pass-through of a call that is never a site is kept to a few attribute reads
        st = self.fstate
        if st.leaf_depth or st.scope[-1] is None:
            return func(*args, **kwargs) if kwargs else func(*args)
        if torch.compiler.is_compiling():
            canonical = canonical_name(func)
        else:
            rt = self.runtime
            memo = rt._counted_memo  # SimRuntime.counted_name's memo, read inline
            try:
                canonical = memo[1][func] if memo[0] is rt.counted else rt.counted_name(func)
            except (KeyError, TypeError):
                canonical = rt.counted_name(func)
            if canonical is None:  # most calls: nothing to count, look up or quantize
                return func(*args, **kwargs) if kwargs else func(*args)
        if kwargs is None:
            kwargs = {}
        if canonical == sdpa.NAME:
            return sdpa.decomposed_sdpa(self.dispatch, *args, **kwargs)
        return self.dispatch(func, args, kwargs, canonical)

    def dispatch(self, func: Callable, args: tuple, kwargs: dict, canonical: str | None = None) -> Any:
        """Run one functional call at its site: counted, looked up, quantized (or grown)."""
        st, rt = self.fstate, self.runtime
        scope = st.scope[-1]
        if canonical is None:
            canonical = canonical_name(func) if torch.compiler.is_compiling() else rt.counted_name(func)
        if canonical is None or canonical not in rt.counted:
            return func(*args, **kwargs)
        counts = st.counts
        counter = (scope, canonical)
        ordinal = counts.get(counter, 0)
        counts[counter] = ordinal + 1
        key = (scope, canonical, ordinal)
        site = rt.sites.get(key, MISSING)
        if site is None:
            return func(*args, **kwargs)
        if site is MISSING:
            return rt.new_function_call(func, key, args, kwargs)
        return site.call(func, args, kwargs, rt)


class ScopeHook:
    """Forward pre/post hook of a non-leaf module: pushes/pops its name on the forward's scope.

    A module of the sim called on its own, outside any forward of ``sim.model`` (``generate()``
    runs an encoder-decoder's encoder so), opens a forward of its own: its functional calls are the
    same sites, with the same per-forward ordinals, as inside the root's forward.
    """

    def __init__(
        self,
        runtime: SimRuntime,
        name: str,
        enter: bool,
        names: tuple[str, ...] = (),
        model_inputs_read: frozenset[int] = frozenset(),
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.enter = enter
        self.positional_names = names  # of the module's forward, for _quantize_model_inputs
        self.model_inputs_read = model_inputs_read  # indices of the float model inputs read inside

    def __call__(self, module: nn.Module, args: Any, *rest: Any) -> Any:
        # rest: the keyword arguments (a pre-hook registered with_kwargs) or the output
        rt = self.runtime
        if torch.compiler.is_compiling():
            st = rt._trace_state
        else:
            st = rt._local.__dict__.get("state")
            if self.enter and "_gradient_checkpointing_func" in module.__dict__:
                _checkpoint_in_scope(module, rt, self.name)
        if st is None:
            if not self.enter:
                return None
            inputs = None
            if rest and self.__dict__.get("model_inputs_read") and rt.input_slots is not None:
                inputs = self._quantize_model_inputs(args, rest[0])  # before the mode is on
            _open(rt, self.name)
            return inputs
        if not self.enter and st.opened_by == self.name and len(st.scope) == 2:
            _close(rt, st)
            return
        if self.enter:
            st.scope.append(self.name)
        elif len(st.scope) > 1:
            st.scope.pop()
        return None

    def _quantize_model_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Arguments of a submodule called on its own that bear the name of a model input read
        inside it (an encoder's ``input_features``) take that input's quantizer, as they would
        have inside the model."""
        rt = self.runtime
        return rt.input_slots.quantize(
            args, kwargs, rt.input_quantizers, rt, self.positional_names, self.model_inputs_read
        )


def _open(rt: SimRuntime, name: str) -> None:
    """Start the forward of submodule ``name``, called on its own: ended by ``_close`` in its
    forward hook, which runs also when the forward raises (``always_call``)."""
    st = ForwardState(rt, opened_by=name)
    st.scope.append(name)
    if torch.compiler.is_compiling():
        # the mode publishes the state while traced, as RootForward's does; isolation is eager-only
        st.mode = QuantizationMode(rt, st, publish=True).__enter__()
        return
    rt.set_state(st)
    foreign.enter(st)
    st.mode = QuantizationMode(rt, st).__enter__()


def _close(rt: SimRuntime, st: ForwardState) -> None:
    if torch.compiler.is_compiling():
        st.mode.__exit__(None, None, None)  # type: ignore[union-attr]
        return
    try:
        st.mode.__exit__(None, None, None)  # type: ignore[union-attr]
    finally:
        foreign.leave(st)
        rt.set_state(None)


class InScope:
    """A function a transformers layer hands to its checkpoint function: ``forward`` of that
    layer. The backward pass recomputes it outside any module call (transformers checkpoints
    ``forward``, not ``__call__``, so the layer's scope hook does not run): then it opens the
    layer's forward itself, so the recomputation quantizes what the forward did."""

    def __init__(self, fn: Callable, runtime: SimRuntime, name: str) -> None:
        self.fn = fn
        self.runtime = runtime
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rt = self.runtime
        if torch.compiler.is_compiling() or rt._local.__dict__.get("state") is not None:
            return self.fn(*args, **kwargs)  # the forward itself: its scope hook ran
        _open(rt, self.name)
        st = rt._local.__dict__["state"]
        try:
            return self.fn(*args, **kwargs)
        finally:
            _close(rt, st)


class CheckpointInScope:
    """Replaces a transformers layer's ``_gradient_checkpointing_func`` (set by
    ``gradient_checkpointing_enable()``): the same checkpoint function, of an ``InScope`` function."""

    def __init__(self, checkpoint: Callable, runtime: SimRuntime, name: str) -> None:
        self.checkpoint = checkpoint
        self.runtime = runtime
        self.name = name

    def __call__(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return self.checkpoint(InScope(fn, self.runtime, self.name), *args, **kwargs)


def _checkpoint_in_scope(module: nn.Module, rt: SimRuntime, name: str) -> None:
    checkpoint = module.__dict__["_gradient_checkpointing_func"]
    if not isinstance(checkpoint, CheckpointInScope):
        module.__dict__["_gradient_checkpointing_func"] = CheckpointInScope(checkpoint, rt, name)


def _quantize_model_inputs(
    rt: SimRuntime, iq: nn.ModuleList, args: tuple, kwargs: dict
) -> tuple[tuple, dict]:
    slots = rt.input_slots
    if slots is None:  # a runtime pickled before arguments were matched by name
        return quantize_leaves((args, kwargs), iq, rt)
    return slots.quantize(args, kwargs, iq, rt)


class RootForward(OwnForwardView):
    """The root's instance ``forward``: quantizes model inputs and runs the forward in the mode."""

    def __init__(self, module: nn.Module, runtime: SimRuntime) -> None:
        self.module = module
        self.runtime = runtime

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rt = self.runtime
        original = type(self.module).forward
        iq = rt.input_quantizers
        if torch.compiler.is_compiling():
            # no try/finally here: a graph break in it (a site first met under compile, see
            # sim/compiled.py) would make dynamo run this whole forward as many small graphs;
            # the mode publishes and clears the state instead. The traced slot is not read here:
            # it may hold an eager forward's state (set_state), which is no re-entry of this one.
            # Isolation is eager-only.
            st = ForwardState(rt)
            if iq is not None and any(q is not None for q in iq._modules.values()):
                args, kwargs = _quantize_model_inputs(rt, iq, args, kwargs)
            with QuantizationMode(rt, st, publish=True):
                return original(self.module, *args, **kwargs)
        if rt.state() is not None:  # the root re-entered from its own forward: nothing new to set up
            return original(self.module, *args, **kwargs)
        if rt.input_slots is not None:
            rt.input_slots.tell_unquantized(args, kwargs)
        st = ForwardState(rt)
        rt.set_state(st)
        foreign.enter(st)
        try:
            if iq is not None and any(q is not None for q in iq._modules.values()):
                args, kwargs = _quantize_model_inputs(rt, iq, args, kwargs)
            with QuantizationMode(rt, st) as mode:
                st.mode = mode
                return original(self.module, *args, **kwargs)
        finally:
            foreign.leave(st)
            rt.set_state(None)

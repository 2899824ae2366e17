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
    """Forward pre/post hook of a non-leaf module: pushes/pops its name on the forward's scope."""

    def __init__(self, runtime: SimRuntime, name: str, enter: bool) -> None:
        self.runtime = runtime
        self.name = name
        self.enter = enter

    def __call__(self, module: nn.Module, args: Any, *rest: Any) -> None:
        rt = self.runtime
        st = rt._trace_state if torch.compiler.is_compiling() else rt._local.__dict__.get("state")
        if st is None:
            return
        if self.enter:
            st.scope.append(self.name)
        elif len(st.scope) > 1:
            st.scope.pop()


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
                args, kwargs = quantize_leaves((args, kwargs), iq, rt)
            with QuantizationMode(rt, st, publish=True):
                return original(self.module, *args, **kwargs)
        if rt.state() is not None:  # the root re-entered from its own forward: nothing new to set up
            return original(self.module, *args, **kwargs)
        st = ForwardState(rt)
        rt.set_state(st)
        foreign.enter(st)
        try:
            if iq is not None and any(q is not None for q in iq._modules.values()):
                args, kwargs = quantize_leaves((args, kwargs), iq, rt)
            with QuantizationMode(rt, st) as mode:
                st.mode = mode
                return original(self.module, *args, **kwargs)
        finally:
            foreign.leave(st)
            rt.set_state(None)

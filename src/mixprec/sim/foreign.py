"""Keeping modules that are not part of ``sim.model`` out of its quantization.

A model run from inside the sim's forward (a forward hook calling another model, a second sim)
must not have its functional calls taken for the sim's. While at least one eager sim forward is
in progress in the process, global module hooks mark, in each active forward of the calling
thread, the execution of any module that is not one of that sim's (scope ``None``): the mode and
the leaf wrappers leave everything under it alone. Parameter-free modules without children that
belong to no sim (activations created during the forward) are not marked: capture sees through
them, so the runtime does too. The hooks are registered only while a sim
forward runs, and cost other threads one thread-local lookup per module call meanwhile.
"""

from __future__ import annotations

import threading
from typing import Any

from torch import nn
from torch.nn.modules import module as module_hooks

_local = threading.local()
_lock = threading.Lock()
_users = 0
_handles: list[Any] = []


def _active() -> list[Any] | None:
    return _local.__dict__.get("active")


def _foreign(module: nn.Module, st: Any) -> bool:
    """Whether ``module`` is outside ``st``'s model: another sim's, or a model of its own.

    A module without parameters or children that belongs to no sim (an activation created during
    the forward, e.g. transformers' ``ACT2FN["silu"]``, a new instance per lookup) is part of the
    forward that runs it: capture records its functional calls in the caller's scope, so the
    runtime counts them there too, or the calls after it would not line up with their sites.
    """
    owner = module.__dict__.get("_mixprec_runtime")
    if owner is st.rt:
        return False
    return owner is not None or bool(module._parameters) or bool(module._modules)


def _pre(module: nn.Module, args: Any) -> None:
    active = _active()
    if not active:
        return
    for st in active:
        if _foreign(module, st):
            st.scope.append(None)


def _post(module: nn.Module, args: Any, output: Any) -> None:
    active = _active()
    if not active:
        return
    for st in active:
        if _foreign(module, st) and len(st.scope) > 1:
            st.scope.pop()


def enter(state: Any) -> None:
    """Start watching for foreign modules during ``state``'s forward (this thread)."""
    global _users
    active = _active()
    if active is None:
        active = _local.active = []
    active.append(state)
    with _lock:
        _users += 1
        if _users == 1:
            _handles.append(module_hooks.register_module_forward_pre_hook(_pre))
            _handles.append(module_hooks.register_module_forward_hook(_post, always_call=True))


def leave(state: Any) -> None:
    global _users
    active = _active()
    if active and active[-1] is state:
        active.pop()
    with _lock:
        _users -= 1
        if _users == 0:
            for handle in _handles:
                handle.remove()
            _handles.clear()

"""Keeping modules that are not part of ``sim.model`` out of its quantization.

A model run from inside the sim's forward (a forward hook calling another model, a second sim)
must not have its functional calls taken for the sim's. While at least one eager sim forward is
in progress in the process, global module hooks mark, in each active forward of the calling
thread, the execution of any module that is not one of that sim's (scope ``None``): the mode and
the leaf wrappers leave everything under it alone. The hooks are registered only while a sim
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


def _pre(module: nn.Module, args: Any) -> None:
    active = _active()
    if not active:
        return
    owner = module.__dict__.get("_mixprec_runtime")
    for st in active:
        if owner is not st.rt:
            st.scope.append(None)


def _post(module: nn.Module, args: Any, output: Any) -> None:
    active = _active()
    if not active:
        return
    owner = module.__dict__.get("_mixprec_runtime")
    for st in active:
        if owner is not st.rt and len(st.scope) > 1:
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

"""Identifying the call site of a torch function call from the Python stack.

Capture and the quantized forward must agree on which call is which without tracing
tensors at run time. A call site is the first frame outside torch's own function
implementations: its code object and bytecode offset. Repeated executions of one site
(a loop over decoder layers) are told apart by their order within one forward.
"""

from __future__ import annotations

import sys
from types import CodeType

from mixprec.capture.op_types import is_torch_internal_module

CallSiteKey = tuple[CodeType, int]

_INTERNAL_CODE: dict[CodeType, bool] = {}
# The demo model is the one module of mixprec whose forward is user code.
_USER_CODE = frozenset({"mixprec.demo"})


def _is_internal(frame) -> bool:
    code = frame.f_code
    internal = _INTERNAL_CODE.get(code)
    if internal is None:
        name = frame.f_globals.get("__name__", "")
        internal = is_torch_internal_module(name) or (name.startswith("mixprec.") and name not in _USER_CODE)
        _INTERNAL_CODE[code] = internal
    return internal


def caller_key(skip: int = 2) -> CallSiteKey | None:
    """The (code, offset) of the nearest frame that is not torch or mixprec internals."""
    frame = sys._getframe(skip)
    while frame is not None:
        if not _is_internal(frame):
            return (frame.f_code, frame.f_lasti)
        frame = frame.f_back
    return None

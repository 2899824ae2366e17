"""A call site first met while ``torch.compile`` traces ``sim.model`` (see docs/capture.md).

No quantizer can be created inside a trace, and running such a call unquantized would be a silent
float. So the trace leaves the graph at that call (a ``torch.compiler.disable``'d function): the
call then runs eagerly, on real tensors, through the same code as an eager forward, which creates
the layer (name, quantizers from the config defaults, ``precision_table()`` row) and raises
``EncodingNotComputedError`` naming it until ``compute_encodings`` has calibrated it. The site is
then in the runtime's tables, so the next compiled forward retraces and quantizes it inside the
graph. Under ``fullgraph=True`` leaving the graph is an error of dynamo's; a warning logged while
tracing names the call, so the user knows which one.

Imported only while dynamo traces (importing ``torch._dynamo`` costs seconds).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch._dynamo.comptime import comptime

from mixprec.core.eager_escape import run_eagerly

__all__ = ["announce", "run_eagerly"]

logger = logging.getLogger(__name__)

_announced: set[tuple[str, str]] = set()


def _warn_at_trace(ctx: Any) -> None:
    # runs once per trace, while dynamo traces; the graph does not see it
    what = ctx.get_local("what").as_python_constant()
    # dynamo restarts a trace several times: one message per call per compiled frame
    key = (str(torch._guards.CompileContext.current_compile_id()), what)
    if key in _announced:
        return
    _announced.add(key)
    logger.warning(
        "%s first runs under torch.compile, on a path neither dummy_input nor an eager forward took: "
        "the compiled forward leaves the graph there to create its layer as an eager forward would "
        "(with fullgraph=True it cannot, and dynamo refuses); run sim.compute_encodings on data that "
        "takes this path, and the recompiled forward quantizes it in the graph",
        what,
    )


def announce(what: str) -> None:
    """Log, while tracing, which call is new (``what`` is read by name from this frame)."""
    comptime(_warn_at_trace)

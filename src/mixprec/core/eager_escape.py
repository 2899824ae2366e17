"""Leaving a ``torch.compile`` trace to run one Python call eagerly, on real tensors.

Code that may raise a mixprec error, or create quantizers, must not do so inside a dynamo trace:
an exception raised while tracing makes dynamo give up on whole frames (the compiled model then
runs as many small graphs whose caches can outlive the condition that raised), and objects
created while tracing are invisible to the graph. Such code calls :func:`run_eagerly` instead:
dynamo breaks the graph there (an error under ``fullgraph=True``) and the call runs eagerly, so
it raises or creates exactly as in an eager forward. docs/capture.md describes where mixprec uses it.

Imported only while dynamo traces (importing ``torch._dynamo`` costs seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

REASON = (
    "mixprec: a quantizer without an encoding, or a layer on a path the sim has not seen yet, is "
    "handled eagerly as in an eager forward; run sim.compute_encodings on data that takes this path"
)


def _call(fn: Callable, *args: Any) -> Any:
    return fn(*args)


try:
    run_eagerly = torch.compiler.disable(_call, reason=REASON)
except TypeError:  # torch < 2.6: no reason argument
    run_eagerly = torch.compiler.disable(_call)

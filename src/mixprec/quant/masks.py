"""Additive attention masks: values that stand for "masked", never for data.

Eager attention adds a mask to the scores: 0 where a position is visible, and the dtype's
minimum, ``-inf`` or a large negative constant (``-1e4``, ``-1e9``) where it is not. Such a
value in a tensor must neither set the quantizer's range (a range reaching -3.4e38 makes the
scale so coarse that every real score rounds to 0, even at int16) nor be clamped to that range
(a clamped mask no longer masks). The rule (docs/masks.md): an activation quantizer ignores
values at or below its ``mask_threshold`` while calibrating, and when it saw any, it passes such
values through unchanged afterwards while quantizing the others.
"""

from __future__ import annotations

import torch

MASK_THRESHOLD = -1e4
"""Default threshold of activation quantizers: values ``<= MASK_THRESHOLD`` are mask values.

-1e4 is the smallest constant common masks use (``(1 - mask) * -10000``); real activations
that negative are rare, and one that is only passes through unquantized.
"""


def drop_mask_values(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, bool]:
    """``x`` without its mask values (flattened when any were dropped), and whether it had any."""
    masked = x <= threshold
    if not bool(masked.any()):
        return x, False
    return x[~masked], True


def pass_mask_values(x: torch.Tensor, quantized: torch.Tensor, threshold: float) -> torch.Tensor:
    """``quantized`` where ``x`` holds data, ``x`` itself where it holds a mask value."""
    return torch.where(x <= threshold, x, quantized)


def check_threshold(value: float | None) -> float | None:
    """Validate a user-given threshold: None (no mask handling) or a finite negative number.

    Raises:
        ValueError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value < 0 or value != value:
        raise ValueError(f"mask_threshold must be None or a negative number, got {value!r}")
    return float(value)

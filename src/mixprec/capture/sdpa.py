"""``F.scaled_dot_product_attention`` as the calls eager attention makes, so each is a layer.

Inside a sim, a fused attention call would be one layer quantized only at q, k, v and its output.
Decomposed, it is the sequence of layers of transformers' eager attention: ``matmul`` (Q·K^T),
``mul`` (scale), the mask (an additive float mask, applied as a data-movement step
``attention_mask`` rather than a quantized ``add``), ``softmax`` (in float32) and ``matmul``
(weights·V). Requests on ``F.softmax`` / ``torch.matmul`` then reach them (see docs/capture.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

Call = Callable[[Callable, tuple, dict], Any]

NAME = "scaled_dot_product_attention"


def decomposed_sdpa(
    call: Call,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention computed by ``call(func, args, kwargs)`` for each step that can be a layer.

    Mask construction (causal and boolean masks made additive with the dtype's minimum, as eager
    attention does, so fully masked rows stay finite) is plain torch: masks are not layers.
    """
    if enable_gqa and key.size(-3) != query.size(-3):
        groups = query.size(-3) // key.size(-3)
        key = call(torch.repeat_interleave, (key, groups), {"dim": -3})
        value = call(torch.repeat_interleave, (value, groups), {"dim": -3})
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = call(torch.matmul, (query, call(torch.transpose, (key, -2, -1), {})), {})
    scores = call(torch.mul, (scores, factor), {})
    bias = _additive_mask(query, key, scores.dtype, attn_mask, is_causal)
    if bias is not None:
        scores = call(attention_mask, (scores, bias), {})
    weights = call(torch.softmax, (scores,), {"dim": -1, "dtype": torch.float32})
    weights = weights.to(query.dtype)
    if dropout_p > 0.0:
        weights = torch.dropout(weights, dropout_p, True)
    return call(torch.matmul, (weights, value), {})


def attention_mask(scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Adds the additive mask; a data-movement step (``op_types``), not a quantized ``add``: an
    output quantizer there would have to span the mask's -3e38 and erase the scores' resolution."""
    return scores + bias


def _additive_mask(
    query: torch.Tensor,
    key: torch.Tensor,
    dtype: torch.dtype,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
) -> torch.Tensor | None:
    # runs inside the mode's handler (the mode is off), so these are not call sites
    low = torch.finfo(dtype).min
    bias = None
    if is_causal:
        length, source = query.size(-2), key.size(-2)
        keep = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        bias = torch.zeros(length, source, dtype=dtype, device=query.device).masked_fill(~keep, low)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            extra = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
            extra = extra.masked_fill(~attn_mask, low)
        else:
            extra = attn_mask.to(dtype)
        bias = extra if bias is None else (bias + extra).clamp_min(low)
    return bias

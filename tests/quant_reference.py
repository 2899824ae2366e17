"""Whole-tensor fake quant and bincount written from the formulas: what the tests check against.

The library runs the prepared forms (``qmath.fake_quantize_int_prepared`` and friends, with
parameters shaped once per encoding); these helpers compose them per call from an encoding, as
the formulas in :mod:`mixprec.quant.qmath`'s docstring read. Only tests use them.
"""

from __future__ import annotations

import torch

from mixprec.core.granularity import Granularity, PerBlock, PerTensor
from mixprec.core.precision import Precision
from mixprec.quant import qmath as qm


def fake_quantize_int(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bitwidth: int,
    strict_lower: bool = False,
    granularity: Granularity | None = None,
) -> torch.Tensor:
    """Integer fake quant ``clamp(round(x / scale), lo, hi) * scale`` with a straight-through
    gradient (1 inside the representable range, 0 where clipped).

    Args:
        x: input of any floating dtype; the output has the same dtype.
        scale: float scale, shaped per ``encoding_shape(granularity, x.shape)``.
        offset: integer offset, same shape as ``scale``.
        bitwidth: number of bits ``b`` (``2**b`` codes).
        strict_lower: drop the lowest code (strict symmetric grids).
        granularity: ``None``/``PerTensor()``, ``PerChannel(axis)`` or ``PerBlock(size, axis)``.
    """
    granularity = granularity or PerTensor()
    if isinstance(granularity, PerBlock):
        xs = qm.split_blocks(x, granularity)
        qp = qm.view_qparams(qm.int_qparams(scale, offset, bitwidth, strict_lower), granularity, xs.ndim)
        return qm.fake_quantize_int_prepared(xs, qp).reshape(x.shape)
    qp = qm.view_qparams(qm.int_qparams(scale, offset, bitwidth, strict_lower), granularity, x.ndim)
    return qm.fake_quantize_int_prepared(x, qp)


def fake_quantize_float(
    x: torch.Tensor,
    precision: Precision,
    scale: torch.Tensor | None = None,
    granularity: Granularity | None = None,
) -> torch.Tensor:
    """Round ``x`` to a float precision with an identity (straight-through) gradient.

    fp16/bf16: ``x.to(dtype).to(x.dtype)``. fp8: ``(x / scale).clamp(-fmax, fmax)`` cast to the
    float8 dtype and back, times ``scale`` (``scale = amax / fmax``, required).
    """
    dtype = precision.torch_dtype
    fmax = qm.float_max(precision)
    if not qm.is_scaled_float(precision):
        return qm.fake_quantize_float_prepared(x, dtype, None, None, fmax)  # type: ignore[arg-type]
    if scale is None:
        raise ValueError(f"{precision} fake quant needs a scale (amax / {fmax:g})")
    granularity = granularity or PerTensor()
    xs = qm.split_blocks(x, granularity) if isinstance(granularity, PerBlock) else x
    s = qm.view_encoding(scale.float(), granularity, xs.ndim)
    return qm.fake_quantize_float_prepared(xs, dtype, 1.0 / s, s, fmax).reshape(x.shape)  # type: ignore[arg-type]


def batched_bincount(index: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Per-row bincount of ``index [G, N]`` (values in ``[0, num_bins)``) -> ``[G, num_bins]``."""
    groups = index.shape[0]
    flat = index + torch.arange(groups, device=index.device)[:, None] * num_bins
    return torch.bincount(flat.reshape(-1), minlength=groups * num_bins).view(groups, num_bins)

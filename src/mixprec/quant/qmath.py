"""Stateless tensor math of simulated quantization: encodings, layouts and fake quant.

Histograms and range search live in :mod:`mixprec.quant.ranges`.

Integer encodings follow AIMET's convention (what deployment tools read): ``scale > 0`` and an
integer ``offset``; the grid is ``offset*scale .. (offset + 2**b - 1)*scale`` and fake quant is
``clamp(round(x / scale), lo, hi) * scale`` with ``lo = offset`` (``offset + 1`` under strict
symmetry) and ``hi = offset + 2**b - 1``. ``x / scale`` is computed as ``x * (1 / scale)`` with
the reciprocal precomputed once, as ``torch.fake_quantize_*`` and hardware kernels do; it differs
from a true division only for values within one float ulp of a rounding tie.

float16/bfloat16 inputs are computed in float32 and cast back (rounding in the narrow dtype would
add its own error on top of the simulated one); float64 inputs are computed in float64.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from mixprec.core.granularity import Granularity, PerBlock, PerChannel, PerTensor
from mixprec.core.precision import Precision

MIN_SPAN = 1e-8
"""Smallest encoding range: a constant (or empty) range gets this spread instead of scale 0."""

Scalar = torch.Tensor | float


# ----------------------------------------------------------------------------- encodings


def int_clamp_bounds(
    offset: torch.Tensor, bitwidth: int, strict_lower: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer clamp bounds (as float32 tensors) of ``round(x / scale)`` for a given offset.

    ``strict_lower`` drops the lowest code: strict symmetric grids are ``[-(2**(b-1)-1), 2**(b-1)-1]``.
    """
    lo = offset.double() + (1 if strict_lower else 0)
    return lo.float(), (offset.double() + (2**bitwidth - 1)).float()


def encoding_from_range(
    mn: torch.Tensor | float,
    mx: torch.Tensor | float,
    bitwidth: int,
    symmetric: bool,
    unsigned_symmetric: bool = True,
    strict_symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer encoding (float32 ``scale``, int64 ``offset``) covering an observed range.

    Works elementwise on 0-d (per-tensor) or n-d (per-channel / per-block) ranges. The range is
    first extended to contain 0 and spread to at least ``MIN_SPAN``.

    * asymmetric: ``scale = (mx - mn) / (2**b - 1)``, ``offset = round(mn / scale)``.
    * symmetric signed: ``scale = absmax / (2**(b-1) - 1)``, ``offset = -2**(b-1)``; the grid is
      ``[-2**(b-1), 2**(b-1) - 1] * scale``. ``strict_symmetric`` keeps the same scale and offset;
      the quantizer then clamps at ``offset + 1`` (see ``int_clamp_bounds``).
    * unsigned symmetric (``symmetric and unsigned_symmetric`` and every ``mn >= 0``):
      ``offset = 0``, ``scale = mx / (2**b - 1)``. The choice is made for the whole tensor, never
      per channel, because deployment tools take one signedness per tensor.

    No host synchronization happens here.
    """
    mn_t = torch.as_tensor(mn).double()
    mx_t = torch.as_tensor(mx).double().to(mn_t.device)
    if mn_t.shape != mx_t.shape:
        raise ValueError(f"min and max shapes differ: {tuple(mn_t.shape)} vs {tuple(mx_t.shape)}")
    levels = 2**bitwidth - 1
    lo, hi = mn_t.clamp(max=0.0), mx_t.clamp(min=0.0)
    if not symmetric:
        scale = ((hi - lo).clamp_min(MIN_SPAN) / levels).float()
        offset = torch.round(lo / scale.double()).clamp(-levels, 0).long()
        return scale, offset
    half = 2 ** (bitwidth - 1)
    unsigned = (mn_t >= 0).all() & unsigned_symmetric
    absmax = torch.maximum(-lo, hi).clamp_min(MIN_SPAN)
    scale = torch.where(unsigned, absmax / levels, absmax / (half - 1)).float()
    offset = torch.where(unsigned, 0, -half).to(torch.int64).expand(scale.shape).clone()
    return scale, offset


def grid_min_max(
    scale: torch.Tensor, offset: torch.Tensor, bitwidth: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The convention's ``min = offset*scale``, ``max = (offset + 2**b - 1)*scale`` (float32)."""
    s = scale.double()
    return (offset.double() * s).float(), ((offset.double() + 2**bitwidth - 1) * s).float()


# ----------------------------------------------------------------------------- layouts


def normalize_axis(axis: int, ndim: int) -> int:
    """``axis`` in ``[0, ndim)``; negative axes count from the end."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {ndim}")
    return axis % ndim


def _block_axis(granularity: PerBlock, shape: torch.Size | tuple[int, ...]) -> int:
    if len(shape) < 2:
        raise ValueError(f"per-block quantization needs a tensor of rank >= 2, got shape {tuple(shape)}")
    axis = normalize_axis(granularity.axis, len(shape))
    if axis == 0:
        raise ValueError("per-block axis must not be axis 0 (axis 0 holds the output channels)")
    if shape[axis] % granularity.block_size:
        raise ValueError(
            f"dimension {axis} of size {shape[axis]} is not divisible by block_size {granularity.block_size}"
        )
    return axis


def encoding_shape(granularity: Granularity, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Shape of scale/offset for a tensor of ``shape``: ``()``, ``(C,)`` or ``(out, n_blocks)``."""
    if isinstance(granularity, PerTensor):
        return ()
    if isinstance(granularity, PerChannel):
        return (shape[normalize_axis(granularity.axis, len(shape))],)
    axis = _block_axis(granularity, shape)
    return (shape[0], shape[axis] // granularity.block_size)


def split_blocks(x: torch.Tensor, granularity: PerBlock) -> torch.Tensor:
    """View ``x`` with its block axis split into ``(n_blocks, block_size)``."""
    axis = _block_axis(granularity, x.shape)
    bs = granularity.block_size
    return x.reshape(*x.shape[:axis], x.shape[axis] // bs, bs, *x.shape[axis + 1 :])


def view_encoding(t: torch.Tensor, granularity: Granularity, ndim: int) -> torch.Tensor:
    """View a scale-like tensor so it broadcasts against an input of rank ``ndim`` (for
    per-block: against its block-split view, see ``split_blocks``)."""
    if isinstance(granularity, PerTensor):
        return t
    shape = [1] * ndim
    if isinstance(granularity, PerChannel):
        shape[normalize_axis(granularity.axis, ndim)] = t.shape[0]
    else:  # [out, n_blocks]: out on dim 0, n_blocks where the block axis was split
        shape[0], shape[normalize_axis(granularity.axis, ndim - 1)] = t.shape
    return t.view(shape)


def rows_by_group(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """``x`` as ``[G, N]``: one row per encoding (row-major over the encoding shape)."""
    if isinstance(granularity, PerTensor):
        return x.reshape(1, -1)
    if isinstance(granularity, PerChannel):
        axis = normalize_axis(granularity.axis, x.ndim)
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    axis = _block_axis(granularity, x.shape)
    xs = split_blocks(x, granularity).movedim(axis, 1)
    return xs.reshape(xs.shape[0] * xs.shape[1], -1)


# ----------------------------------------------------------------------------- fake quant


class QParams(NamedTuple):
    """Broadcast-ready fake-quant parameters; Python floats where uniform (fastest kernels)."""

    inv_scale: Scalar
    scale: Scalar
    lo: Scalar
    hi: Scalar


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _clamp_(t: torch.Tensor, lo: Scalar, hi: Scalar) -> torch.Tensor:
    if isinstance(lo, float) and isinstance(hi, float):
        return t.clamp_(lo, hi)
    # clamp_min_/clamp_max_ with tensors are much faster on CPU than clamp_(Tensor, Tensor)
    return t.clamp_min_(lo).clamp_max_(hi)


_QUINT8_PATH = [hasattr(torch, "quantize_per_tensor"), False]  # [available, warning silenced]


def uint8_grid(qp: QParams) -> tuple[float, int] | None:
    """``(scale, zero point)`` of an 8-bit per-tensor grid that torch's quantized uint8 kernels
    compute exactly (see ``_fq_uint8_grid``); None for other grids."""
    if not _QUINT8_PATH[0] or not isinstance(qp.scale, float) or not isinstance(qp.lo, float):
        return None
    if qp.hi - qp.lo != 255.0:
        return None
    return qp.scale, int(-qp.lo)


def fake_quantize_uint8(x: torch.Tensor, grid: tuple[float, int]) -> torch.Tensor | None:
    """``x`` (float32) fake-quantized on an 8-bit grid from ``uint8_grid`` by the quantized uint8
    kernels; None if they are not available (then take the composed path)."""
    try:
        if _QUINT8_PATH[1]:
            return torch.quantize_per_tensor(x, grid[0], grid[1], torch.quint8).dequantize()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the quantized dtypes are deprecated, not gone, in torch < 2.15
            out = torch.quantize_per_tensor(x, grid[0], grid[1], torch.quint8).dequantize()
        _QUINT8_PATH[1] = True
        return out
    except (RuntimeError, NotImplementedError):
        _QUINT8_PATH[0] = False
        return None


def _fq_uint8_grid(x: torch.Tensor, qp: QParams) -> torch.Tensor | None:
    """8-bit per-tensor grids through torch's quantized uint8 kernels: one fused pass each way,
    measured ~2.5x faster on CPU than the composed mul/round/clamp/mul, and bit-identical (both
    round half to even on ``x * (1/scale)``). None when the grid or the dtype does not fit."""
    if x.dtype != torch.float32 or torch.compiler.is_compiling():
        return None  # compilers fuse the composed form; quantized dtypes do not trace
    grid = uint8_grid(qp)
    return None if grid is None else fake_quantize_uint8(x, grid)


def _fq_int(x: torch.Tensor, qp: QParams, want_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not want_mask:
        fast = _fq_uint8_grid(x, qp)
        if fast is not None:
            return fast, None
    xc = x.to(_compute_dtype(x))
    q = torch.mul(xc, qp.inv_scale).round_()
    if not want_mask:
        return _clamp_(q, qp.lo, qp.hi).mul_(qp.scale).to(x.dtype), None
    clamped = _clamp_(q.clone(), qp.lo, qp.hi)
    mask = clamped == q  # NaN compares unequal: no gradient through NaN
    return clamped.mul_(qp.scale).to(x.dtype), mask


class _IntSTE(torch.autograd.Function):
    """Straight-through estimator: gradient 1 where the value was on the grid's range, else 0."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, qp: QParams) -> torch.Tensor:
        out, mask = _fq_int(x, qp, want_mask=True)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def fake_quantize_int_prepared(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer fake quant with parameters already shaped for ``x`` (see ``int_qparams``).

    Skips autograd machinery when no gradient is needed.
    """
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _fq_int(x, qp, want_mask=False)[0]
    return _IntSTE.apply(x, qp)


def int_qparams(
    scale: torch.Tensor,
    offset: torch.Tensor,
    bitwidth: int,
    strict_lower: bool = False,
    as_python: bool = False,
) -> QParams:
    """``QParams`` of an encoding, still encoding-shaped (see ``view_qparams``).

    ``as_python`` turns a per-tensor encoding, and bounds that are equal across channels, into
    Python floats (the fastest CPU kernels). That synchronizes with the device once: do it when
    the encoding changes, never per forward.
    """
    scale = scale.float()
    inv = 1.0 / scale
    lo, hi = int_clamp_bounds(offset, bitwidth, strict_lower)
    if as_python and scale.dim() == 0:
        return QParams(inv.item(), scale.item(), lo.item(), hi.item())
    if as_python and bool((lo == lo.reshape(-1)[0]).all()):
        return QParams(inv, scale, lo.reshape(-1)[0].item(), hi.reshape(-1)[0].item())
    return QParams(inv, scale, lo, hi)


def view_qparams(qp: QParams, granularity: Granularity, ndim: int) -> QParams:
    """View the tensor members of ``qp`` to broadcast against an input of rank ``ndim``."""
    if isinstance(granularity, PerTensor):
        return qp
    return QParams(
        *(v if isinstance(v, float) else view_encoding(v, granularity, ndim) for v in qp)  # type: ignore[arg-type]
    )


class _IdentitySTE(torch.autograd.Function):
    """Float rounding with an identity gradient (exact even where a cast would round it)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, fn: object) -> torch.Tensor:
        return fn(x)  # type: ignore[operator]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def float_max(precision: Precision) -> float:
    """Largest finite value of a float precision's torch dtype."""
    dtype = precision.torch_dtype
    if dtype is None:
        raise ValueError(f"{precision} is not a simulated float precision")
    return float(torch.finfo(dtype).max)


def is_scaled_float(precision: Precision) -> bool:
    """True for fp8 formats, which need a calibrated scale (fp16/bf16 are plain casts)."""
    return precision.torch_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def fake_quantize_float_prepared(
    x: torch.Tensor, dtype: torch.dtype, inv_scale: Scalar | None, scale: Scalar | None, fmax: float
) -> torch.Tensor:
    """Float fake quant with broadcast-ready scale (``None`` for plain fp16/bf16 casts)."""

    def rounded(t: torch.Tensor) -> torch.Tensor:
        if inv_scale is None:
            return t.to(dtype).to(t.dtype)
        tc = t.to(_compute_dtype(t))
        return torch.mul(tc, inv_scale).clamp_(-fmax, fmax).to(dtype).to(tc.dtype).mul_(scale).to(t.dtype)

    if not (x.requires_grad and torch.is_grad_enabled()):
        return rounded(x)
    return _IdentitySTE.apply(x, rounded)

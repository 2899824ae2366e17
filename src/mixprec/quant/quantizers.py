"""Quantizer modules: integer (AIMET encoding convention) and float (fp16, bf16, fp8) fake quant.

The state they share (encoding buffers, calibration protocol) is :class:`QuantizerBase` in
:mod:`mixprec.quant.base`. Non-floating inputs (indices, masks) pass through unchanged.
float16/bfloat16 inputs are quantized in float32 and cast back.
"""

from __future__ import annotations

from typing import Any

import torch

from mixprec.core.granularity import Granularity, PerBlock, PerChannel, PerTensor
from mixprec.core.precision import INT_PRECISIONS, Precision, PrecisionLike
from mixprec.errors import EncodingNotComputedError
from mixprec.quant import qmath as qm
from mixprec.quant.base import Encoding, QuantizerBase
from mixprec.quant.observers import QuantScheme, RangeObserver

__all__ = ["Encoding", "FloatQuantizer", "IntQuantizer", "QuantizerBase", "make_quantizer"]


class IntQuantizer(QuantizerBase):
    """Integer fake quant with AIMET's encoding convention (see ``mixprec.quant.qmath``).

    Args:
        bitwidth: 2..16 or 32.
        symmetric: signed symmetric grid (offset ``-2**(b-1)``) instead of a fitted offset.
        granularity: ``PerTensor()``, ``PerChannel(axis)``, or ``PerBlock(size, axis)``
            (symmetric only).
        unsigned_symmetric: a symmetric quantizer whose observed data is all >= 0 uses the
            unsigned grid (offset 0) for twice the resolution.
        strict_symmetric: signed symmetric grids drop the lowest code (``[-(2**(b-1)-1), 2**(b-1)-1]``).
        label: for messages.
    """

    offset: torch.Tensor
    _buffer_names = ("scale", "offset")

    def __init__(
        self,
        bitwidth: int,
        symmetric: bool = False,
        granularity: Granularity | None = None,
        unsigned_symmetric: bool = True,
        strict_symmetric: bool = False,
        label: str = "",
    ) -> None:
        if isinstance(bitwidth, bool) or bitwidth not in INT_PRECISIONS:
            raise ValueError(
                f"bitwidth must be one of {', '.join(map(str, INT_PRECISIONS))}; got {bitwidth!r}"
            )
        granularity = granularity or PerTensor()
        if isinstance(granularity, PerBlock) and not symmetric:
            raise ValueError(f"{granularity} quantization is symmetric only; pass symmetric=True")
        super().__init__(INT_PRECISIONS[bitwidth], granularity, symmetric, label)
        self.unsigned_symmetric = unsigned_symmetric
        self.strict_symmetric = strict_symmetric
        self.register_buffer("offset", torch.empty(0, dtype=torch.int64))
        self._uint8: tuple[float, int] | None = None  # (scale, zero point) of the uint8 fast path
        self._base: qm.QParams | None = None
        self._by_ndim: dict[int, qm.QParams] = {}
        self._refresh()

    def _new_observer(self, scheme: QuantScheme, num_bins: int | None = None) -> RangeObserver:
        return RangeObserver(
            self._granularity, histogram=scheme.needs_histogram, num_bins=num_bins, label=self.label
        )

    def _set_from_observer(self, observer: RangeObserver, scheme: QuantScheme) -> None:
        mn, mx = observer.compute_range(
            scheme,
            self.bitwidth,
            self._symmetric,
            unsigned_symmetric=self.unsigned_symmetric,
            strict_symmetric=self.strict_symmetric,
            percentile=self._percentile,
        )
        self.set_range(mn, mx)

    def set_range(self, mn: torch.Tensor | float, mx: torch.Tensor | float) -> None:
        mn_t, mx_t = self._range_tensors(mn, mx)
        scale, offset = qm.encoding_from_range(
            mn_t, mx_t, self.bitwidth, self._symmetric, self.unsigned_symmetric, self.strict_symmetric
        )
        self._store(scale=scale, offset=offset)

    def get_encoding(self) -> Encoding:
        if not self._ready:
            raise EncodingNotComputedError(f"{self._where()} has no encoding yet")
        scale, offset = self.scale.detach().clone(), self.offset.detach().clone()
        mn, mx = qm.grid_min_max(scale, offset, self.bitwidth)
        return Encoding(
            self._precision, self._granularity, self._symmetric, scale, offset, mn, mx, self.strict_symmetric
        )

    def set_encoding(self, enc: Encoding) -> None:
        self._check_common(enc)
        if enc.symmetric != self._symmetric or enc.strict_symmetric != self.strict_symmetric:
            raise ValueError(
                f"{self._where()}: encoding has symmetric={enc.symmetric}, strict={enc.strict_symmetric}; "
                f"quantizer has symmetric={self._symmetric}, strict={self.strict_symmetric}"
            )
        scale = self._check_scale(enc.scale)
        if enc.offset is None or enc.offset.numel() != scale.numel():
            raise ValueError(f"{self._where()}: offset must have the shape of scale {tuple(scale.shape)}")
        offset = enc.offset.detach().reshape(scale.shape)
        levels = 2**self.bitwidth - 1
        if not bool((offset == offset.round()).all() & (offset <= 0).all() & (offset >= -levels).all()):
            raise ValueError(f"{self._where()}: offsets must be integers in [-{levels}, 0]")
        self._store(scale=scale, offset=offset.long())

    def _buffer_problem(self) -> str | None:
        if self.offset.shape != self.scale.shape:
            return (
                f"offset shape {tuple(self.offset.shape)} differs from scale shape {tuple(self.scale.shape)}"
            )
        return super()._buffer_problem()

    def _refresh(self) -> None:
        self._by_ndim = {}
        self._uint8 = None
        self._ready = self.scale.numel() > 0 and self.offset.shape == self.scale.shape
        if not self._ready:
            self._base = None
            return
        # strictness drops the lowest code of signed grids only: code 0 of an unsigned grid is 0.0
        strict_lower = self._symmetric and self.strict_symmetric and bool((self.offset < 0).any())
        self._base = qm.int_qparams(self.scale, self.offset, self.bitwidth, strict_lower, as_python=True)
        if isinstance(self._granularity, PerTensor):
            self._uint8 = qm.uint8_grid(self._base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As :meth:`QuantizerBase.forward`; the common case (inference on float32, 8-bit per-tensor
        grid, no mask values to pass) goes straight to the uint8 kernels, with the same results."""
        grid = self.__dict__.get("_uint8")  # absent in quantizers pickled by older versions
        if (
            grid is not None
            and x.dtype is torch.float32
            and not self._observing
            and not self.passes_masks
            and not (x.requires_grad and torch.is_grad_enabled())
            and (type(x) is torch.Tensor or type(x) is torch.nn.Parameter)
            and not torch.compiler.is_compiling()
        ):
            if qm._QUINT8_PATH[1]:  # known to work: the kernels directly (a Python call less)
                return torch.quantize_per_tensor(x, grid[0], grid[1], torch.quint8).dequantize()
            out = qm.fake_quantize_uint8(x, grid)
            if out is not None:
                return out
        return super().forward(x)

    def _params_for(self, ndim: int) -> qm.QParams:
        qp = self._by_ndim.get(ndim)
        if qp is None:
            qp = self._by_ndim[ndim] = qm.view_qparams(self._base, self._granularity, ndim)  # type: ignore[arg-type]
        return qp

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        g = self._granularity
        if isinstance(g, PerTensor):
            return qm.fake_quantize_int_prepared(x, self._base)  # type: ignore[arg-type]
        if isinstance(g, PerChannel):
            _check_channels(self, x, (x.shape[qm.normalize_axis(g.axis, x.ndim)],))
            return qm.fake_quantize_int_prepared(x, self._params_for(x.ndim))
        _check_channels(self, x, qm.encoding_shape(g, x.shape))
        xs = qm.split_blocks(x, g)
        return qm.fake_quantize_int_prepared(xs, self._params_for(xs.ndim)).reshape(x.shape)


def _check_channels(q: QuantizerBase, x: torch.Tensor, shape: tuple[int, ...]) -> None:
    if shape != tuple(q.scale.shape):
        raise ValueError(
            f"{q._where()}: input of shape {tuple(x.shape)} needs an encoding of shape {shape} "
            f"for {q.granularity}, but the encoding has shape {tuple(q.scale.shape)}"
        )


class FloatQuantizer(QuantizerBase):
    """Float fake quant: fp16/bf16 casts (no encoding), or scaled fp8 (``scale = amax / fmax``).

    fp8 calibration always uses the absolute max of the observed range, whatever the scheme:
    the integer noise model of tf_enhanced does not apply to float grids.

    Args:
        precision: fp16, bf16, fp8_e4m3 or fp8_e5m2.
        granularity: granularity of the fp8 scale (ignored by fp16/bf16).
        label: for messages.
    """

    def __init__(
        self, precision: PrecisionLike, granularity: Granularity | None = None, label: str = ""
    ) -> None:
        precision = Precision.parse(precision)
        if not precision.is_float:
            raise ValueError(f"FloatQuantizer needs fp16, bf16, fp8_e4m3 or fp8_e5m2; got {precision}")
        super().__init__(precision, granularity or PerTensor(), True, label)
        self._dtype: torch.dtype = precision.torch_dtype  # type: ignore[assignment]
        self._fmax = qm.float_max(precision)
        self._scaled = qm.is_scaled_float(precision)
        self._base: tuple[Any, Any] | None = None
        self._by_ndim: dict[int, tuple[Any, Any]] = {}
        self._refresh()

    @property
    def needs_encoding(self) -> bool:
        return self._scaled

    def _set_from_observer(self, observer: RangeObserver, scheme: QuantScheme) -> None:
        self.set_range(*observer.compute_range(QuantScheme.TF, 8, True))

    def set_range(self, mn: torch.Tensor | float, mx: torch.Tensor | float) -> None:
        if not self._scaled:
            return
        mn_t, mx_t = self._range_tensors(mn, mx)
        amax = torch.maximum(mn_t.abs(), mx_t.abs()).clamp_min(qm.MIN_SPAN)
        self._store(scale=(amax / self._fmax).float())

    def get_encoding(self) -> Encoding:
        if not self._scaled:
            return Encoding(self._precision, self._granularity, True)
        if not self._ready:
            raise EncodingNotComputedError(f"{self._where()} has no encoding yet")
        scale = self.scale.detach().clone()
        amax = scale * self._fmax
        return Encoding(self._precision, self._granularity, True, scale, None, -amax, amax)

    def set_encoding(self, enc: Encoding) -> None:
        self._check_common(enc)
        if self._scaled:
            self._store(scale=self._check_scale(enc.scale))

    def _refresh(self) -> None:
        self._by_ndim = {}
        if not self._scaled:
            self._ready = True
            return
        self._ready = self.scale.numel() > 0
        if not self._ready:
            self._base = None
            return
        scale = self.scale.float()
        inv = 1.0 / scale
        self._base = (inv.item(), scale.item()) if scale.dim() == 0 else (inv, scale)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self._scaled:
            return qm.fake_quantize_float_prepared(x, self._dtype, None, None, self._fmax)
        g = self._granularity
        if isinstance(g, PerTensor):
            inv, scale = self._base  # type: ignore[misc]
            return qm.fake_quantize_float_prepared(x, self._dtype, inv, scale, self._fmax)
        _check_channels(self, x, qm.encoding_shape(g, x.shape))
        xs = qm.split_blocks(x, g) if isinstance(g, PerBlock) else x
        views = self._by_ndim.get(xs.ndim)
        if views is None:
            views = self._by_ndim[xs.ndim] = tuple(qm.view_encoding(t, g, xs.ndim) for t in self._base)  # type: ignore[union-attr]
        return qm.fake_quantize_float_prepared(xs, self._dtype, views[0], views[1], self._fmax).reshape(
            x.shape
        )


def make_quantizer(
    precision: PrecisionLike,
    *,
    symmetric: bool,
    granularity: Granularity | None = None,
    unsigned_symmetric: bool = True,
    strict_symmetric: bool = False,
    label: str = "",
) -> QuantizerBase:
    """Build the quantizer simulating ``precision`` (floats ignore the symmetry arguments).

    Raises:
        ValueError: for ``fp32``, which means "no quantizer".
    """
    precision = Precision.parse(precision)
    if precision.is_full:
        raise ValueError("fp32 means no quantizer at that place; do not build one")
    if precision.is_int:
        return IntQuantizer(
            precision.bits, symmetric, granularity, unsigned_symmetric, strict_symmetric, label=label
        )
    q = FloatQuantizer(precision, granularity, label=label)
    q._int_settings = (symmetric, unsigned_symmetric, strict_symmetric)  # for a later change to int
    return q


# the bitwidth/data_type setters of QuantizerBase (quant/quantizer_api.py) build through this
QuantizerBase._factory = staticmethod(make_quantizer)

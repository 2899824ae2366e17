"""Quantizer modules: integer (AIMET encoding convention) and float (fp16, bf16, fp8) fake quant.

A quantizer holds its encoding in registered buffers (``scale``, and ``offset`` for integers), so
``.to(device)`` and ``state_dict`` carry it. Derived values (reciprocal scale, clamp bounds,
Python floats where uniform) are cached when the encoding changes, so ``forward`` never syncs
with the device. Change encodings through ``set_encoding``/``set_range``/calibration or
``load_state_dict``, not by writing into the buffers.

Non-floating inputs (indices, masks) pass through unchanged. float16/bfloat16 inputs are
quantized in float32 and cast back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixprec.core.granularity import Granularity, PerBlock, PerChannel, PerTensor
from mixprec.core.precision import INT_PRECISIONS, Precision, PrecisionLike
from mixprec.errors import EncodingNotComputedError
from mixprec.quant import qmath as qm
from mixprec.quant.observers import QuantScheme, RangeObserver, num_bins_for_tensor


@dataclass(frozen=True, eq=False)
class Encoding:
    """A quantizer's encoding (tensors are detached copies).

    Integers: ``scale`` (float32) and ``offset`` (int64), 0-d per tensor, ``[C]`` per channel,
    ``[out, n_blocks]`` per block; ``min = offset*scale``, ``max = (offset + 2**b - 1)*scale``.
    fp8: ``scale = amax / fmax``, ``offset`` None, ``min/max = -/+amax``. fp16/bf16: all None.
    """

    precision: Precision
    granularity: Granularity
    symmetric: bool
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    strict_symmetric: bool = False

    @property
    def bitwidth(self) -> int:
        return self.precision.bits


def _expected_rank(granularity: Granularity) -> int:
    return 0 if isinstance(granularity, PerTensor) else 1 if isinstance(granularity, PerChannel) else 2


class QuantizerBase(nn.Module):
    """Common state and calibration protocol of all quantizers.

    Attributes:
        label: where the quantizer sits, for messages (e.g. ``"features.0.0 output 0"``).
    """

    scale: torch.Tensor
    _buffer_names: tuple[str, ...] = ("scale",)

    def __init__(self, precision: Precision, granularity: Granularity, symmetric: bool, label: str) -> None:
        super().__init__()
        self.label = label
        self._precision = precision
        self._granularity = granularity
        self._symmetric = symmetric
        self._observer: RangeObserver | None = None
        self._observing = False
        self._scheme = QuantScheme.TF_ENHANCED
        self._ready = False
        self.register_buffer("scale", torch.empty(0))

    # ------------------------------------------------------------------ properties

    @property
    def precision(self) -> Precision:
        return self._precision

    @property
    def granularity(self) -> Granularity:
        return self._granularity

    @property
    def symmetric(self) -> bool:
        return self._symmetric

    @property
    def needs_encoding(self) -> bool:
        """False where forward needs no calibrated values (fp16/bf16 casts)."""
        return True

    @property
    def is_initialized(self) -> bool:
        """True when forward can quantize (always for fp16/bf16)."""
        return self._ready

    @property
    def is_calibrating(self) -> bool:
        return self._observing

    @property
    def observer(self) -> RangeObserver | None:
        """Statistics collected since ``begin_calibration`` (None when not observing, or for
        fp16/bf16). Replace it, e.g. with statistics combined across processes, before
        ``end_calibration``."""
        return self._observer

    @observer.setter
    def observer(self, value: RangeObserver) -> None:
        if not self._observing or self._observer is None:
            raise RuntimeError(f"{self._where()} is not calibrating; call begin_calibration() first")
        self._observer = value

    def extra_repr(self) -> str:
        sym = "symmetric" if self._symmetric else "asymmetric"
        label = f", label={self.label!r}" if self.label else ""
        return f"{self._precision}, {self._granularity}, {sym}, initialized={self.is_initialized}{label}"

    def _where(self) -> str:
        return (
            f"quantizer {self.label!r} ({self._precision})" if self.label else f"{self._precision} quantizer"
        )

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x``; while calibrating, record it and return it unchanged.

        Raises:
            EncodingNotComputedError: no encoding yet (and not calibrating).
        """
        if self._observing:
            if self._observer is not None and x.is_floating_point():
                self._observer.observe(x)
            return x
        if not x.is_floating_point():
            return x
        if not self._ready:
            raise EncodingNotComputedError(
                f"{self._where()} has no encoding yet; call sim.compute_encodings(forward_pass_callback, args) "
                "before running the model, or load encodings"
            )
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ calibration

    def begin_calibration(
        self, scheme: QuantScheme | str = QuantScheme.TF_ENHANCED, collect: bool = True
    ) -> None:
        """Enter observing mode: forward returns inputs unchanged and records their statistics.

        Args:
            scheme: how ``end_calibration`` turns statistics into a range.
            collect: False only passes values through, e.g. for parameter quantizers that get
                ``calibrate_tensor`` afterwards (re-observing weights every batch is wasted work).
        """
        self._scheme = QuantScheme.parse(scheme)
        self._observer = self._new_observer(self._scheme) if self.needs_encoding and collect else None
        self._observing = True

    def end_calibration(self) -> None:
        """Leave observing mode and set the encoding from what was observed.

        Raises:
            CalibrationError: no data reached this quantizer (the previous encoding is kept).
            RuntimeError: ``begin_calibration`` was not called, or was called with ``collect=False``.
        """
        if not self._observing:
            raise RuntimeError(f"{self._where()}: end_calibration() without begin_calibration()")
        observer = self._observer
        self.abort_calibration()
        if observer is not None:
            self._set_from_observer(observer, self._scheme)
        elif self.needs_encoding:
            raise RuntimeError(
                f"{self._where()}: nothing was collected (collect=False); use calibrate_tensor()"
            )

    def abort_calibration(self) -> None:
        """Leave observing mode, discarding statistics; the encoding is unchanged."""
        self._observing = False
        self._observer = None

    def calibrate_tensor(self, t: torch.Tensor, scheme: QuantScheme | str = QuantScheme.TF_ENHANCED) -> None:
        """Set the encoding from one tensor (parameters); ends any calibration in progress."""
        scheme = QuantScheme.parse(scheme)
        self.abort_calibration()
        if not self.needs_encoding:
            return
        observer = self._new_observer(scheme, num_bins_for_tensor(self._granularity, t))
        observer.observe(t.detach())
        self._set_from_observer(observer, scheme)

    def _new_observer(self, scheme: QuantScheme, num_bins: int | None = None) -> RangeObserver:
        return RangeObserver(self._granularity, histogram=False, label=self.label)

    def _set_from_observer(self, observer: RangeObserver, scheme: QuantScheme) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ encodings

    def get_encoding(self) -> Encoding:
        """The current encoding (detached copies).

        Raises:
            EncodingNotComputedError: the quantizer needs an encoding and has none.
        """
        raise NotImplementedError

    def set_encoding(self, enc: Encoding) -> None:
        """Set the encoding (e.g. loaded from a file) after validating it.

        Raises:
            ValueError: precision, granularity, symmetry, shapes or values do not fit.
        """
        raise NotImplementedError

    def set_range(self, mn: torch.Tensor | float, mx: torch.Tensor | float) -> None:
        """Set the encoding covering ``[mn, mx]`` (shaped like the encoding).

        Raises:
            ValueError: bad shape or non-finite values.
        """
        raise NotImplementedError

    def reset_encoding(self) -> None:
        """Forget the encoding (forward then raises until a new one is set)."""
        for name in self._buffer_names:
            old = getattr(self, name)
            setattr(self, name, torch.empty(0, dtype=old.dtype, device=old.device))
        self._refresh()

    def _range_tensors(self, mn: Any, mx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        mn_t, mx_t = torch.as_tensor(mn).double(), torch.as_tensor(mx).double()
        rank = _expected_rank(self._granularity)
        if rank == 0 and mn_t.numel() == 1 and mx_t.numel() == 1:
            mn_t, mx_t = mn_t.reshape(()), mx_t.reshape(())
        if mn_t.dim() != rank or mn_t.shape != mx_t.shape:
            raise ValueError(
                f"{self._where()}: range of shapes {tuple(mn_t.shape)} / {tuple(mx_t.shape)} does not fit "
                f"{self._granularity} (expected rank {rank})"
            )
        if not bool(torch.isfinite(mn_t).all() & torch.isfinite(mx_t).all()):
            raise ValueError(f"{self._where()}: range must be finite, got min={mn_t} max={mx_t}")
        return mn_t, mx_t

    def _check_common(self, enc: Encoding) -> None:
        if enc.precision != self._precision or enc.granularity != self._granularity:
            raise ValueError(
                f"{self._where()}: encoding is {enc.precision} {enc.granularity}, "
                f"quantizer is {self._precision} {self._granularity}"
            )

    def _check_scale(self, scale: torch.Tensor | None) -> torch.Tensor:
        if scale is None:
            raise ValueError(f"{self._where()}: encoding has no scale")
        scale = scale.detach().float()
        rank = _expected_rank(self._granularity)
        if rank == 0 and scale.numel() == 1:
            scale = scale.reshape(())
        if scale.dim() != rank:
            raise ValueError(
                f"{self._where()}: scale of shape {tuple(scale.shape)} does not fit {self._granularity}"
            )
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise ValueError(f"{self._where()}: scale must be finite and > 0")
        return scale

    # ------------------------------------------------------------------ cache plumbing

    def _store(self, **tensors: torch.Tensor) -> None:
        device = self.scale.device
        for name, t in tensors.items():
            setattr(self, name, t.detach().to(device=device, dtype=getattr(self, name).dtype).clone())
        self._refresh()

    def _refresh(self) -> None:
        """Recompute derived values after the encoding buffers changed."""
        raise NotImplementedError

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> QuantizerBase:
        result = super()._apply(fn, *args, **kwargs)
        self._refresh()  # cached tensors must follow the buffers to their new device/dtype
        return result

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # encodings change shape (empty -> per-channel): resize first so the copy succeeds
        for name in self._buffer_names:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != current.shape:
                setattr(self, name, torch.empty(incoming.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        problem = self._buffer_problem()
        if problem:
            error_msgs.append(f"{prefix or self._where()}: {problem}")
            self.reset_encoding()
        else:
            self._refresh()

    def _buffer_problem(self) -> str | None:
        if self.scale.numel() and not bool((torch.isfinite(self.scale) & (self.scale > 0)).all()):
            return "scale must be finite and > 0"
        return None


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
        self.bitwidth = bitwidth
        self.unsigned_symmetric = unsigned_symmetric
        self.strict_symmetric = strict_symmetric
        self.register_buffer("offset", torch.empty(0, dtype=torch.int64))
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
        self._ready = self.scale.numel() > 0 and self.offset.shape == self.scale.shape
        if not self._ready:
            self._base = None
            return
        # strictness drops the lowest code of signed grids only: code 0 of an unsigned grid is 0.0
        strict_lower = self._symmetric and self.strict_symmetric and bool((self.offset < 0).any())
        self._base = qm.int_qparams(self.scale, self.offset, self.bitwidth, strict_lower, as_python=True)

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
    return FloatQuantizer(precision, granularity, label=label)

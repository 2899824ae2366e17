"""The quantizer base class and its encoding: state, calibration protocol and checks.

A quantizer holds its encoding in registered buffers (``scale``, and ``offset`` for integers), so
``.to(device)`` and ``state_dict`` carry it. Derived values (reciprocal scale, clamp bounds,
Python floats where uniform) are cached when the encoding changes, so ``forward`` never syncs
with the device. Change encodings through ``set_encoding``/``set_range``/calibration or
``load_state_dict``, not by writing into the buffers. The concrete quantizers are in
:mod:`mixprec.quant.quantizers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixprec.core.granularity import Granularity, PerChannel, PerTensor
from mixprec.core.precision import Precision, PrecisionLike
from mixprec.errors import EncodingNotComputedError
from mixprec.quant import masks
from mixprec.quant.observers import QuantScheme, RangeObserver, num_bins_for_tensor
from mixprec.quant.quantizer_api import ReferenceQuantizerAPI


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


class QuantizerBase(ReferenceQuantizerAPI, nn.Module):
    """Common state and calibration protocol of all quantizers.

    Attributes:
        label: where the quantizer sits, for messages (e.g. ``"features.0.0 output 0"``).
        mask_threshold: per-tensor quantizers only: values at or below it are additive-mask
            values (docs/masks.md); None (the default here; the sim sets it on activation
            quantizers) treats every value as data.
        passes_masks: calibration saw mask values, so forward passes them through unchanged.
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
        self.mask_threshold: float | None = None
        self.passes_masks = False
        self.saw_masks = False  # while calibrating: mask values came by
        self.register_buffer("scale", torch.empty(0))

    # ------------------------------------------------------------------ properties

    @property
    def precision(self) -> Precision:
        return self._precision

    @precision.setter
    def precision(self, value: PrecisionLike) -> None:
        """Change the precision in place (every holder of this quantizer sees it); a calibrated
        range is kept where both precisions have one, else calibrate again."""
        self._set_precision(Precision.parse(value))

    @property
    def granularity(self) -> Granularity:
        return self._granularity

    @property
    def needs_encoding(self) -> bool:
        """False where forward needs no calibrated values (fp16/bf16 casts)."""
        return True

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
                data = x
                if self.mask_threshold is not None and isinstance(self._granularity, PerTensor):
                    data, saw = masks.drop_mask_values(x.detach(), self.mask_threshold)
                    self.saw_masks |= saw
                self._observer.observe(data)
            return x
        if not x.is_floating_point() or (x.numel() == 0 and not self._ready):
            return x  # nothing to quantize: integers, or an empty tensor
        if not self._ready:
            if torch.compiler.is_compiling():
                from mixprec.core.eager_escape import run_eagerly

                return run_eagerly(self._not_computed, x)
            self._not_computed(x)
        if self.passes_masks and self.mask_threshold is not None:
            return masks.pass_mask_values(x, self._quantize(x), self.mask_threshold)
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _not_computed(self, x: torch.Tensor) -> torch.Tensor:
        # under torch.compile this runs eagerly (core/eager_escape.py): raising inside a trace
        # would make dynamo give up on whole frames instead of reporting this error
        raise EncodingNotComputedError(
            f"{self._where()} has no encoding yet; call sim.compute_encodings(forward_pass_callback, args) "
            "before running the model, or load encodings"
        )

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
        self.saw_masks = False

    def end_calibration(self) -> None:
        """Leave observing mode and set the encoding from what was observed.

        Raises:
            CalibrationError: no data reached this quantizer (the previous encoding is kept).
            RuntimeError: ``begin_calibration`` was not called, or was called with ``collect=False``.
        """
        if not self._observing:
            raise RuntimeError(f"{self._where()}: end_calibration() without begin_calibration()")
        observer = self._observer
        saw_masks = self.saw_masks
        self.abort_calibration()
        if observer is not None:
            if saw_masks and observer.num_values == 0:
                observer.observe(torch.zeros(1))  # only mask values came: the data range is [0, 0]
            self._set_from_observer(observer, self._scheme)
            self.passes_masks = saw_masks
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
            self._set_tensor(name, torch.empty(0, dtype=old.dtype, device=old.device))
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
            self._set_tensor(name, t.detach().to(device=device, dtype=getattr(self, name).dtype).clone())
        self._refresh()

    def _set_tensor(self, name: str, value: torch.Tensor) -> None:
        """Every change of an encoding tensor goes through here (learnable quantizers keep their
        ``nn.Parameter`` objects, see ``mixprec.quant.learnable``)."""
        setattr(self, name, value)

    def _refresh(self) -> None:
        """Recompute derived values after the encoding buffers changed."""
        raise NotImplementedError

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> QuantizerBase:
        result = super()._apply(_keep_float32(fn), *args, **kwargs)
        self._refresh()  # cached tensors must follow the buffers to their new device
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
                self._set_tensor(
                    name, torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
                )
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


def _keep_float32(fn: Any) -> Any:
    """``fn`` (of ``Module._apply``) limited to device moves for encoding tensors.

    ``model.half()`` must not cast scales: an int16 scale of 3.4e-10 is 0 in float16, and
    ``.half().float()`` would change every scale for good. Encodings stay float32 whatever the
    module's dtype; inputs of other float dtypes are quantized in float32 (see the module doc of
    ``mixprec.quant.quantizers``).
    """

    def apply(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return fn(t)
        probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        return fn(t) if probe.dtype == t.dtype else t.to(device=probe.device)

    return apply

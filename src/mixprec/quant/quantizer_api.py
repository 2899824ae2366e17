"""The reference's quantizer API on mixprec quantizers: ``is_initialized()``, ``get_scale``,
``get_offset``, ``get_min``, ``get_max``, ``get_encodings``, ``signed``, ``symmetric``,
``allow_overwrite``, and ``bitwidth`` / ``data_type`` setters that change ``precision``.

Kept apart from the quantizer classes (``QuantizerBase`` inherits it) so the numerics stay in
``quantizers.py``. See docs/porting_from_aimet.md for how each maps to the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mixprec.core.granularity import PerBlock
from mixprec.core.precision import INT_PRECISIONS, NumberKind, Precision, QuantizationDataType
from mixprec.errors import QuantizerSettingError

# torch.nn.Module.__dict__ entries that belong to the object, not to its quantizer type: they
# survive a change of type (int <-> float) made by ``precision``/``data_type`` setters.
_KEEP_ON_RETYPE = (
    "training",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
    "_allow_overwrite",
    "_percentile",
    "_int_settings",
)


class InitializedFlag:
    """``q.is_initialized()``: call it as the reference does (``q.is_initialized()``), or read it as
    a bool as mixprec code did before (``if q.is_initialized():``). A plain method would make
    the old spelling always true, silently."""

    __slots__ = ("_value",)

    def __init__(self, value: bool) -> None:
        self._value = bool(value)

    def __call__(self) -> bool:
        return self._value

    def __bool__(self) -> bool:
        return self._value

    def __eq__(self, other: object) -> bool:
        return self._value == bool(other)

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return repr(self._value)


class ReferenceQuantizerAPI:
    """Mixin of ``QuantizerBase``; relies on its ``_precision``, ``_granularity``,
    ``_symmetric``, ``_ready`` and encoding methods."""

    _allow_overwrite: bool = True
    _percentile: float = 99.99
    # mixprec.quant.quantizers.make_quantizer, set by that module: this one sits below it
    _factory: Callable[..., Any] | None = None

    # ------------------------------------------------------------------ state

    @property
    def is_initialized(self) -> InitializedFlag:
        """Whether forward can quantize (always for fp16/bf16); ``q.is_initialized()``."""
        return InitializedFlag(self._ready)  # type: ignore[attr-defined]

    def allow_overwrite(self, mode: bool = True) -> None:
        """Whether ``compute_encodings`` and ``load_encodings`` may change this encoding
        (False freezes it, as ``load_encodings(..., allow_overwrite=False)`` does)."""
        self._allow_overwrite = bool(mode)

    def is_overwrite_allowed(self, name: str | None = None) -> bool:
        """True unless frozen by ``allow_overwrite(False)`` (``name`` is accepted for the
        reference's per-parameter form; a mixprec encoding is frozen as a whole)."""
        return self._allow_overwrite

    def set_percentile(self, percentile: float) -> None:
        """The percentile of ``QuantScheme.post_training_percentile`` (in (50, 100])."""
        value = float(percentile)
        if not 50.0 < value <= 100.0:
            raise QuantizerSettingError(
                f"{self._where()}: percentile must be in (50, 100], got {percentile!r}"
            )  # type: ignore[attr-defined]
        self._percentile = value

    # ------------------------------------------------------------------ the reference's getters

    def _encoding_or_none(self) -> Any:
        if not self._ready or not self.needs_encoding:  # type: ignore[attr-defined]
            return None
        return self.get_encoding()  # type: ignore[attr-defined]

    def get_encodings(self) -> Any:
        """The encoding, or None before calibration (the reference's ``get_encodings``).

        Its ``offset`` follows the ``.encodings`` file convention (``min = offset*scale``);
        ``get_offset()`` gives the reference's quantizer offset.
        """
        return self._encoding_or_none()

    def get_scale(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        enc = self._encoding_or_none()
        return None if enc is None or enc.scale is None else enc.scale.to(dtype or torch.float32)

    def get_offset(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The reference's offset: relative to the signed grid when ``signed`` (0 for signed
        symmetric), else the file convention's (``round(min/scale)``, <= 0). 0 for fp8."""
        enc = self._encoding_or_none()
        if enc is None or enc.scale is None:
            return None
        if enc.offset is None:
            return torch.zeros_like(enc.scale, dtype=dtype or torch.float32)
        shift = 2 ** (self._precision.bits - 1) if self.signed else 0  # type: ignore[attr-defined]
        return (enc.offset + shift).to(dtype or torch.float32)

    def get_min(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        enc = self._encoding_or_none()
        return None if enc is None or enc.min is None else enc.min.to(dtype or torch.float32)

    def get_max(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        enc = self._encoding_or_none()
        return None if enc is None or enc.max is None else enc.max.to(dtype or torch.float32)

    # ------------------------------------------------------------------ settings

    @property
    def bitwidth(self) -> int:
        """Bits of ``precision``. Setting it changes the precision (int4 ... int16, int32; 8 or
        16 for floats: fp8_e4m3 / fp16); a calibrated range is kept, scale/offset re-derived."""
        return self._precision.bits  # type: ignore[attr-defined]

    @bitwidth.setter
    def bitwidth(self, value: int) -> None:
        self.precision = _from_bits(self, value, self._precision.kind)  # type: ignore[attr-defined]

    @property
    def data_type(self) -> QuantizationDataType:
        """``QuantizationDataType.int`` or ``.float``; setting it keeps ``bitwidth``
        (float 8 is fp8_e4m3, float 16 is fp16)."""
        return QuantizationDataType.float if self._precision.is_float else QuantizationDataType.int  # type: ignore[attr-defined]

    @data_type.setter
    def data_type(self, value: Any) -> None:
        try:
            kind = NumberKind(QuantizationDataType.parse(value).value)
        except ValueError as exc:
            raise QuantizerSettingError(f"{self._where()}: {exc}") from None  # type: ignore[attr-defined]
        self.precision = _from_bits(self, self._precision.bits, kind)  # type: ignore[attr-defined]

    @property
    def signed(self) -> bool:
        """Whether the integer grid is signed (symmetric on data with negatives); floats: True."""
        if self._precision.is_float:  # type: ignore[attr-defined]
            return True
        if not self._symmetric:  # type: ignore[attr-defined]
            return False
        if self._ready:  # type: ignore[attr-defined]
            return bool((self.offset < 0).any())  # type: ignore[attr-defined]
        # before calibration: signed, unless calibration may pick the unsigned grid and does
        return True

    @signed.setter
    def signed(self, value: bool) -> None:
        if self._precision.is_float or not self._symmetric:  # type: ignore[attr-defined]
            if bool(value) == self.signed:
                return
            raise QuantizerSettingError(
                f"{self._where()}: signed={value!r} needs a symmetric integer quantizer; asymmetric grids "  # type: ignore[attr-defined]
                "are unsigned here. Set q.symmetric = True first"
            )
        # signed=False lets calibration pick the unsigned grid when the data is all >= 0
        self._retune(lambda: setattr(self, "unsigned_symmetric", not value))

    @property
    def symmetric(self) -> bool:
        return self._symmetric  # type: ignore[attr-defined]

    @symmetric.setter
    def symmetric(self, value: bool) -> None:
        value = bool(value)
        if value == self._symmetric:  # type: ignore[attr-defined]
            return
        if self._precision.is_float or isinstance(self._granularity, PerBlock):  # type: ignore[attr-defined]
            raise QuantizerSettingError(
                f"{self._where()}: float and per-block quantizers are symmetric only; symmetric=False is not possible"  # type: ignore[attr-defined]
            )
        self._retune(lambda: setattr(self, "_symmetric", value))

    @property
    def enabled(self) -> bool:
        """Always True: a quantizer that exists is applied (the reference's 1.x attribute)."""
        return True

    @enabled.setter
    def enabled(self, value: bool) -> None:
        # the reference's 1.x idiom; ignoring it silently would leave the quantizer running
        if not value:
            raise QuantizerSettingError(
                f"{self._where()}: enabled=False: remove the quantizer instead "  # type: ignore[attr-defined]
                "(qmodule.output_quantizers[i] = None, qmodule.param_quantizers[name] = None, or "
                "sim.exclude_layers_from_quantization([layer]))"
            )

    # ------------------------------------------------------------------ changing settings

    def _calibrated_range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A range that re-derives the current encoding (None when there is none)."""
        enc = self._encoding_or_none()
        if enc is None or enc.scale is None:
            return None
        if enc.offset is None:  # fp8: +-amax
            return enc.min.double(), enc.max.double()  # type: ignore[union-attr]
        scale, bits = enc.scale.double(), self._precision.bits  # type: ignore[attr-defined]
        if not self._symmetric:  # type: ignore[attr-defined]
            return enc.min.double(), enc.max.double()  # type: ignore[union-attr]
        if bool((enc.offset < 0).any()):  # signed grid: scale = absmax / (2**(b-1) - 1)
            absmax = scale * (2 ** (bits - 1) - 1)
            return -absmax, absmax
        return torch.zeros_like(scale), scale * (2**bits - 1)

    def _retune(self, change: Any) -> None:
        """Apply ``change`` to the settings, then re-derive the encoding from the kept range."""
        kept = self._calibrated_range()
        change()
        self._forget_cached_outputs()
        if kept is not None:
            self.set_range(*kept)  # type: ignore[attr-defined]

    def _set_precision(self, precision: Precision) -> None:
        if precision == self._precision:  # type: ignore[attr-defined]
            return
        if precision.is_full:
            raise QuantizerSettingError(
                f"{self._where()}: fp32 means no quantizer; remove it instead (e.g. "  # type: ignore[attr-defined]
                "qmodule.output_quantizers[0] = None, sim.exclude_layers_from_quantization([layer]) or "
                "MixedPrecisionConfigurator.set_precision(layer, 'fp32'))"
            )
        kept = self._calibrated_range()
        if precision.kind is self._precision.kind and precision.is_int:  # type: ignore[attr-defined]
            self._forget_cached_outputs()
            self._precision = precision
            self.reset_encoding()  # type: ignore[attr-defined]
        else:
            self._retype(precision)
        if kept is not None and self.needs_encoding:  # type: ignore[attr-defined]
            self.set_range(*kept)  # type: ignore[attr-defined]

    def _forget_cached_outputs(self) -> None:
        # mixprec.sim.runtime caches q(weight) keyed by buffer addresses and versions; buffers
        # freed and reallocated here could reuse an address, so drop the cache explicitly
        self.__dict__.pop("_mixprec_param_cache", None)

    def _retype(self, precision: Precision) -> None:
        """Turn this object into a fresh quantizer of ``precision`` (its type may change between
        IntQuantizer and FloatQuantizer) so every holder of it sees the new precision."""
        symmetric, unsigned, strict = getattr(self, "_int_settings", None) or (
            self._symmetric,  # type: ignore[attr-defined]
            getattr(self, "unsigned_symmetric", True),
            getattr(self, "strict_symmetric", False),
        )
        fresh = (
            type(self)
            ._factory(  # type: ignore[misc]
                precision,
                symmetric=symmetric,
                granularity=self._granularity,  # type: ignore[attr-defined]
                unsigned_symmetric=unsigned,
                strict_symmetric=strict,
                label=self.label,  # type: ignore[attr-defined]
            )
            .to(self.scale.device)
        )  # type: ignore[attr-defined]
        kept = {k: self.__dict__[k] for k in _KEEP_ON_RETYPE if k in self.__dict__}
        kept.setdefault("_int_settings", (symmetric, unsigned, strict))
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)
        self.__dict__.update(kept)
        self.__class__ = type(fresh)


def _from_bits(q: Any, bits: Any, kind: NumberKind) -> Precision:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise QuantizerSettingError(f"{q._where()}: bitwidth must be an int, got {bits!r}")
    try:
        return Precision.from_bitwidth(bits, kind)
    except ValueError:
        accepted = (
            ", ".join(map(str, INT_PRECISIONS)) if kind is NumberKind.INT else "8 (fp8_e4m3), 16 (fp16)"
        )
        raise QuantizerSettingError(
            f"{q._where()}: bitwidth {bits!r} does not exist for {kind.value} quantizers; accepted: "
            f"{accepted}. To change int <-> float set q.data_type, or q.precision = 'fp16'"
        ) from None

"""Precision types: the closed set of numeric formats a quantizer can simulate."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch


class NumberKind(enum.Enum):
    """How a precision represents numbers."""

    INT = "int"
    FLOAT = "float"
    NONE = "none"  # full precision: no quantizer at that place


@dataclass(frozen=True)
class Precision:
    """One numeric format, e.g. ``int8`` or ``fp16``.

    Precisions are totally ordered by how much information a value keeps: first by
    storage bits, then floats above integers of the same width (they keep dynamic
    range), then by mantissa bits. ``fp32`` (no quantization) is above everything.
    The order drives the "lowering" rule of docs/rules.md (rule 4: an int8 layer does not emit int16).

    Example:
        >>> Precision.parse("Int16") > Precision.parse("int8")
        True
    """

    name: str
    kind: NumberKind
    bits: int
    mantissa_bits: int = 0
    exponent_bits: int = 0

    @property
    def is_int(self) -> bool:
        return self.kind is NumberKind.INT

    @property
    def is_float(self) -> bool:
        return self.kind is NumberKind.FLOAT

    @property
    def is_full(self) -> bool:
        """True for ``fp32``: no quantization at that place."""
        return self.kind is NumberKind.NONE

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype that simulates a float precision (None for integers)."""
        return _FLOAT_DTYPES.get(self.name)

    def _order_key(self) -> tuple[int, int, int]:
        if self.is_full:
            return (1 << 30, 0, 0)
        return (self.bits, 1 if self.is_float else 0, self.mantissa_bits)

    def __lt__(self, other: Precision) -> bool:
        return self._order_key() < other._order_key()

    def __le__(self, other: Precision) -> bool:
        return self._order_key() <= other._order_key()

    def __gt__(self, other: Precision) -> bool:
        return self._order_key() > other._order_key()

    def __ge__(self, other: Precision) -> bool:
        return self._order_key() >= other._order_key()

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Precision({self.name})"

    @staticmethod
    def parse(value: PrecisionLike) -> Precision:
        """Parse a precision name (case-insensitive) or pass a Precision through.

        Raises:
            ValueError: for anything else; the message lists the accepted names.
        """
        if isinstance(value, Precision):
            return value
        if isinstance(value, str):
            found = _BY_NAME.get(value.strip().lower())
            if found is not None:
                return found
        raise ValueError(
            f"unknown precision {value!r}; accepted (case-insensitive): {', '.join(ACCEPTED_NAMES)}"
        )

    @staticmethod
    def from_bitwidth(bitwidth: int, kind: NumberKind | str) -> Precision:
        """Map the reference's (bitwidth, dtype) pair to a precision.

        ``(16, "float")`` is fp16, ``(8, "float")`` is fp8 (e4m3), ``(32, "float")`` is fp32.
        """
        kind = NumberKind(kind) if isinstance(kind, str) else kind
        if kind is NumberKind.INT:
            if isinstance(bitwidth, bool) or not isinstance(bitwidth, int):
                raise ValueError(f"integer bitwidth must be an int, got {bitwidth!r}")
            return Precision.parse(f"int{bitwidth}")
        by_bits = {8: FP8_E4M3, 16: FP16, 32: FP32}
        if bitwidth not in by_bits:
            raise ValueError(f"float bitwidth must be one of 8, 16, 32; got {bitwidth!r}")
        return by_bits[bitwidth]


PrecisionLike = Precision | str

INT_PRECISIONS: dict[int, Precision] = {
    b: Precision(f"int{b}", NumberKind.INT, b) for b in [*range(2, 17), 32]
}
FP16 = Precision("fp16", NumberKind.FLOAT, 16, mantissa_bits=10, exponent_bits=5)
BF16 = Precision("bf16", NumberKind.FLOAT, 16, mantissa_bits=7, exponent_bits=8)
FP8_E4M3 = Precision("fp8_e4m3", NumberKind.FLOAT, 8, mantissa_bits=3, exponent_bits=4)
FP8_E5M2 = Precision("fp8_e5m2", NumberKind.FLOAT, 8, mantissa_bits=2, exponent_bits=5)
FP32 = Precision("fp32", NumberKind.NONE, 32, mantissa_bits=23, exponent_bits=8)
INT4, INT8, INT16, INT32 = (INT_PRECISIONS[b] for b in (4, 8, 16, 32))

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}

_BY_NAME: dict[str, Precision] = {p.name: p for p in INT_PRECISIONS.values()}
_BY_NAME.update({p.name: p for p in (FP16, BF16, FP8_E4M3, FP8_E5M2, FP32)})
ACCEPTED_NAMES: tuple[str, ...] = (*_BY_NAME, "fp8")
# The reference's own spellings, so ported scripts keep working.
_BY_NAME.update(
    {
        "fp8": FP8_E4M3,
        "float16": FP16,
        "bfloat16": BF16,
        "float32": FP32,
    }
)


def parse_optional(value: PrecisionLike | None) -> Precision | None:
    """Parse a precision where ``None`` means "leave alone"."""
    return None if value is None else Precision.parse(value)


def name_of(precision: Precision | None) -> str | None:
    """The precision's name, or None for no precision (tables and reports write None as null)."""
    return None if precision is None else precision.name


class QuantizationDataType(enum.Enum):
    """The reference's ``default_data_type``: integer or float quantization."""

    int = "int"
    float = "float"

    @staticmethod
    def parse(value: Any) -> QuantizationDataType:
        if isinstance(value, QuantizationDataType):
            return value
        if value is int or value is float:
            return QuantizationDataType(value.__name__)
        if isinstance(value, str) and value.lower() in ("int", "float"):
            return QuantizationDataType(value.lower())
        raise ValueError(
            f"data type must be QuantizationDataType.int/.float, int, float, 'int' or 'float'; got {value!r}"
        )

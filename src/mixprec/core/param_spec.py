"""ParamSpec: a parameter precision that may carry its own granularity (e.g. int4 in blocks of 64)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mixprec.core.granularity import Granularity, PerBlock, parse_granularity
from mixprec.core.precision import Precision

_KEYS = {"precision", "granularity", "axis", "block_size"}


@dataclass(frozen=True)
class ParamSpec:
    """A precision for a parameter, with an optional granularity overriding the config's.

    Accepted wherever ``set_precision(..., param=...)`` takes a precision:

    >>> mp.set_precision(layer, activation=None, param={"weight": ParamSpec("int4", PerBlock(64))})
    >>> mp.set_precision(layer, activation=None, param={"weight": {"precision": "int4", "block_size": 64}})
    """

    precision: Precision
    granularity: Granularity | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.granularity is not None:
            object.__setattr__(self, "granularity", parse_granularity(self.granularity))
        if isinstance(self.granularity, PerBlock) and not self.precision.is_int:
            raise ValueError(f"per-block granularity needs an integer precision, got {self.precision.name}")

    @staticmethod
    def parse(value: Any) -> ParamSpec:
        """A precision name, a Precision, a ParamSpec, or a dict with ``precision`` and optionally
        ``granularity`` ("per_tensor" / "per_channel" / "per_block" or an object), ``axis``, ``block_size``
        (``block_size`` alone means per-block)."""
        if isinstance(value, ParamSpec):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - _KEYS
            if unknown or "precision" not in value:
                raise ValueError(
                    f"param spec {dict(value)!r}: needs 'precision'; accepted keys: {', '.join(sorted(_KEYS))}"
                )
            name = value.get("granularity")
            if name is None and value.get("block_size") is not None:
                name = "per_block"
            granularity = (
                None
                if name is None
                else parse_granularity(name, axis=value.get("axis"), block_size=value.get("block_size"))
            )
            return ParamSpec(Precision.parse(value["precision"]), granularity)
        return ParamSpec(Precision.parse(value))

    def __str__(self) -> str:
        return (
            self.precision.name if self.granularity is None else f"{self.precision.name} ({self.granularity})"
        )

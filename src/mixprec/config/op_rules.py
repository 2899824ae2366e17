"""The config's small rule types: kernels, param rules and op-type rules, and their spellings.

These are the pieces a :class:`~mixprec.config.rules.SimConfig` is made of. They validate
themselves and write the reference's JSON format back (``to_dict``); the parser
(:mod:`mixprec.config.parse`) builds them from JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from mixprec.core.precision import INT_PRECISIONS, Precision
from mixprec.errors import ConfigError

ACCEPTED_BITWIDTHS = {
    "int": ", ".join(map(str, INT_PRECISIONS)),
    "float": "8 (fp8_e4m3), 16 (fp16), 32 (fp32)",
}

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """A read-only, hashable mapping that keeps insertion order (for ``to_dict``)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(items)
        self._hash: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        # Order-free, like the inherited Mapping equality it must agree with.
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


def describe(value: Any) -> str:
    """A short rendering of a bad value for error messages: its repr (cut) and JSON type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return f"{text} ({kinds.get(type(value), type(value).__name__)})"


def bool_text(value: bool) -> str:
    """The reference's spelling of a boolean in its JSON files: ``"True"`` / ``"False"`` strings.

    Used for the config's ``to_dict`` and the encodings file, so both also load in the reference.
    """
    return "True" if value else "False"


def check_bool_fields(rule: object) -> None:
    # Dataclasses do not check types; a stray "True" string here would read as truthy forever.
    for f in fields(rule):  # type: ignore[arg-type]
        value = getattr(rule, f.name)
        if f.type in ("bool", "bool | None") and not (
            isinstance(value, bool) or (value is None and f.type != "bool")
        ):
            raise ConfigError(f"{type(rule).__name__}.{f.name} must be {f.type}, got {describe(value)}")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel a backend offers: the activation precision and, for weighted ops, the param one.

    Strings are parsed: ``KernelSpec("int16", "int8")``.
    """

    activation: Precision
    param: Precision | None = None

    def __post_init__(self) -> None:
        for name in ("activation", "param") if self.param is not None else ("activation",):
            try:
                precision = Precision.parse(getattr(self, name))
            except ValueError as e:
                raise ConfigError(f"KernelSpec.{name}: {e}") from None
            if _bitwidth_dtype(precision) is None:
                raise ConfigError(
                    f"KernelSpec.{name}: {precision} has no (bitwidth, dtype) form in the config format; "
                    "accepted: int2..int16, int32, fp8_e4m3, fp16, fp32"
                )
            object.__setattr__(self, name, precision)

    def to_dict(self) -> dict[str, Any]:
        """The entry as in ``supported_kernels``: ``{"activation": {"bitwidth": 16, "dtype": "int"}, ...}``."""
        out = {"activation": _bitwidth_dtype(self.activation)}
        if self.param is not None:
            out["param"] = _bitwidth_dtype(self.param)
        return out


def _bitwidth_dtype(precision: Precision) -> dict[str, Any] | None:
    dtype = "int" if precision.is_int else "float"
    try:
        exact = Precision.from_bitwidth(precision.bits, dtype) == precision
    except ValueError:
        exact = False
    return {"bitwidth": precision.bits, "dtype": dtype} if exact else None


@dataclass(frozen=True)
class ParamRule:
    """Settings of params with one name; ``None`` defers to the less specific level."""

    is_quantized: bool | None = None
    is_symmetric: bool | None = None

    def __post_init__(self) -> None:
        check_bool_fields(self)

    def to_dict(self) -> dict[str, str]:
        """Only the keys that are set, written as the reference's ``"True"``/``"False"``."""
        set_ = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return {k: bool_text(v) for k, v in set_.items()}


OP_BOOL_KEYS = ("is_input_quantized", "is_output_quantized", "is_symmetric", "per_channel_quantization")


@dataclass(frozen=True)
class OpRule:
    """Settings of one op type (``op_type.Conv``); ``None`` defers to ``defaults``.

    ``params`` is keyed by param name; ``supported_kernels`` replaces the default list.
    """

    is_input_quantized: bool | None = None
    is_output_quantized: bool | None = None
    is_symmetric: bool | None = None
    per_channel_quantization: bool | None = None
    params: Mapping[str, ParamRule] = FrozenMap()
    supported_kernels: tuple[KernelSpec, ...] | None = None

    def __post_init__(self) -> None:
        check_bool_fields(self)
        object.__setattr__(self, "params", FrozenMap(self.params))
        if self.supported_kernels is not None:
            object.__setattr__(self, "supported_kernels", tuple(self.supported_kernels))

    def to_dict(self) -> dict[str, Any]:
        """Only the keys that are set, in the reference's format."""
        out: dict[str, Any] = {
            k: bool_text(getattr(self, k)) for k in OP_BOOL_KEYS if getattr(self, k) is not None
        }
        if self.params:
            out["params"] = {name: rule.to_dict() for name, rule in self.params.items()}
        if self.supported_kernels is not None:
            out["supported_kernels"] = [k.to_dict() for k in self.supported_kernels]
        return out

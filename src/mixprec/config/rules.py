"""The sim config: the reference's JSON quantsim-config format, parsed once into frozen typed rules.

Where quantizers exist (op outputs/inputs, params), their symmetry, per-channel weights,
fused supergroups and the backend's supported kernels all come from here. The sim asks
resolved questions (``is_output_quantized("Conv")``) and never sees raw JSON.

Example:
    >>> cfg = load_config("default")
    >>> cfg.is_param_quantized("Conv", "bias"), cfg.is_output_quantized("Squeeze")
    (False, False)
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, Union

from mixprec.core.precision import INT_PRECISIONS, Precision
from mixprec.errors import ConfigError

__all__ = ["PRESET_NAMES", "ConfigSource", "KernelSpec", "OpRule", "ParamRule", "SimConfig", "load_config"]

PRESET_NAMES: tuple[str, ...] = ("default", "per_channel", "edge_strict")

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


def _fmt_bool(value: bool) -> str:
    # The reference's spelling, so that our to_dict output also loads in the reference.
    return "True" if value else "False"


def _param_candidates(name: str) -> tuple[str, ...]:
    # "out_proj.weight" -> (.., "weight"); "in_proj_bias" -> (.., "bias"): torch names, config keys.
    last = name.rsplit(".", 1)[-1]
    found = [name, last]
    if last.endswith("bias"):
        found.append("bias")
    elif last.endswith("_weight"):
        found.append("weight")
    return tuple(dict.fromkeys(found))


def _check_bool_fields(rule: object) -> None:
    # Dataclasses do not check types; a stray "True" string here would read as truthy forever.
    for f in fields(rule):  # type: ignore[arg-type]
        value = getattr(rule, f.name)
        if f.type in ("bool", "bool | None") and not (
            isinstance(value, bool) or (value is None and f.type != "bool")
        ):
            raise ConfigError(f"{type(rule).__name__}.{f.name} must be {f.type}, got {describe(value)}")


def _first(*values: bool | None) -> bool:
    return next(v for v in values if v is not None)


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
        _check_bool_fields(self)

    def to_dict(self) -> dict[str, str]:
        """Only the keys that are set, written as the reference's ``"True"``/``"False"``."""
        set_ = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return {k: _fmt_bool(v) for k, v in set_.items()}


OP_BOOL_KEYS = ("is_input_quantized", "is_output_quantized", "is_symmetric", "per_channel_quantization")


@dataclass(frozen=True)
class OpRule:
    """Settings of one op type (``op_type.Conv``); ``None`` defers to ``defaults``.

    ``params`` is keyed by param name; ``supported_kernels`` replaces the default list;
    ``encoding_constraints`` is a fixed ``(min, max)`` range for the op's output.
    """

    is_input_quantized: bool | None = None
    is_output_quantized: bool | None = None
    is_symmetric: bool | None = None
    per_channel_quantization: bool | None = None
    params: Mapping[str, ParamRule] = FrozenMap()
    supported_kernels: tuple[KernelSpec, ...] | None = None
    encoding_constraints: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _check_bool_fields(self)
        object.__setattr__(self, "params", FrozenMap(self.params))
        if self.supported_kernels is not None:
            object.__setattr__(self, "supported_kernels", tuple(self.supported_kernels))
        if self.encoding_constraints is not None:
            low, high = (float(v) for v in self.encoding_constraints)
            if not low < high:
                raise ConfigError(f"OpRule.encoding_constraints: min must be below max, got ({low}, {high})")
            object.__setattr__(self, "encoding_constraints", (low, high))

    def to_dict(self) -> dict[str, Any]:
        """Only the keys that are set, in the reference's format."""
        out: dict[str, Any] = {
            k: _fmt_bool(getattr(self, k)) for k in OP_BOOL_KEYS if getattr(self, k) is not None
        }
        if self.params:
            out["params"] = {name: rule.to_dict() for name, rule in self.params.items()}
        if self.supported_kernels is not None:
            out["supported_kernels"] = [k.to_dict() for k in self.supported_kernels]
        if self.encoding_constraints is not None:
            out["encoding_constraints"] = dict(zip(("min", "max"), self.encoding_constraints, strict=True))
        return out


_NO_RULE = OpRule()
_NO_PARAM_RULE = ParamRule()


@dataclass(frozen=True)
class SimConfig:
    """A validated sim config, with the reference's defaults filled in for absent keys.

    Build one with :func:`load_config` or :meth:`from_dict`. Fields prefixed ``default_``
    apply to every op type that ``op_types`` does not override; ask the resolved queries
    (``is_output_quantized``, ``is_param_quantized``, ...) rather than reading fields.
    ``source`` (file path, ``"<preset NAME>"`` or ``"<dict>"``) is left out of equality.
    """

    source: str = field(default="<dict>", compare=False)
    default_output_quantized: bool = True
    default_input_quantized: bool = False
    default_activation_symmetric: bool = False
    default_param_quantized: bool = True
    default_param_symmetric: bool = True
    default_per_channel: bool = False
    default_kernels: tuple[KernelSpec, ...] | None = None
    strict_symmetric: bool = False
    unsigned_symmetric: bool = True
    hw_version: str | None = None
    params: Mapping[str, ParamRule] = FrozenMap()
    op_types: Mapping[str, OpRule] = FrozenMap()
    supergroups: tuple[tuple[str, ...], ...] = ()
    model_input_quantized: bool = True
    model_output_quantized: bool | None = None

    def __post_init__(self) -> None:
        _check_bool_fields(self)
        object.__setattr__(self, "params", FrozenMap(self.params))
        object.__setattr__(self, "op_types", FrozenMap(self.op_types))
        object.__setattr__(self, "supergroups", tuple(tuple(g) for g in self.supergroups))
        if self.default_kernels is not None:
            object.__setattr__(self, "default_kernels", tuple(self.default_kernels))
        for group in self.supergroups:
            if len(group) < 2 or not all(isinstance(op, str) and op for op in group):
                raise ConfigError(
                    f"SimConfig.supergroups: each needs at least 2 op type names, got {group!r}"
                )

    def _rule(self, op_type: str) -> OpRule:
        return self.op_types.get(op_type, _NO_RULE)

    def is_output_quantized(self, op_type: str) -> bool:
        """Whether ops of this type get an output quantizer (supergroups aside)."""
        return _first(self._rule(op_type).is_output_quantized, self.default_output_quantized)

    def is_input_quantized(self, op_type: str) -> bool:
        """Whether ops of this type get their own input quantizers."""
        return _first(self._rule(op_type).is_input_quantized, self.default_input_quantized)

    def is_activation_symmetric(self, op_type: str) -> bool:
        """Whether this op type's input/output quantizers use symmetric encodings."""
        return _first(self._rule(op_type).is_symmetric, self.default_activation_symmetric)

    def is_per_channel(self, op_type: str) -> bool:
        """Whether this op type's weights are quantized per output channel."""
        return _first(self._rule(op_type).per_channel_quantization, self.default_per_channel)

    def kernels_for(self, op_type: str) -> tuple[KernelSpec, ...] | None:
        """The backend kernels of this op type (its own list, else the default one); None: no limit."""
        own = self._rule(op_type).supported_kernels
        return self.default_kernels if own is None else own

    def encoding_constraints_for(self, op_type: str) -> tuple[float, float] | None:
        """The fixed output range ``(min, max)`` of this op type, if the config sets one."""
        return self._rule(op_type).encoding_constraints

    def is_param_quantized(self, op_type: str, param_name: str) -> bool:
        """Whether a param gets a quantizer. See :meth:`_param_setting` for the lookup order."""
        return self._param_setting(op_type, param_name, "is_quantized", self.default_param_quantized)

    def is_param_symmetric(self, op_type: str, param_name: str) -> bool:
        """Whether a param's quantizer is symmetric. Same lookup as :meth:`is_param_quantized`."""
        return self._param_setting(op_type, param_name, "is_symmetric", self.default_param_symmetric)

    def _param_setting(self, op_type: str, param_name: str, attr: str, default: bool) -> bool:
        # Level first (op_type params, then top-level params, then defaults), then within a
        # level the most specific spelling of the torch name ("out_proj.weight", "weight").
        keys = _param_candidates(param_name)
        for rules in (self._rule(op_type).params, self.params):
            for key in keys:
                value = getattr(rules.get(key, _NO_PARAM_RULE), attr)
                if value is not None:
                    return value
        return default

    def to_dict(self) -> dict[str, Any]:
        """The config in the reference's JSON format (booleans as ``"True"``/``"False"``).

        ``SimConfig.from_dict(c.to_dict()) == c``; defaults are written out explicitly.
        """
        ops = {"is_output_quantized": _fmt_bool(self.default_output_quantized)}
        if self.default_input_quantized:
            # Written only when set: the reference rejects the key in defaults.
            ops["is_input_quantized"] = "True"
        ops["is_symmetric"] = _fmt_bool(self.default_activation_symmetric)
        defaults: dict[str, Any] = {
            "ops": ops,
            "params": ParamRule(self.default_param_quantized, self.default_param_symmetric).to_dict(),
            "strict_symmetric": _fmt_bool(self.strict_symmetric),
            "unsigned_symmetric": _fmt_bool(self.unsigned_symmetric),
            "per_channel_quantization": _fmt_bool(self.default_per_channel),
        }
        if self.hw_version is not None:
            defaults["hw_version"] = self.hw_version
        if self.default_kernels is not None:
            defaults["supported_kernels"] = [k.to_dict() for k in self.default_kernels]
        return {
            "defaults": defaults,
            "params": {name: rule.to_dict() for name, rule in self.params.items()},
            "op_type": {name: rule.to_dict() for name, rule in self.op_types.items()},
            "supergroups": [{"op_list": list(group)} for group in self.supergroups],
            "model_input": {"is_input_quantized": _fmt_bool(self.model_input_quantized)},
            "model_output": (
                {}
                if self.model_output_quantized is None
                else {"is_output_quantized": _fmt_bool(self.model_output_quantized)}
            ),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> SimConfig:
        """Validate a config in the reference's JSON format, given as parsed JSON (every key optional).

        Args:
            data: the parsed JSON.
            source: what to call the config in error messages (a file path, ``"<dict>"``).

        Raises:
            ConfigError: for an unknown key or a bad value; the message names ``source``, the key
                path (``op_type.Conv.per_channel_quantization``), the value and what is accepted.
        """
        # Imported here: the parser builds this module's types, so it imports this module.
        from mixprec.config.parse import parse_config

        return parse_config(data, source)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> SimConfig:
        """Parse and validate JSON text; invalid JSON is a ConfigError naming line and column."""
        from mixprec.config.parse import parse_config, parse_json

        return parse_config(parse_json(text, source), source)


@functools.cache
def _preset(name: str) -> SimConfig:
    # Safe to share: SimConfig is immutable.
    text = (resources.files("mixprec.config") / "presets" / f"{name}.json").read_text(encoding="utf-8")
    return SimConfig.from_json(text, f"<preset {name}>")


ConfigSource = Union[str, "os.PathLike[str]", Mapping[str, Any], SimConfig, None]


def load_config(source: ConfigSource = None) -> SimConfig:
    """Load a sim config from wherever the user points.

    Args:
        source: ``None`` (the ``"default"`` preset), a preset name from :data:`PRESET_NAMES`
            (names win over files of the same name), a path to a JSON file, a dict in the
            JSON format, or a :class:`SimConfig` (returned as is).

    Raises:
        ConfigError: for a missing or unreadable file, invalid JSON (with line and column),
            an unknown key or a bad value.

    Example:
        >>> load_config({"defaults": {"per_channel_quantization": True}}).is_per_channel("Conv")
        True
    """
    if source is None:
        return _preset("default")
    if isinstance(source, SimConfig):
        return source
    if isinstance(source, Mapping):
        return SimConfig.from_dict(source)
    if isinstance(source, str) and source in PRESET_NAMES:
        return _preset(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            "config_file must be None, a preset name, a path to a .json file, a dict or a SimConfig; "
            f"got {describe(source)}"
        )
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        near = difflib.get_close_matches(str(source), PRESET_NAMES, n=1)
        raise ConfigError(
            f"sim config file {str(path)!r} not found; "
            + (f"did you mean the preset {near[0]!r}? " if near else "")
            + f"give a path to an existing .json file or a preset name: {', '.join(PRESET_NAMES)}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"sim config file {str(path)!r} could not be read: {e}") from None
    return SimConfig.from_json(text, str(path))

"""Parsing of the sim config's JSON into :mod:`mixprec.config.op_rules` types, with key-path errors.

:class:`~mixprec.config.rules.SimConfig` is built from :func:`parse_config_fields` by its
``from_dict``; this module does not know the class, so the config package imports one way.

Every error names the config's source, the key path (``op_type.Conv.per_channel_quantization``),
the bad value and what is accepted.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mixprec.config.op_rules import (
    ACCEPTED_BITWIDTHS,
    OP_BOOL_KEYS,
    FrozenMap,
    KernelSpec,
    OpRule,
    ParamRule,
    describe,
)
from mixprec.core.precision import Precision
from mixprec.errors import ConfigError

BOOL_ACCEPTED = 'true, false, or the strings "True"/"False" (any case)'
_TOP_KEYS = ("defaults", "params", "op_type", "supergroups", "model_input", "model_output")
_DEFAULTS_KEYS = (
    "ops",
    "params",
    "strict_symmetric",
    "unsigned_symmetric",
    "per_channel_quantization",
    "hw_version",
    "supported_kernels",
)


@dataclass(frozen=True)
class At:
    """Where a value sits: the config's source and the key path inside it."""

    source: str
    path: str = ""

    def key(self, name: str) -> At:
        return At(self.source, f"{self.path}.{name}" if self.path else name)

    def index(self, i: int) -> At:
        return At(self.source, f"{self.path}[{i}]")

    def error(self, problem: str) -> ConfigError:
        return ConfigError(f"sim config {self.source!r}: {self.path or '(top level)'}: {problem}")


def obj(value: Any, at: At, allowed: Iterable[str]) -> Mapping[str, Any]:
    """Check that ``value`` is an object whose keys are all in ``allowed``."""
    allowed = tuple(allowed)
    if not isinstance(value, Mapping):
        raise at.error(
            f"expected an object {{...}} with keys among {', '.join(allowed)}; got {describe(value)}"
        )
    for key in value:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise at.key(str(key)).error(f"unknown key {key!r}; {hint}accepted here: {', '.join(allowed)}")
    return value


def named_objs(value: Any, at: At, what: str) -> Mapping[str, Any]:
    """Check an object keyed by free names (op types, param names): non-empty string keys."""
    if not isinstance(value, Mapping):
        raise at.error(f"expected an object {{name: {{...}}}} keyed by {what}; got {describe(value)}")
    for key in value:
        if not isinstance(key, str) or not key:
            raise at.error(f"{what} must be non-empty strings; got key {describe(key)}")
    return value


def array(value: Any, at: At, what: str, min_len: int = 0) -> list[Any]:
    """Check that ``value`` is a JSON array of at least ``min_len`` items."""
    if not isinstance(value, (list, tuple)):
        raise at.error(f"expected an array of {what}; got {describe(value)}")
    if len(value) < min_len:
        raise at.error(f"expected at least {min_len} {what}; got {len(value)}")
    return list(value)


def boolean(data: Mapping[str, Any], key: str, at: At) -> bool | None:
    """Read an optional boolean (None when absent), as a JSON boolean or the reference's ``"True"``."""
    if key not in data:
        return None
    value = data[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise at.key(key).error(f"expected a boolean, got {describe(value)}; accepted: {BOOL_ACCEPTED}")


def parse_json(text: str, source: str) -> Any:
    """Parse JSON text; errors name the source, line and column, and duplicate keys are errors."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                # json would silently keep the last one, dropping a rule the user wrote.
                raise ConfigError(f"sim config {source!r}: key {key!r} appears twice in one object; keep one")
            seen[key] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except RecursionError:
        # json recurses once per level: a hostile or broken file must not crash the caller
        raise ConfigError(f"sim config {source!r}: JSON nested too deeply to be a sim config") from None
    except json.JSONDecodeError as e:
        lines = text.splitlines()
        line = lines[e.lineno - 1].strip() if 0 < e.lineno <= len(lines) else ""
        raise ConfigError(
            f"sim config {source!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
            + (f": {line[:80]}" if line else "")
        ) from None


def parse_precision(data: Any, at: At) -> Precision:
    """Read ``{"bitwidth": 16, "dtype": "int"}``."""
    data = obj(data, at, ("bitwidth", "dtype"))
    for key in ("bitwidth", "dtype"):
        if key not in data:
            raise at.error(f'missing key "{key}"; write e.g. {{"bitwidth": 8, "dtype": "int"}}')
    dtype, bits = data["dtype"], data["bitwidth"]
    if dtype not in ACCEPTED_BITWIDTHS:
        raise at.key("dtype").error(f'expected "int" or "float", got {describe(dtype)}')
    bad = at.key("bitwidth").error(
        f"bitwidth {describe(bits)} is not valid with dtype {dtype!r}; accepted: {ACCEPTED_BITWIDTHS[dtype]}"
    )
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise bad
    try:
        return Precision.from_bitwidth(bits, dtype)
    except ValueError:
        raise bad from None


def parse_kernels(data: Any, at: At) -> tuple[KernelSpec, ...]:
    """Read a non-empty ``supported_kernels`` list (``param`` optional in each entry)."""
    kernels = []
    for i, item in enumerate(array(data, at, 'kernels {"activation": {...}, "param": {...}}', min_len=1)):
        where = at.index(i)
        item = obj(item, where, ("activation", "param"))
        if "activation" not in item:
            raise where.error('missing key "activation" (param is optional)')
        param = item.get("param")
        kernels.append(
            KernelSpec(
                parse_precision(item["activation"], where.key("activation")),
                None if param is None else parse_precision(param, where.key("param")),
            )
        )
    return tuple(kernels)


def parse_param_rule(data: Any, at: At) -> ParamRule:
    """Read ``{"is_quantized": ..., "is_symmetric": ...}``."""
    data = obj(data, at, ("is_quantized", "is_symmetric"))
    return ParamRule(boolean(data, "is_quantized", at), boolean(data, "is_symmetric", at))


def parse_param_rules(data: Any, at: At) -> FrozenMap[str, ParamRule]:
    """Read an object of param rules keyed by param name."""
    data = named_objs(data, at, "param names")
    return FrozenMap((name, parse_param_rule(rule, at.key(name))) for name, rule in data.items())


def parse_op_rule(data: Any, at: At) -> OpRule:
    """Read one ``op_type`` entry."""
    if isinstance(data, Mapping) and "encoding_constraints" in data:
        # The reference format has this key; mixprec does not apply fixed output ranges, and
        # silently calibrating instead would give the user other encodings than they asked for.
        raise at.key("encoding_constraints").error(
            "not supported: mixprec does not apply fixed output ranges; remove the key (the output "
            "range is then calibrated by compute_encodings like any other)"
        )
    data = obj(data, at, (*OP_BOOL_KEYS, "params", "supported_kernels"))
    kernels = data.get("supported_kernels")
    return OpRule(
        **{k: boolean(data, k, at) for k in OP_BOOL_KEYS},
        params=parse_param_rules(data.get("params", {}), at.key("params")),
        supported_kernels=None if kernels is None else parse_kernels(kernels, at.key("supported_kernels")),
    )


def parse_supergroups(data: Any, at: At) -> tuple[tuple[str, ...], ...]:
    """Read ``[{"op_list": ["Conv", "Relu"]}, ...]``."""
    groups = []
    for i, item in enumerate(array(data, at, 'supergroups {"op_list": [...]}')):
        where = at.index(i)
        item = obj(item, where, ("op_list",))
        if "op_list" not in item:
            raise where.error('missing key "op_list"; write e.g. {"op_list": ["Conv", "Relu"]}')
        ops = array(item["op_list"], where.key("op_list"), "op type names", min_len=2)
        for j, op in enumerate(ops):
            if not isinstance(op, str) or not op:
                raise (
                    where.key("op_list")
                    .index(j)
                    .error(f"expected an op type name string, got {describe(op)}")
                )
        groups.append(tuple(ops))
    return tuple(groups)


def parse_config_fields(data: Any, source: str) -> dict[str, Any]:
    """Read a whole config into ``SimConfig`` fields; absent keys are left out, so they take
    ``SimConfig``'s defaults (the reference's)."""
    at = At(source)
    if not isinstance(data, Mapping):
        raise at.error(f"the top level must be a JSON object {{...}}, got {describe(data)}")
    top = obj(data, at, _TOP_KEYS)
    d_at, o_at = at.key("defaults"), at.key("defaults").key("ops")
    defaults = obj(top.get("defaults", {}), d_at, _DEFAULTS_KEYS)
    ops = obj(defaults.get("ops", {}), o_at, ("is_input_quantized", "is_output_quantized", "is_symmetric"))
    param_defaults = parse_param_rule(defaults.get("params", {}), d_at.key("params"))
    hw_version = defaults.get("hw_version")
    if hw_version is not None and not isinstance(hw_version, str):
        raise d_at.key("hw_version").error(f"expected a string such as 'V73', got {describe(hw_version)}")
    kernels = defaults.get("supported_kernels")
    model_in = obj(top.get("model_input", {}), at.key("model_input"), ("is_input_quantized",))
    model_out = obj(top.get("model_output", {}), at.key("model_output"), ("is_output_quantized",))
    given = {
        "default_output_quantized": boolean(ops, "is_output_quantized", o_at),
        "default_input_quantized": boolean(ops, "is_input_quantized", o_at),
        "default_activation_symmetric": boolean(ops, "is_symmetric", o_at),
        "default_param_quantized": param_defaults.is_quantized,
        "default_param_symmetric": param_defaults.is_symmetric,
        "default_per_channel": boolean(defaults, "per_channel_quantization", d_at),
        "default_kernels": None if kernels is None else parse_kernels(kernels, d_at.key("supported_kernels")),
        "strict_symmetric": boolean(defaults, "strict_symmetric", d_at),
        "unsigned_symmetric": boolean(defaults, "unsigned_symmetric", d_at),
        "hw_version": hw_version,
        "model_input_quantized": boolean(model_in, "is_input_quantized", at.key("model_input")),
        "model_output_quantized": boolean(model_out, "is_output_quantized", at.key("model_output")),
    }
    op_at = at.key("op_type")
    op_types = named_objs(top.get("op_type", {}), op_at, "op type names")
    return dict(
        params=parse_param_rules(top.get("params", {}), at.key("params")),
        op_types=FrozenMap((name, parse_op_rule(rule, op_at.key(name))) for name, rule in op_types.items()),
        supergroups=parse_supergroups(top.get("supergroups", []), at.key("supergroups")),
        # None means absent: the field's default applies.
        **{k: v for k, v in given.items() if v is not None},
    )

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

from mixprec.config.op_rules import (
    FrozenMap,
    KernelSpec,
    OpRule,
    ParamRule,
    bool_text,
    check_bool_fields,
    describe,
)
from mixprec.config.parse import parse_config_fields, parse_json
from mixprec.errors import ConfigError

__all__ = ["PRESET_NAMES", "ConfigSource", "KernelSpec", "OpRule", "ParamRule", "SimConfig", "load_config"]

PRESET_NAMES: tuple[str, ...] = ("default", "per_channel", "edge_strict")

_NO_RULE = OpRule()
_NO_PARAM_RULE = ParamRule()


def _param_candidates(name: str) -> tuple[str, ...]:
    # "out_proj.weight" -> (.., "weight"); "in_proj_bias" -> (.., "bias"): torch names, config keys.
    last = name.rsplit(".", 1)[-1]
    found = [name, last]
    if last.endswith("bias"):
        found.append("bias")
    elif last.endswith("_weight"):
        found.append("weight")
    return tuple(dict.fromkeys(found))


def _first(*values: bool | None) -> bool:
    return next(v for v in values if v is not None)


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
        check_bool_fields(self)
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
        ops = {"is_output_quantized": bool_text(self.default_output_quantized)}
        if self.default_input_quantized:
            # Written only when set: the reference rejects the key in defaults.
            ops["is_input_quantized"] = "True"
        ops["is_symmetric"] = bool_text(self.default_activation_symmetric)
        defaults: dict[str, Any] = {
            "ops": ops,
            "params": ParamRule(self.default_param_quantized, self.default_param_symmetric).to_dict(),
            "strict_symmetric": bool_text(self.strict_symmetric),
            "unsigned_symmetric": bool_text(self.unsigned_symmetric),
            "per_channel_quantization": bool_text(self.default_per_channel),
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
            "model_input": {"is_input_quantized": bool_text(self.model_input_quantized)},
            "model_output": (
                {}
                if self.model_output_quantized is None
                else {"is_output_quantized": bool_text(self.model_output_quantized)}
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
        return cls(source=source, **parse_config_fields(data, source))

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> SimConfig:
        """Parse and validate JSON text; invalid JSON is a ConfigError naming line and column."""
        return cls.from_dict(parse_json(text, source), source)


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

"""Profile files: an ordered list of precision requests in YAML or JSON, recorded by ``apply_profile``.

A profile is the configurator's ``set_*`` calls written down, so a mixed precision recipe can be
kept next to a model, reviewed, and replayed from the command line::

    version: 1
    strict: true
    requests:
      - set_precision: {target: layer1.conv1, activation: int16, param: {weight: int16}}
      - set_precision: {target: torch.nn.AvgPool2d, activation: int16}
      - model_input: {activation: int16}
      - model_output: {activation: [null, int16]}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from mixprec.core.granularity import PerBlock, PerChannel
from mixprec.core.param_spec import ParamSpec
from mixprec.core.precision import Precision
from mixprec.errors import ProfileError, RequestError
from mixprec.mixed.profile_targets import io_activation, profile_target, resolve_target
from mixprec.mixed.profile_text import Lines, parse_text, yaml_module
from mixprec.plan.requests import Request, RequestKind
from mixprec.quantsim import QuantizationSimModel

PROFILE_VERSION = 1
_TOP_KEYS = ("version", "strict", "requests")


class Recorder(Protocol):
    """What profiles record into and are made from: a ``MixedPrecisionConfigurator``.

    Typed by what is used, so this module does not import the configurator (which imports it).
    """

    sim: QuantizationSimModel

    def __init__(self, sim: QuantizationSimModel) -> None: ...

    @property
    def requests(self) -> tuple[Request, ...]: ...

    def set_precision(
        self, target: Any, activation: Any, param: dict[str, Any] | None = None, *, within: Any = None
    ) -> None: ...

    def set_model_input_precision(self, activation: Any) -> None: ...

    def set_model_output_precision(self, activation: Any) -> None: ...

    def _recorded_at(self, location: str) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class SetPrecision:
    """``set_precision(target, activation, param)``; ``target`` is a layer name, a glob, ``re:`` regex,
    or an importable class/function path (``torch.nn.Conv2d``, ``torch.matmul``)."""

    target: str
    activation: str | None | tuple[str | None, ...] = None
    param: tuple[tuple[str, ParamSpec], ...] = ()
    line: int | None = field(default=None, compare=False)
    comment: str | None = field(default=None, compare=False)  # written above the entry in YAML
    key: ClassVar[str] = "set_precision"

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"target": self.target, "activation": _thaw(self.activation)}
        if self.param:
            body["param"] = {name: _spec_data(spec) for name, spec in self.param}
        return {self.key: body}


@dataclass(frozen=True)
class ModelInput:
    """``set_model_input_precision(activation)``: one precision, or a (nested) list/dict like the inputs."""

    activation: Any
    line: int | None = field(default=None, compare=False)
    key: ClassVar[str] = "model_input"

    def to_dict(self) -> dict[str, Any]:
        return {self.key: {"activation": _thaw(self.activation)}}


@dataclass(frozen=True)
class ModelOutput(ModelInput):
    """``set_model_output_precision(activation)``: one precision, or a (nested) list/dict like the outputs."""

    key: ClassVar[str] = "model_output"


ProfileRequest = SetPrecision | ModelInput | ModelOutput


@dataclass(frozen=True)
class Profile:
    """A typed profile: requests in order, and the ``strict`` flag ``apply`` should use.

    Example:
        >>> profile = mixprec.load_profile("profile.yaml")
        >>> mp.apply_profile(profile)
        >>> report = mp.apply(strict=profile.strict)
    """

    requests: tuple[ProfileRequest, ...] = ()
    strict: bool = True
    source: str = field(default="<profile>", compare=False)

    @staticmethod
    def from_dict(data: Any, source: str = "<profile>", lines: Lines | None = None) -> Profile:
        """Validate a parsed profile document.

        Raises:
            ProfileError: naming the file, the entry (from 1) and its line where known.
        """
        lines = lines or Lines()
        if not isinstance(data, Mapping):
            raise ProfileError(
                f"{source}: a profile is a mapping with keys {list(_TOP_KEYS)}, got {_kind(data)}"
            )
        for key in data:
            if key not in _TOP_KEYS:
                raise ProfileError(
                    f"{source}{lines.at_key(key)}: unknown key {key!r}; accepted: {', '.join(_TOP_KEYS)}"
                )
        version = data.get("version", PROFILE_VERSION)
        if version != PROFILE_VERSION:
            raise ProfileError(
                f"{source}{lines.at_key('version')}: version {version!r} is not supported; use {PROFILE_VERSION}"
            )
        strict = data.get("strict", True)
        if not isinstance(strict, bool):
            raise ProfileError(
                f"{source}{lines.at_key('strict')}: strict must be true or false, got {strict!r}"
            )
        entries = data.get("requests", [])
        if not isinstance(entries, list):
            raise ProfileError(
                f"{source}{lines.at_key('requests')}: requests must be a list, got {_kind(entries)}"
            )
        parsed = tuple(
            _parse_entry(e, f"{source}: {_where(i, lines.entry(i))}", lines.entry(i))
            for i, e in enumerate(entries)
        )
        return Profile(parsed, strict, source)

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the file format (``version``, ``strict``, ``requests``)."""
        return {
            "version": PROFILE_VERSION,
            "strict": self.strict,
            "requests": [r.to_dict() for r in self.requests],
        }

    def save(self, path: str | Path) -> Path:
        """Write as YAML (``.yaml``/``.yml``) or JSON (``.json``), chosen by the suffix."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        elif suffix in (".yaml", ".yml"):
            text = self._yaml_text()
        else:
            raise ProfileError(
                f"{path}: profile files end in .yaml, .yml or .json, got {suffix or 'no suffix'!r}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def _yaml_text(self) -> str:
        """YAML, with each entry's comment (if any) as a ``#`` line above it."""
        yaml, data = yaml_module(), self.to_dict()
        if not any(getattr(r, "comment", None) for r in self.requests):
            return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
        head = yaml.safe_dump({k: v for k, v in data.items() if k != "requests"}, sort_keys=False)
        lines = [head.rstrip("\n"), "requests:"]
        for request, body in zip(self.requests, data["requests"], strict=True):
            for line in (getattr(request, "comment", None) or "").splitlines():
                lines.append(f"# {line}")
            lines.append(yaml.safe_dump([body], sort_keys=False, default_flow_style=None).rstrip("\n"))
        return "\n".join(lines) + "\n"


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file (.yaml/.yml or .json).

    Raises:
        ProfileError: unreadable file, bad syntax or schema; the message names the line/entry at fault.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror or exc}") from exc
    source = str(path)
    try:
        data = parse_text(text, source, path.suffix.lower() == ".json")
    except RecursionError:
        # the parsers recurse once per level: a broken file must not crash the caller
        raise ProfileError(f"{source}: nested too deeply to be a profile") from None
    return Profile.from_dict(data, source, Lines.of(text))


def record_profile(mp: Recorder, profile: Profile | str | Path | Mapping) -> None:
    """Record a profile's requests on ``mp`` in order, all or nothing.

    Each request's location reads ``<file>:entry N`` so reports point at the profile, not at this code.

    Raises:
        ProfileError: an entry the model cannot honour (unknown layer, bad param name...); nothing is recorded.
    """
    if not isinstance(profile, Profile):
        profile = Profile.from_dict(profile) if isinstance(profile, Mapping) else load_profile(profile)
    # A dry run on a scratch configurator validates every entry first, so a bad entry 5 leaves
    # entries 1-4 unrecorded (as one bad set_* call records nothing).
    for target in (type(mp)(mp.sim), mp):
        for index, entry in enumerate(profile.requests):
            where = f"{profile.source}:entry {index + 1}"
            try:
                with target._recorded_at(where):
                    _record(target, entry)
            except RequestError as exc:
                raise ProfileError(f"{profile.source}: {_where(index, entry.line)}: {exc}") from exc


def profile_from_requests(mp: Recorder, path: str | Path | None = None) -> Profile:
    """The requests recorded on ``mp`` so far as a profile (module targets become qualified names)."""
    entries: list[ProfileRequest] = []
    for r in mp.requests:
        if r.kind is RequestKind.LAYER:
            entries.append(
                SetPrecision(
                    profile_target(r),
                    _freeze(r.describe_activation()),
                    tuple((k, ParamSpec.parse(v)) for k, v in r.params),
                )
            )
        elif r.kind is RequestKind.MODEL_INPUT:
            entries.append(
                ModelInput(_freeze(io_activation(mp.sim.input_skeleton, mp.sim.graph.inputs, r.io)))
            )
        else:
            entries.append(
                ModelOutput(_freeze(io_activation(mp.sim.output_skeleton, mp.sim.graph.outputs, r.io)))
            )
    profile = Profile(tuple(entries), True, str(path) if path is not None else "<profile>")
    if path is not None:
        profile.save(path)
    return profile


def _record(mp: Recorder, entry: ProfileRequest) -> None:
    if isinstance(entry, SetPrecision):
        target = resolve_target(mp.sim, entry.target)
        mp.set_precision(target, activation=_thaw(entry.activation), param=dict(entry.param) or None)
    elif isinstance(entry, ModelOutput):
        mp.set_model_output_precision(activation=_thaw(entry.activation))
    else:
        mp.set_model_input_precision(activation=_thaw(entry.activation))


def _parse_entry(entry: Any, where: str, line: int | None) -> ProfileRequest:
    keys = (SetPrecision.key, ModelInput.key, ModelOutput.key)
    if not isinstance(entry, Mapping) or len(entry) != 1 or next(iter(entry)) not in keys:
        raise ProfileError(
            f"{where}: expected a mapping with one key ({', '.join(keys)}), got {entry!r}; "
            "e.g. {set_precision: {target: layer1.conv1, activation: int16}}"
        )
    ((key, body),) = entry.items()
    allowed = ("target", "activation", "param") if key == SetPrecision.key else ("activation",)
    if not isinstance(body, Mapping):
        raise ProfileError(f"{where}: {key} takes a mapping with keys {list(allowed)}, got {body!r}")
    unknown = [k for k in body if k not in allowed]
    if unknown:
        raise ProfileError(f"{where}: {key} has unknown key(s) {unknown}; accepted: {', '.join(allowed)}")
    if "activation" not in body and key != SetPrecision.key:
        raise ProfileError(
            f"{where}: {key} needs 'activation' (a precision, or a list/dict shaped like the model's)"
        )
    activation = _precisions(
        body.get("activation"), f"{where}: {key}.activation", nested=key != SetPrecision.key
    )
    if key == ModelInput.key:
        return ModelInput(activation, line)
    if key == ModelOutput.key:
        return ModelOutput(activation, line)
    target = body.get("target")
    if not isinstance(target, str) or not target.strip():
        raise ProfileError(
            f"{where}: set_precision needs 'target': a layer name, glob, 're:' regex or class path, got {target!r}"
        )
    param = body.get("param") or {}
    if not isinstance(param, Mapping) or not all(isinstance(k, str) for k in param):
        raise ProfileError(f"{where}: set_precision.param must map param names to precisions, got {param!r}")
    if "activation" not in body and not param:
        raise ProfileError(f"{where}: set_precision needs 'activation' or 'param' (or both)")
    params = tuple((k, _param_spec(v, f"{where}: param {k!r}")) for k, v in param.items())
    return SetPrecision(target.strip(), activation, params, line)


def _precisions(value: Any, where: str, nested: bool) -> Any:
    """A precision name, null, or a list (nested lists/dicts for model I/O) of them, canonicalized."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if nested:
            return tuple(_precisions(v, f"{where}[{i}]", nested) for i, v in enumerate(value))
        return tuple(None if v is None else _precision(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, Mapping) and nested:
        return {str(k): _precisions(v, f"{where}.{k}", nested) for k, v in value.items()}
    return _precision(value, where)


def _precision(value: Any, where: str) -> str:
    try:
        return Precision.parse(value).name
    except ValueError as exc:
        raise ProfileError(f"{where}: {exc}") from exc


def _param_spec(value: Any, where: str) -> ParamSpec:
    try:
        return ParamSpec.parse(value)
    except (ValueError, TypeError) as exc:
        raise ProfileError(
            f"{where}: {exc}; give a precision or {{precision, granularity, axis, block_size}}"
        ) from exc


def _spec_data(spec: ParamSpec) -> str | dict[str, Any]:
    """A precision name, or a mapping when the request also sets the param's granularity."""
    g = spec.granularity
    if g is None:
        return spec.precision.name
    data: dict[str, Any] = {"precision": spec.precision.name, "granularity": str(g).split("(")[0]}
    if isinstance(g, PerBlock):
        data.update(block_size=g.block_size, axis=g.axis)
    elif isinstance(g, PerChannel):
        data["axis"] = g.axis
    return data


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


def _where(index: int, line: int | None) -> str:
    return f"entry {index + 1}" + (f" (line {line})" if line is not None else "")


def _kind(value: Any) -> str:
    return "nothing (empty file)" if value is None else type(value).__name__

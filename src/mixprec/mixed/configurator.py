"""MixedPrecisionConfigurator: record precision requests, resolve them, apply them all or nothing."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from mixprec.core.precision import Precision
from mixprec.errors import PrecisionConflictError, RequestError, UnsupportedKernelError
from mixprec.mixed.profile import Profile, profile_from_requests, record_profile
from mixprec.plan import targets as _targets
from mixprec.plan.requests import Request, RequestKind, TargetKind
from mixprec.plan.resolve import Plan, resolve
from mixprec.quantsim import QuantizationSimModel
from mixprec.report.build import build_report
from mixprec.report.model import MixedPrecisionReport


class MixedPrecisionConfigurator:
    """Manual mixed precision for a :class:`QuantizationSimModel` (rules: docs/rules.md).

    Every ``set_*`` call is validated at once and recorded as a request; nothing in the sim
    changes before :meth:`apply`.

    Example:
        >>> mp = MixedPrecisionConfigurator(sim)
        >>> mp.set_precision(sim.model.features[3].conv[1], activation="int16", param={"weight": "int16"})
        >>> mp.set_precision(torch.nn.AvgPool2d, activation="int16")
        >>> report = mp.apply()
    """

    def __init__(self, sim: QuantizationSimModel) -> None:
        if not isinstance(sim, QuantizationSimModel):
            raise TypeError(
                f"MixedPrecisionConfigurator needs a mixprec.QuantizationSimModel, got {type(sim).__name__}"
            )
        self.sim = sim
        self._requests: list[Request] = []
        self._next_id = 0
        self._location: str | None = None  # set while a profile entry records (see _recorded_at)

    @property
    def requests(self) -> tuple[Request, ...]:
        """The requests recorded since the last successful apply, in call order."""
        return tuple(self._requests)

    def set_precision(
        self, target: Any, activation: Any, param: dict[str, Any] | None = None, *, within: Any = None
    ) -> None:
        """Request a precision for the layers ``target`` names.

        Args:
            target: a module of ``sim.model`` (leaf: its layer(s); non-leaf: every quantized layer
                inside), a module class, a function (``torch.matmul``: every call site), a layer name,
                a glob (``"features.*.conv.0.0"``) or a regex (``"re:layer[12]\\..*"``).
            activation: the precision the layers read their inputs and compute at: one precision,
                a list with one entry (or None) per input, or None to change params only.
            param: param name -> precision, e.g. ``{"weight": "int16"}``; ``"fp32"`` removes a quantizer.
                A value may carry its granularity: ``ParamSpec("int4", PerBlock(64))`` or
                ``{"precision": "int4", "block_size": 64}``.
            within: restrict ``target`` to the layers inside this scope (a module, a name, a glob or a
                regex), e.g. ``set_precision(torch.matmul, "int16", within="model.layers.*.self_attn.*")``.

        Raises:
            RequestError: bad target, precision, list length or param name (nothing is recorded).
        """
        location = _caller_location()
        activation_parsed, is_list = _targets.parse_activation(activation)
        params = _targets.parse_params(param)
        layers, kind, description = _targets.match_target(self.sim, target)
        if within is not None:
            scope, _, scope_name = _targets.match_target(self.sim, within)
            layers = tuple(i for i in layers if i in set(scope))
            description = f"{description} within {scope_name}"
            if not layers and kind is not TargetKind.MODULE_CLASS and kind is not TargetKind.FUNCTION:
                raise RequestError(f"target {description!r} matches no quantized layer")
        _targets.check_layer_arguments(self.sim, layers, activation_parsed, is_list, params)
        if not layers:
            # allowed (a function or class the model may call on paths not run yet), but say so
            warnings.warn(
                f"set_precision({description}) matches no quantized layer of sim.model (yet); it applies "
                "to layers first seen later only if set_precision is called again after they ran",
                stacklevel=2,
            )
        self._record(RequestKind.LAYER, description, kind, location, layers=layers,
                     activation=activation_parsed, activation_is_list=is_list, params=params)  # fmt: skip

    def set_model_input_precision(self, activation: Any) -> None:
        """Request a precision for model inputs: one for all, or a (nested) list/dict shaped like them."""
        self._record_io(RequestKind.MODEL_INPUT, activation, self.sim.input_skeleton, self.sim.graph.inputs)

    def set_model_output_precision(self, activation: Any) -> None:
        """Request a precision for model outputs: one for all, or a (nested) list/dict shaped like them."""
        self._record_io(
            RequestKind.MODEL_OUTPUT, activation, self.sim.output_skeleton, self.sim.graph.outputs
        )

    def _record_io(self, kind: RequestKind, activation: Any, skeleton: Any, ios: list) -> None:
        location = _caller_location(3)
        what = "model input" if kind is RequestKind.MODEL_INPUT else "model output"
        if isinstance(activation, (list, tuple, dict)):
            pairs = _targets.match_io(skeleton, activation, what, lambda i: ios[i].is_float)
        else:
            try:
                precision = Precision.parse(activation)
            except ValueError as exc:
                raise RequestError(f"{what} activation={activation!r}: {exc}") from exc
            pairs = [(io.index, precision) for io in ios if io.is_float]
            if not pairs:
                raise RequestError(f"the model has no float {what} to quantize")
        self._record(kind, what, TargetKind.MODEL_IO, location, io=tuple(pairs))

    def _record(
        self, kind: RequestKind, target: str, target_kind: TargetKind, location: str, **fields: Any
    ) -> None:
        location = self._location or location
        self._requests.append(Request(self._next_id, kind, target, target_kind, location=location, **fields))
        self._next_id += 1

    @contextlib.contextmanager
    def _recorded_at(self, location: str) -> Iterator[None]:
        """Record the requests made inside as coming from ``location`` (a profile entry), not the caller."""
        previous, self._location = self._location, location
        try:
            yield
        finally:
            self._location = previous

    def apply_profile(self, profile: Profile | str | Path | Mapping[str, Any]) -> None:
        """Record the requests of a profile (see :func:`mixprec.load_profile`) in order."""
        record_profile(self, profile)

    def to_profile(self, path: str | Path | None = None) -> Profile:
        """The requests recorded so far as a profile; written to ``path`` (.yaml/.json) when given."""
        return profile_from_requests(self, path)

    def preview(self, strict: bool = True) -> MixedPrecisionReport:
        """The plan and report ``apply(strict=strict)`` would produce, changing nothing."""
        return self._plan(strict, applied=False)[1]

    def apply(
        self, log_file: str | Path | IO[str] | None = "./mmp_log.txt", strict: bool = True
    ) -> MixedPrecisionReport:
        """Resolve every recorded request and change the sim, all or nothing.

        Args:
            log_file: where the text report goes: a path, an open text stream, or None. A path
                is written to a temporary file next to it before the sim changes, and renamed into
                place after, so a path that cannot be written fails with nothing applied.
            strict: raise on a lost conflict about a directly named layer and on backend kernel
                findings; otherwise warn and report them.

        Raises:
            PrecisionConflictError / UnsupportedKernelError: under strict; the sim is unchanged.
            RequestError: ``log_file`` is a directory or cannot be written; the sim is unchanged.
        """
        plan, report = self._plan(strict, applied=True)
        finish_log = _stage_log(log_file, report.to_text())
        try:
            for change in plan.changes:
                self.sim.set_precision_at(change.place, change.new, change.claim.granularity)
        except BaseException:
            finish_log(False)  # no log of changes that did not all happen
            raise
        self._requests.clear()
        finish_log(True)
        return report

    def _plan(self, strict: bool, applied: bool) -> tuple[Plan, MixedPrecisionReport]:
        plan, planned = resolve(self.sim, self.sim.config, self._requests)
        report = build_report(self.sim, plan, planned, applied=applied, strict=strict)
        # The messages are the report's own lines, so the error and the log say the same thing.
        lost = report.conflict_lines(direct_only=True)
        if lost:
            message = "requests conflict on a tensor read at one precision:\n" + "\n".join(
                f"  {line}" for line in lost[:10]
            )
            message += "\nmake the requests agree, or call apply(strict=False) to let the later request win"
            if strict:
                raise PrecisionConflictError(message)
            warnings.warn(message, stacklevel=3)
        findings = report.kernel_lines()
        if findings:
            more = len(findings) - 10
            message = (
                f"{len(findings)} layer(s) would run at a precision the backend has no kernel for "
                f"(config {self.sim.config.source}):\n"
                + "\n".join(f"  {line}" for line in findings[:10])
                + (f"\n  ... and {more} more" if more > 0 else "")
            )
            if strict:
                raise UnsupportedKernelError(message + "\nchange the requests or call apply(strict=False)")
            warnings.warn(message, stacklevel=3)
        return plan, report


def _stage_log(log_file: str | Path | IO[str] | None, text: str) -> Callable[[bool], None]:
    """Write ``text`` where ``log_file`` says, in two steps: everything that can fail happens here,
    before the sim changes (all or nothing); the returned function puts the file into place
    (``True``) or discards it (``False``)."""
    if log_file is None:
        return lambda applied: None
    if hasattr(log_file, "write"):
        return lambda applied: log_file.write(text) if applied else None  # type: ignore[union-attr]
    path = Path(log_file)
    problem = f"{path} is a directory" if path.is_dir() else None
    tmp = None
    if problem is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the log private to its writer
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            problem = exc.strerror or str(exc)
    if problem is not None:
        raise RequestError(
            f"log_file {str(log_file)!r} cannot be written ({problem}); nothing was applied. Pass a file "
            "path in a writable folder, an open text stream, or None (report.to_text() has the text)"
        )

    def finish(applied: bool) -> None:
        if not applied:
            Path(tmp).unlink(missing_ok=True)  # type: ignore[arg-type]
            return
        try:
            os.replace(tmp, path)  # type: ignore[arg-type]
        except OSError as exc:  # the sim has changed already: say so, do not undo it
            Path(tmp).unlink(missing_ok=True)  # type: ignore[arg-type]
            logging.getLogger(__name__).warning("the mixed precision log %s was not written: %s", path, exc)

    return finish


def _caller_location(depth: int = 2) -> str:
    frame = sys._getframe(depth)
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"

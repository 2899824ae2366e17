"""The exception types mixprec raises. Each message names what failed, where, and what is accepted."""

from __future__ import annotations


class MixprecError(Exception):
    """Base class of every error mixprec raises on purpose."""


class ConfigError(MixprecError, ValueError):
    """A sim config (JSON quantsim config) has an unknown key or a bad value."""


class CaptureError(MixprecError, RuntimeError):
    """The model could not be captured into a graph of layers."""


class EncodingNotComputedError(MixprecError, RuntimeError):
    """A quantizer ran before ``compute_encodings`` gave it an encoding."""


class CalibrationError(MixprecError, RuntimeError):
    """Calibration saw no data, or non-finite values, at some quantizer."""


class RequestError(MixprecError, ValueError):
    """A ``set_*`` call of the configurator got a bad argument (nothing was recorded)."""


class PrecisionConflictError(MixprecError, RuntimeError):
    """Under ``strict=True``, a request about a layer cannot be honoured because of a later one."""


class UnsupportedKernelError(MixprecError, RuntimeError):
    """Under ``strict=True``, a layer's final precision is not among the backend's kernels."""


class ExportError(MixprecError, RuntimeError):
    """Export could not write complete, consistent artifacts."""


class ExportCoverageError(ExportError):
    """Quantizers of the sim have no place in the exported graph; the message says why for each.

    Attributes:
        not_traced: layers whose quantizers did not run while the exporter traced the model
            (a path the trace did not take: a loop count, a branch on values, detections).
        removed: layers whose quantizers ran during the trace but whose values the exporter left
            out of the graph (used in Python only, folded into a constant, or removed by ONNX passes).
        misaligned: layers whose calls did not line up with the trace's (libraries that take
            other code paths when traced make other calls before them).
    """

    def __init__(
        self,
        message: str,
        not_traced: tuple[str, ...] = (),
        removed: tuple[str, ...] = (),
        misaligned: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.not_traced = not_traced
        self.removed = removed
        self.misaligned = misaligned


class ProfileError(MixprecError, ValueError):
    """A profile file (YAML/JSON list of requests) is malformed or names what the model lacks."""


class UnsupportedArgumentError(MixprecError, TypeError):
    """An argument of the reference's API that has no meaning here; the message names the alternative."""


class QuantizerSettingError(MixprecError, ValueError):
    """A quantizer attribute (``bitwidth``, ``data_type``, ``symmetric``, ...) got a value it cannot take."""


class EncodingFileError(MixprecError, ValueError):
    """An ``.encodings`` file is malformed, or was written for another model (the sim is unchanged)."""

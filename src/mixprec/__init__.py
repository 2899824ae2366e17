"""mixprec: quantization simulation and manual mixed precision for PyTorch models.

No model preparation: functional calls (``x + y``, ``torch.matmul``, ``F.softmax``) are
layers of the captured graph and are quantized as they are.
"""

from ._observers import QuantScheme
from .batches import forward_batches
from .config import KernelSpec, SimConfig, load_config
from .configurator import MixedPrecisionConfigurator
from .errors import (
    CalibrationError,
    CaptureError,
    ConfigError,
    EncodingNotComputedError,
    ExportError,
    MixprecError,
    PrecisionConflictError,
    ProfileError,
    RequestError,
    UnsupportedKernelError,
)
from .granularity import PerBlock, PerChannel, PerTensor
from .param_spec import ParamSpec
from .precision import Precision
from .profile import Profile, load_profile
from .quantizers import FloatQuantizer, IntQuantizer, QuantizerBase
from .report import MixedPrecisionReport
from .sim import QuantizationDataType, QuantizationSimModel

__all__ = [
    # the sim and its settings
    "QuantizationSimModel",
    "QuantizationDataType",
    "QuantScheme",
    "SimConfig",
    "KernelSpec",
    "load_config",
    "forward_batches",
    # precisions and quantizers
    "Precision",
    "PerTensor",
    "PerChannel",
    "PerBlock",
    "ParamSpec",
    "QuantizerBase",
    "IntQuantizer",
    "FloatQuantizer",
    # manual mixed precision
    "MixedPrecisionConfigurator",
    "MixedPrecisionReport",
    "Profile",
    "load_profile",
    # errors
    "MixprecError",
    "ConfigError",
    "CaptureError",
    "EncodingNotComputedError",
    "CalibrationError",
    "RequestError",
    "ProfileError",
    "PrecisionConflictError",
    "UnsupportedKernelError",
    "ExportError",
]

__version__ = "0.1.0"

"""mixprec: quantization simulation and manual mixed precision for PyTorch models.

No model preparation: functional calls (``x + y``, ``torch.matmul``, ``F.softmax``) are
layers of the captured graph and are quantized as they are.
"""

from mixprec.analysis.metrics import Metric
from mixprec.analysis.report import SensitivityReport, SensitivityRow
from mixprec.analysis.sweep import analyze_sensitivity
from mixprec.checkpoint import load_checkpoint, save_checkpoint
from mixprec.config.paths import get_path_for_per_channel_config
from mixprec.config.rules import KernelSpec, SimConfig, load_config
from mixprec.core.granularity import PerBlock, PerChannel, PerTensor
from mixprec.core.param_spec import ParamSpec
from mixprec.core.precision import Precision
from mixprec.errors import (
    CalibrationError,
    CaptureError,
    ConfigError,
    EncodingFileError,
    EncodingNotComputedError,
    ExportCoverageError,
    ExportError,
    MixprecError,
    PrecisionConflictError,
    ProfileError,
    QuantizerSettingError,
    RequestError,
    UnsupportedArgumentError,
    UnsupportedKernelError,
)
from mixprec.mixed.configurator import MixedPrecisionConfigurator
from mixprec.mixed.profile import Profile, load_profile
from mixprec.quant.observers import QuantScheme
from mixprec.quant.quantizers import FloatQuantizer, IntQuantizer, QuantizerBase
from mixprec.quantsim import QuantizationDataType, QuantizationSimModel
from mixprec.report.model import MixedPrecisionReport
from mixprec.sim.batches import forward_batches
from mixprec.sim.placement import Place, PlaceKind
from mixprec.sim.state import PrecisionState, PrecisionView

__all__ = [
    # the sim and its settings
    "QuantizationSimModel",
    "QuantizationDataType",
    "QuantScheme",
    "SimConfig",
    "KernelSpec",
    "load_config",
    "get_path_for_per_channel_config",
    "forward_batches",
    # quantizer places and the sim's state, as its collaborators see it
    "Place",
    "PlaceKind",
    "PrecisionState",
    "PrecisionView",
    "save_checkpoint",
    "load_checkpoint",
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
    # sensitivity analysis
    "analyze_sensitivity",
    "SensitivityReport",
    "SensitivityRow",
    "Metric",
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
    "ExportCoverageError",
    "ExportError",
    "UnsupportedArgumentError",
    "QuantizerSettingError",
    "EncodingFileError",
]

__version__ = "0.1.0"

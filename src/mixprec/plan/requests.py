"""Request records: what each ``set_*`` call asked for, validated and resolved to layers at call time."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mixprec.core.param_spec import ParamSpec
from mixprec.core.precision import Precision, name_of


class RequestKind(enum.Enum):
    """Which API recorded a request."""

    LAYER = "set_precision"
    MODEL_INPUT = "set_model_input_precision"
    MODEL_OUTPUT = "set_model_output_precision"


class TargetKind(enum.Enum):
    """How a ``set_precision`` target named its layers."""

    LEAF_MODULE = "leaf module"
    MODULE = "non-leaf module"
    MODULE_CLASS = "module class"
    FUNCTION = "function"
    LAYER_NAME = "layer name"
    GLOB = "glob"
    REGEX = "regex"
    MODEL_IO = "model input/output"

    @property
    def is_direct(self) -> bool:
        """Requests that name a layer itself; only these raise on a lost conflict under strict."""
        return self in (TargetKind.LEAF_MODULE, TargetKind.LAYER_NAME, TargetKind.MODEL_IO)


@dataclass(frozen=True)
class Request:
    """One recorded ``set_*`` call."""

    id: int
    kind: RequestKind
    target: str  # readable: "features.3.conv.1", "torch.nn.AvgPool2d", "model input"
    target_kind: TargetKind
    layers: tuple[int, ...] = ()
    activation: tuple[Precision | None, ...] | None = None  # per input slot; or one entry when uniform
    activation_is_list: bool = False
    params: tuple[tuple[str, ParamSpec], ...] = ()
    io: tuple[tuple[int, Precision], ...] = ()  # (model input/output index, precision)
    location: str = ""

    @property
    def direct(self) -> bool:
        return self.target_kind.is_direct

    def label(self) -> str:
        return f"request {self.id} ({self.kind.value}({self.target}) at {self.location})"

    def describe_activation(self) -> str | list[str | None] | None:
        if self.activation is None:
            return None
        names = [name_of(p) for p in self.activation]
        return names if self.activation_is_list else names[0]


@dataclass
class LayerRequest:
    """A request as it applies to one layer: the precision of each input, its output and params."""

    request: Request
    layer: int
    inputs: tuple[Precision | None, ...]
    output: Precision | None
    params: dict[str, ParamSpec] = field(default_factory=dict)


def expand(
    request: Request, n_inputs: dict[int, int], float_inputs: dict[int, tuple[bool, ...]]
) -> list[LayerRequest]:
    """One LayerRequest per targeted layer."""
    result = []
    params = dict(request.params)
    for layer in request.layers:
        floats = float_inputs[layer]
        if request.activation is None:
            inputs: tuple[Precision | None, ...] = (None,) * n_inputs[layer]
            output = None
        elif request.activation_is_list:
            inputs = request.activation
            output = request.activation[0] if request.activation else None
        else:
            inputs = tuple(request.activation[0] if f else None for f in floats)
            output = request.activation[0]
        result.append(LayerRequest(request, layer, inputs, output, params))
    return result

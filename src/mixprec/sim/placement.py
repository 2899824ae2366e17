"""Where quantizers exist, and with which settings, from the sim config and the graph."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import nn

from mixprec.capture import op_types as ops
from mixprec.capture.graph import Graph, Layer
from mixprec.capture.value_kinds import integer_valued_tensors
from mixprec.config.rules import SimConfig
from mixprec.core.granularity import Granularity, PerChannel, PerTensor
from mixprec.core.precision import Precision

FOLDABLE_INTO = frozenset({"Conv", "ConvTranspose", "Gemm"})


class PlaceKind(enum.Enum):
    """The kind of place a quantizer sits at."""

    INPUT = "input"
    OUTPUT = "output"
    PARAM = "param"
    MODEL_INPUT = "model_input"


@dataclass(frozen=True)
class Place:
    """One quantizer position of a sim: a layer's input/output slot, a layer's param, or a model input.

    Places are plain, hashable values: list them with ``sim.places()``, read the quantizer at one
    with ``sim.quantizer_at(place)``, change it with ``sim.set_precision_at(place, precision)``.

    Attributes:
        kind: which kind of place (:class:`PlaceKind`).
        layer: index of the layer in ``sim.graph.layers``; None for a model input.
        slot: the input/output slot number, the parameter's name (``"weight"``) for ``PARAM``,
            or the model input's position for ``MODEL_INPUT``.

    Example:
        >>> place = Place(PlaceKind.OUTPUT, sim.graph.layer("conv1").index, 0)
        >>> sim.set_precision_at(place, Precision.parse("int16"))
    """

    kind: PlaceKind
    layer: int | None
    slot: int | str

    def describe(self, graph: Graph) -> str:
        """A readable name of the place in ``graph`` (``conv1 output 0``, ``model input x``)."""
        if self.kind is PlaceKind.MODEL_INPUT:
            return f"model input {graph.inputs[int(self.slot)].path}"
        name = graph.layers[self.layer].name
        if self.kind is PlaceKind.PARAM:
            return f"{name} param {self.slot}"
        return f"{name} {self.kind.value} {self.slot}"


@dataclass(frozen=True)
class QuantizerSettings:
    """Settings a place keeps whatever its precision: symmetry and granularity."""

    symmetric: bool
    granularity: Granularity
    unsigned_symmetric: bool
    strict_symmetric: bool


@dataclass(frozen=True)
class SlotTemplate:
    settings: QuantizerSettings
    initial: Precision | None  # None: the place exists, but the config leaves it unquantized


@dataclass
class Placement:
    """Every place of the graph, with its template. Params are keyed by ParamRef.key (shared)."""

    inputs: list[list[SlotTemplate | None]]
    outputs: list[list[SlotTemplate | None]]
    params: dict[int, SlotTemplate]
    model_inputs: list[SlotTemplate | None]
    folded: set[int]  # BatchNorm layers folded into the Conv/Gemm before them
    fused: set[int]  # layers whose output is not quantized: they compute fused with their consumer


def passes_through(placement: Placement, layer: int, slot: int) -> bool:
    """Whether a layer's output slot is computed fused with its consumer (no quantizer by design).

    True inside supergroups and where the config leaves that op's output unquantized; false
    where a request removed the quantizer (fp32), so a later request can put one back.
    """
    template = placement.outputs[layer][slot]
    return template is None or layer in placement.fused or template.initial is None


def has_places(placement: Placement, layer: Layer) -> bool:
    """Whether a layer has a param, or an input or output slot where a quantizer may sit."""
    i = layer.index
    return bool(layer.params) or any(placement.inputs[i]) or any(placement.outputs[i])


def is_quantizable(placement: Placement, layer: Layer) -> bool:
    """Whether requests and tables see the layer: it computes (not data movement) and has places."""
    return not layer.data_movement and has_places(placement, layer)


def _single_consumer(graph: Graph, layer: Layer, model_outputs: set[int]) -> Layer | None:
    if len(layer.outputs) != 1 or layer.outputs[0] in model_outputs:
        return None
    consumers = graph.tensors[layer.outputs[0]].consumers
    if len(consumers) != 1:
        return None
    return graph.layers[consumers[0][0]]


def fused_layers(graph: Graph, config: SimConfig, model_outputs: set[int]) -> tuple[set[int], set[int]]:
    """Layers whose output is inside a supergroup (or a Conv/Gemm followed by its BatchNorm)."""
    fused: set[int] = set()
    folded: set[int] = set()
    for layer in graph.layers:
        if layer.op_type in FOLDABLE_INTO:
            nxt = _single_consumer(graph, layer, model_outputs)
            if nxt is not None and nxt.op_type == "BatchNormalization":
                fused.add(layer.index)
                folded.add(nxt.index)
    for pattern in config.supergroups:
        for first in graph.layers:
            if first.op_type != pattern[0]:
                continue
            chain = [first]
            for op_type in pattern[1:]:
                nxt = _single_consumer(graph, chain[-1], model_outputs)
                if nxt is not None and nxt.index in folded and chain[-1].op_type in FOLDABLE_INTO:
                    chain.append(nxt)
                    nxt = _single_consumer(graph, nxt, model_outputs)
                if nxt is None or nxt.op_type != op_type:
                    break
                chain.append(nxt)
            else:
                fused.update(layer.index for layer in chain[:-1])
    return fused, folded


def layer_templates(
    layer: Layer,
    config: SimConfig,
    module: nn.Module | None,
    activation: Precision,
    param: Precision,
    *,
    fused: bool = False,
    folded: bool = False,
    forced_outputs: frozenset[int] | set[int] = frozenset(),
    integer: frozenset[int] | set[int] = frozenset(),
    unread: frozenset[int] | set[int] = frozenset(),
) -> tuple[list[SlotTemplate | None], list[SlotTemplate | None], dict[str, SlotTemplate]]:
    """The templates of one layer's input slots, output slots and parameters (by name).

    ``integer``: tensors holding counts, indices or booleans (``capture.value_kinds``), which get
    no quantizer. ``unread``: outputs no layer reads and the model does not return; their places
    start unquantized (nothing computed from them, and no exported graph keeps them: torchvision's
    RAFT divides coordinates once more after its last pyramid level).
    """
    if layer.data_movement:
        return [None] * len(layer.inputs), [None] * len(layer.outputs), {}
    settings = QuantizerSettings(
        symmetric=config.is_activation_symmetric(layer.op_type),
        granularity=PerTensor(),
        unsigned_symmetric=config.unsigned_symmetric,
        strict_symmetric=config.strict_symmetric,
    )
    in_on = config.is_input_quantized(layer.op_type)
    ins = [
        SlotTemplate(settings, activation if in_on else None) if f and tid not in integer else None
        for f, tid in zip(layer.input_is_float, layer.inputs, strict=True)
    ]
    outs: list[SlotTemplate | None] = []
    for tid, is_float in zip(layer.outputs, layer.output_is_float, strict=True):
        if not is_float or tid in integer:
            outs.append(None)
            continue
        on = (
            config.is_output_quantized(layer.op_type) and not fused and tid not in unread
        ) or tid in forced_outputs
        outs.append(SlotTemplate(settings, activation if on else None))
    params = {}
    for name, ref in layer.params.items():
        per_channel = config.is_per_channel(layer.op_type) and ref.ndim >= 2
        axis = ops.weight_channel_axis(module, ref.attr)
        on = config.is_param_quantized(layer.op_type, name) and not folded
        params[name] = SlotTemplate(
            QuantizerSettings(
                symmetric=config.is_param_symmetric(layer.op_type, name),
                granularity=PerChannel(axis) if per_channel else PerTensor(),
                unsigned_symmetric=config.unsigned_symmetric,
                strict_symmetric=config.strict_symmetric,
            ),
            param if on else None,
        )
    return ins, outs, params


def place_quantizers(
    graph: Graph,
    config: SimConfig,
    modules: dict[str, nn.Module],
    activation: Precision,
    param: Precision,
) -> Placement:
    """Decide every place of the graph and its initial precision (None: unquantized)."""
    model_outputs = {graph.source(o.tensor) for o in graph.outputs} | {o.tensor for o in graph.outputs}
    fused, folded = fused_layers(graph, config, model_outputs)
    forced = model_outputs if getattr(config, "model_output_quantized", None) else set()
    inputs: list[list[SlotTemplate | None]] = []
    outputs: list[list[SlotTemplate | None]] = []
    params: dict[int, SlotTemplate] = {}
    integer = integer_valued_tensors(graph)  # counts, indices, booleans: never quantized
    unread = {
        t.id
        for t in graph.tensors.values()
        if t.producer is not None and not t.consumers and t.id not in model_outputs
    }
    for layer in graph.layers:
        module = modules.get(layer.module_name) if layer.is_module else None
        ins, outs, layer_params = layer_templates(
            layer,
            config,
            module,
            activation,
            param,
            fused=layer.index in fused,
            folded=layer.index in folded,
            forced_outputs=forced,
            integer=integer,
            unread=unread,
        )
        inputs.append(ins)
        outputs.append(outs)
        for name, template in layer_params.items():
            params.setdefault(layer.params[name].key, template)
    model_in_on = config.model_input_quantized
    settings = QuantizerSettings(
        symmetric=config.is_activation_symmetric("ModelInput"),
        granularity=PerTensor(),
        unsigned_symmetric=config.unsigned_symmetric,
        strict_symmetric=config.strict_symmetric,
    )
    model_inputs = [
        SlotTemplate(settings, activation if model_in_on else None) if io.is_float else None
        for io in graph.inputs
    ]
    return Placement(inputs, outputs, params, model_inputs, folded, fused)

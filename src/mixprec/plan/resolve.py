"""Resolution of requests into a plan (docs/rules.md, "Resolution"): plain functions, no sim mutation.

preprocess (latest wins per layer) -> propagate (inputs realized at producer quantizers,
one precision per tensor, contention by request id; a requested layer emits its precision) ->
backend check -> precision changes. Only ``MixedPrecisionConfigurator.apply`` changes the sim, from the plan's changes.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from mixprec.capture.graph import Graph
from mixprec.config.rules import SimConfig
from mixprec.core.granularity import Granularity
from mixprec.core.precision import FP32, Precision
from mixprec.plan.checks import KernelFinding, PrecisionChange, check_kernels, find_precision_changes
from mixprec.plan.requests import LayerRequest, Request, RequestKind, expand
from mixprec.sim.placement import Place, PlaceKind, Placement, passes_through
from mixprec.sim.state import PrecisionView


class Reason(enum.Enum):
    """Why a quantizer gets its new precision."""

    REQUESTED = "requested"
    PROPAGATED = "propagated upstream"
    SHARED = "shared tensor"
    MODEL_INPUT = "model input"
    MODEL_OUTPUT = "model output"
    EMITTED = "emitted"  # a requested layer's output (at the end of its fused group), rule 4


@dataclass(frozen=True)
class Claim:
    """A request's demand that one quantizer hold one precision."""

    place: Place
    precision: Precision
    request: int
    reason: Reason
    reader: int | None  # the layer on whose behalf the claim was made
    via: int | None  # the layer the request came through (fused consumer, shared-tensor peer)
    direct: bool  # the losing side of a conflict raises under strict only when direct
    granularity: Granularity | None = None  # a param request may bring its own (e.g. per-block)
    fused: bool = False  # the tensor stays without a quantizer: the request moved on upstream of it


@dataclass(frozen=True)
class Conflict:
    place: Place
    winner: Claim
    loser: Claim


@dataclass(frozen=True)
class Treatment:
    """How a layer ended up computing: requested itself, or drawn in by a request."""

    request: int
    activation: Precision | None
    reason: Reason
    via: int | None


@dataclass(frozen=True)
class Change:
    place: Place
    old: Precision | None
    new: Precision | None
    claim: Claim


@dataclass
class Plan:
    requests: list[Request]
    expanded: list[LayerRequest]
    winners: dict[int, LayerRequest]
    shadowed: list[LayerRequest]
    io_winners: dict[tuple[RequestKind, int], tuple[Request, Precision]]
    claims: dict[Place, Claim] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)
    treated: dict[int, Treatment] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    kernel_findings: list[KernelFinding] = field(default_factory=list)
    precision_changes: list[PrecisionChange] = field(default_factory=list)


class PlannedState:
    """The sim's precisions with the plan's changes laid over them."""

    def __init__(self, base: PrecisionView, changes: dict[Place, Precision | None], canonical) -> None:
        self.graph = base.graph
        self.placement = base.placement
        self._base = base
        self._changes = changes
        self._canonical = canonical

    def granularity_at(self, place: Place) -> Granularity | None:
        return self._base.granularity_at(place)

    def precision_at(self, place: Place) -> Precision | None:
        key = self._canonical(place)
        if key in self._changes:
            return self._changes[key]
        return self._base.precision_at(place)


def preprocess(graph: Graph, requests: list[Request]) -> Plan:
    """Rule 1: for each layer the latest request wins; model I/O requests merge per slot."""
    n_inputs = {layer.index: len(layer.inputs) for layer in graph.layers}
    floats = {layer.index: layer.input_is_float for layer in graph.layers}
    expanded: list[LayerRequest] = []
    winners: dict[int, LayerRequest] = {}
    shadowed: list[LayerRequest] = []
    io_winners: dict[tuple[RequestKind, int], tuple[Request, Precision]] = {}
    for request in requests:
        if request.kind is RequestKind.LAYER:
            for lr in expand(request, n_inputs, floats):
                expanded.append(lr)
                if lr.layer in winners:
                    shadowed.append(winners[lr.layer])
                winners[lr.layer] = lr
        else:
            for index, precision in request.io:
                io_winners[(request.kind, index)] = (request, precision)
    return Plan(requests, expanded, winners, shadowed, io_winners)


class _Propagator:
    def __init__(self, state: PrecisionView, plan: Plan, canonical) -> None:
        self.state = state
        self.graph = state.graph
        self.placement = state.placement
        self.plan = plan
        self.canonical = canonical
        self.queue: deque[tuple[int, Precision, int, int | None]] = deque()
        self.cascaded: set[Place] = set()

    def current(self, place: Place) -> Precision | None:
        return self.state.precision_at(place)

    def claim(self, claim: Claim, *, cascade: bool = True) -> bool:
        """Record ``claim`` unless the place is held; False when it was (a conflict, or agreement)."""
        key = self.canonical(claim.place)
        held = self.plan.claims.get(key)
        if held is not None:
            if held.precision != claim.precision or held.granularity != claim.granularity:
                self.plan.conflicts.append(Conflict(key, held, claim))
                return False
            if held.fused and not claim.fused:
                self.plan.claims[key] = claim  # agreeing, and asks for a quantizer there (a model output)
            if cascade and key not in self.cascaded:
                # An emitted output holds the place without drawing its readers in; a reader realizing
                # its input there agrees and does draw them in, whichever of the two came first.
                self.cascaded.add(key)
                if (self.current(key) or FP32) != claim.precision:
                    self.cascade(key, claim)
            return False
        self.plan.claims[key] = claim
        if cascade:
            self.cascaded.add(key)
            if (self.current(key) or FP32) != claim.precision:
                self.cascade(key, claim)
        return True

    def cascade(self, place: Place, claim: Claim) -> None:
        """Rule 3: every other reader of the tensor now reads it at the claimed precision."""
        if place.kind is PlaceKind.OUTPUT:
            tensor = self.graph.layers[place.layer].outputs[int(place.slot)]
        elif place.kind is PlaceKind.MODEL_INPUT:
            tensor = self.graph.inputs[int(place.slot)].tensor
        else:
            return
        for reader, slot in self.graph.readers(tensor):
            if reader.index == claim.reader or self.own_input(reader.index, slot) is not None:
                continue
            if reader.index not in self.plan.treated:
                self.queue.append((reader.index, claim.precision, claim.request, claim.reader))

    def own_input(self, layer: int, slot: int) -> Place | None:
        if self.placement.inputs[layer][slot] is None:
            return None
        place = Place(PlaceKind.INPUT, layer, slot)
        return place if self.current(place) is not None else None

    def realize(self, layer: int, slot: int, precision: Precision, request: Request | int, *,
                reason: Reason, via: int | None, direct: bool, reader: int) -> None:  # fmt: skip
        """Rule 2: set the producer quantizer of (layer, slot) to ``precision``."""
        rid = request if isinstance(request, int) else request.id
        own = self.own_input(layer, slot)
        if own is not None:
            self.claim(Claim(own, precision, rid, reason, reader, via, direct))
            if not precision.is_full:
                return
            # fp32 removes the layer's own input quantizer; the layer then reads the quantizer
            # upstream, so that one must go too for the input to be read at fp32.
        tid = self.graph.layers[layer].inputs[slot]
        if tid is None:
            return
        node = self.graph.tensors[self.graph.source(tid)]
        if node.model_input is not None:
            if self.placement.model_inputs[node.model_input] is not None:
                place = Place(PlaceKind.MODEL_INPUT, None, node.model_input)
                self.claim(Claim(place, precision, rid, reason, reader, via, direct))
            return
        if node.producer is None:
            return
        producer, out_slot = node.producer
        place = Place(PlaceKind.OUTPUT, producer, out_slot)
        if self.current(place) is not None or not passes_through(self.placement, producer, out_slot):
            self.claim(Claim(place, precision, rid, reason, reader, via, direct))
            return
        player = self.graph.layers[producer]
        if not any(f and t is not None for f, t in zip(player.input_is_float, player.inputs, strict=True)):
            # Nothing upstream carries the value's precision (an embedding reads integer ids):
            # the request outranks the config and quantizes the producer's output itself.
            if self.placement.outputs[producer][out_slot] is not None:
                self.claim(Claim(place, precision, rid, reason, reader, via, direct))
            return
        # The producer has no output quantizer: it computes fused with this layer, so the
        # request moves on to the producer's own inputs. The tensor is claimed all the same
        # (it stays without a quantizer), so that a request for another precision of it, such
        # as a model output request, is a conflict instead of silently changing what this reads.
        fused = Claim(place, precision, rid, reason, reader, via, direct, fused=True)
        if not self.claim(fused):
            held = self.plan.claims[self.canonical(place)]
            if held.reason is not Reason.EMITTED or held.precision != precision:
                return
            # the producer's own emission holds the tensor: this reader's request still goes upstream
        if producer not in self.plan.treated:
            self.plan.treated[producer] = Treatment(rid, precision, Reason.PROPAGATED, layer)
        for k, is_float in enumerate(player.input_is_float):
            if is_float:
                self.realize(
                    producer,
                    k,
                    precision,
                    rid,
                    reason=Reason.PROPAGATED,
                    via=layer,
                    direct=direct,
                    reader=producer,
                )

    def run(self) -> None:
        plan = self.plan
        items: list[tuple[int, object]] = [(lr.request.id, lr) for lr in plan.winners.values()]
        items += [(req.id, (kind, index, req, p)) for (kind, index), (req, p) in plan.io_winners.items()]
        items.sort(key=lambda item: -item[0])
        for _rid, item in items:
            if isinstance(item, LayerRequest):
                self.run_layer_request(item)
            else:
                self.run_io_request(*item)
            self.drain()

    def run_layer_request(self, lr: LayerRequest) -> None:
        request = lr.request
        first = next((p for p in lr.inputs if p is not None), None)
        if lr.layer not in self.plan.treated and (first is not None or lr.params):
            self.plan.treated[lr.layer] = Treatment(request.id, first, Reason.REQUESTED, None)
        for slot, precision in enumerate(lr.inputs):
            if precision is not None and self.graph.layers[lr.layer].input_is_float[slot]:
                self.realize(lr.layer, slot, precision, request, reason=Reason.REQUESTED, via=None,
                             direct=request.direct, reader=lr.layer)  # fmt: skip
        if lr.output is not None:
            self.emit(lr)
        for name, spec in lr.params.items():
            if name in self.graph.layers[lr.layer].params:
                place = Place(PlaceKind.PARAM, lr.layer, name)
                self.claim(Claim(place, spec.precision, request.id, Reason.REQUESTED, lr.layer, None, request.direct,
                                 spec.granularity))  # fmt: skip

    def run_io_request(self, kind: RequestKind, index: int, request: Request, precision: Precision) -> None:
        if kind is RequestKind.MODEL_INPUT:
            place = Place(PlaceKind.MODEL_INPUT, None, index)
            self.claim(Claim(place, precision, request.id, Reason.MODEL_INPUT, None, None, True))
            return
        tid = self.graph.source(self.graph.outputs[index].tensor)
        node = self.graph.tensors[tid]
        if node.model_input is not None:
            place = Place(PlaceKind.MODEL_INPUT, None, node.model_input)
        else:
            place = Place(PlaceKind.OUTPUT, node.producer[0], node.producer[1])
        self.claim(Claim(place, precision, request.id, Reason.MODEL_OUTPUT, None, None, True))

    def drain(self) -> None:
        while self.queue:
            layer, precision, rid, via = self.queue.popleft()
            if layer in self.plan.treated:
                continue
            self.plan.treated[layer] = Treatment(rid, precision, Reason.SHARED, via)
            for slot, is_float in enumerate(self.graph.layers[layer].input_is_float):
                if is_float:
                    self.realize(
                        layer, slot, precision, rid, reason=Reason.SHARED, via=via, direct=False, reader=layer
                    )

    def emit(self, lr: LayerRequest) -> None:
        """Rule 4: the requested layer emits its precision, at the end of its fused group.

        The claim does not draw the tensor's readers in: they read the new precision, and where
        that differs from what they emit, the report lists a precision change.
        """
        layer = self.graph.layers[lr.layer]
        for slot, is_float in enumerate(layer.output_is_float):
            if not is_float:
                continue
            end, end_slot = group_end(self.graph, self.placement, lr.layer, slot)
            place = Place(PlaceKind.OUTPUT, end, end_slot)
            if self.placement.outputs[end][end_slot] is None:
                continue
            # Where the config leaves the output unquantized the value carries what the layer computes
            # at (its inputs' requests set that); the claim holds the tensor without a quantizer, so
            # that another precision for it (a model output request) is a conflict, not a silent change.
            # (An embedding reads integer ids: nothing upstream carries a precision, so the request
            # outranks the config and quantizes the output itself, as rule 2 does for its readers.)
            producer = self.graph.layers[end]
            reads_floats = any(
                f and t is not None for f, t in zip(producer.input_is_float, producer.inputs, strict=True)
            )
            fused = (
                reads_floats and self.current(place) is None and passes_through(self.placement, end, end_slot)
            )
            via = None if end == lr.layer else lr.layer
            self.claim(Claim(place, lr.output, lr.request.id, Reason.EMITTED, lr.layer, via, lr.request.direct,
                             fused=fused), cascade=False)  # fmt: skip


def group_end(graph: Graph, placement: Placement, layer: int, slot: int) -> tuple[int, int]:
    """The output slot where a layer's value is quantized: its own, or the end of its fused group.

    Conv in Conv+BatchNorm+ReLU has no output quantizer; its value is quantized after the ReLU.
    """
    seen = set()
    while layer in placement.fused and layer not in seen:
        seen.add(layer)
        consumers = graph.tensors[graph.layers[layer].outputs[slot]].consumers
        if len(consumers) != 1:
            break
        nxt = graph.layers[consumers[0][0]]
        if not nxt.outputs:
            break
        layer, slot = nxt.index, 0
    return layer, slot


def make_canonical(graph: Graph):
    """Claims on a shared parameter's quantizer are keyed by its first place."""
    first: dict[int, Place] = {}
    for layer in graph.layers:
        for name, ref in layer.params.items():
            first.setdefault(ref.key, Place(PlaceKind.PARAM, layer.index, name))

    def canonical(place: Place) -> Place:
        if place.kind is PlaceKind.PARAM:
            return first[graph.layers[place.layer].params[str(place.slot)].key]
        return place

    return canonical


def resolve(state: PrecisionView, config: SimConfig, requests: list[Request]) -> tuple[Plan, PlannedState]:
    """Compute the whole plan for ``requests`` against the sim's current precisions."""
    graph = state.graph
    canonical = make_canonical(graph)
    plan = preprocess(graph, requests)
    _Propagator(state, plan, canonical).run()
    overlay: dict[Place, Precision | None] = {}
    for place, claim in plan.claims.items():
        if claim.fused:
            continue
        old = state.precision_at(place)
        new = None if claim.precision.is_full else claim.precision
        regranulated = (
            new is not None
            and claim.granularity is not None
            and claim.granularity != state.granularity_at(place)
        )
        if old != new or regranulated:
            plan.changes.append(Change(place, old, new, claim))
            overlay[place] = new
    planned = PlannedState(state, overlay, canonical)
    plan.kernel_findings = check_kernels(planned, config)
    plan.precision_changes = find_precision_changes(planned)
    return plan, planned

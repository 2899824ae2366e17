"""Read-only access to a sim's quantizers by :class:`Place`, and its precision table.

``QuantizationSimModel`` inherits ``PlaceAccess`` (as it inherits ``ReferenceSimAPI``); the
attributes annotated below are set by its constructor (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mixprec.capture.graph import Graph
from mixprec.core.granularity import Granularity
from mixprec.core.precision import Precision, name_of
from mixprec.quant.quantizers import QuantizerBase
from mixprec.sim.effective import effective_input_precisions
from mixprec.sim.placement import Place, PlaceKind, Placement, SlotTemplate, is_quantizable
from mixprec.sim.runtime import LayerQuantizers, SimRuntime, param_key


class PlaceAccess:
    """Quantizers, precisions and templates at the places of ``graph``."""

    graph: Graph
    placement: Placement
    model: nn.Module
    _runtime: SimRuntime
    _layer_quantizers: list[LayerQuantizers]

    def places(self) -> Iterator[Place]:
        """Every place of the graph where a quantizer exists or may be created."""
        for i in range(len(self.graph.inputs)):
            if self.placement.model_inputs[i] is not None:
                yield Place(PlaceKind.MODEL_INPUT, None, i)
        for layer in self.graph.layers:
            for slot, t in enumerate(self.placement.inputs[layer.index]):
                if t is not None:
                    yield Place(PlaceKind.INPUT, layer.index, slot)
            for slot, t in enumerate(self.placement.outputs[layer.index]):
                if t is not None:
                    yield Place(PlaceKind.OUTPUT, layer.index, slot)
            for name in layer.params:
                yield Place(PlaceKind.PARAM, layer.index, name)

    def quantizer_at(self, place: Place) -> QuantizerBase | None:
        """The quantizer at ``place`` (None where there is none)."""
        # Reads the containers' dicts directly: resolution asks this tens of thousands of
        # times on large models, and ModuleList indexing costs several times more.
        if place.kind is PlaceKind.MODEL_INPUT:
            return self._runtime.input_quantizers._modules[str(place.slot)]
        lq = self._layer_quantizers[place.layer]
        if place.kind is PlaceKind.INPUT:
            return lq.input_quantizers._modules[str(place.slot)]
        if place.kind is PlaceKind.OUTPUT:
            return lq.output_quantizers._modules[str(place.slot)]
        return lq.param_quantizers._modules[param_key(str(place.slot))]

    def precision_at(self, place: Place) -> Precision | None:
        q = self.quantizer_at(place)
        return None if q is None else q.precision

    def template_at(self, place: Place) -> SlotTemplate:
        if place.kind is PlaceKind.MODEL_INPUT:
            return self.placement.model_inputs[int(place.slot)]
        if place.kind is PlaceKind.INPUT:
            return self.placement.inputs[place.layer][int(place.slot)]
        if place.kind is PlaceKind.OUTPUT:
            return self.placement.outputs[place.layer][int(place.slot)]
        return self.placement.params[self.graph.layers[place.layer].params[str(place.slot)].key]

    def granularity_at(self, place: Place) -> Granularity | None:
        q = self.quantizer_at(place)
        return None if q is None else q.granularity

    def describe(self, place: Place) -> str:
        if place.kind is PlaceKind.PARAM:
            return self.graph.layers[place.layer].params[str(place.slot)].qualified_name
        return place.describe(self.graph)

    def quantizers(self) -> Iterator[tuple[Place, QuantizerBase]]:
        """Each quantizer once (a shared parameter's quantizer at its first place)."""
        seen: set[int] = set()
        for place in self.places():
            q = self.quantizer_at(place)
            if q is not None and id(q) not in seen:
                seen.add(id(q))
                yield place, q

    def param_tensor(self, place: Place) -> torch.Tensor:
        ref = self.graph.layers[place.layer].params[str(place.slot)]
        return self.model.get_submodule(ref.owner)._parameters[ref.attr]

    def precision_table(self) -> list[dict[str, Any]]:
        """One row per quantized layer, in graph order (see docs/rules.md for the columns)."""
        rows = []
        for layer in self.graph.layers:
            if not is_quantizable(self.placement, layer):
                continue
            ins = self.placement.inputs[layer.index]
            outs = self.placement.outputs[layer.index]
            rows.append(
                {
                    "name": layer.name,
                    "type": layer.type_name,
                    "params": {
                        n: name_of(self.precision_at(Place(PlaceKind.PARAM, layer.index, n)))
                        for n in layer.params
                    },
                    "inputs": [
                        name_of(self.precision_at(Place(PlaceKind.INPUT, layer.index, s))) if t else None
                        for s, t in enumerate(ins)
                    ],
                    "outputs": [
                        name_of(self.precision_at(Place(PlaceKind.OUTPUT, layer.index, s))) if t else None
                        for s, t in enumerate(outs)
                    ],
                    "effective_inputs": [name_of(p) for p in effective_input_precisions(self, layer)],
                }
            )
        return rows

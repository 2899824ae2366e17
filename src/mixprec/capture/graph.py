"""The captured graph: layers, the tensors between them, and the model's inputs and outputs.

Plain data, produced by :mod:`mixprec.capture.recorder` and read by the sim, the configurator
and the report. Indices are positions in ``Graph.layers``; tensor ids are keys of
``Graph.tensors``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


class LayerKind(enum.Enum):
    """Whether a layer is a leaf module call or a functional/method call."""

    MODULE = "module"
    FUNCTION = "function"


@dataclass
class TensorNode:
    """One tensor value seen during capture."""

    id: int
    is_float: bool
    shape: tuple[int, ...]
    producer: tuple[int, int] | None = None  # (layer index, output slot)
    model_input: int | None = None  # index into Graph.inputs
    consumers: list[tuple[int, int]] = field(default_factory=list)  # (layer index, input slot)


@dataclass(frozen=True)
class ParamRef:
    """A parameter read by a layer: where it lives in the model, and its identity."""

    key: int  # shared by every layer that reads the same Parameter (tied weights)
    qualified_name: str  # e.g. "lm_head.weight" (first name the model gives it)
    owner: str  # qualified name of the module holding it
    attr: str  # attribute name on the owner
    ndim: int


@dataclass
class Layer:
    """A node of the graph that computes: a leaf module call or a functional call."""

    index: int
    name: str
    kind: LayerKind
    op: type | Callable
    type_name: str  # original class name, or canonical function name ("add", "matmul")
    op_type: str  # ONNX-style op type used by the sim config ("Conv", "Add", ...)
    module_name: str  # the module called (MODULE), or the module whose forward made the call
    call_index: int  # 0 for the first call site of that module / code location
    inputs: tuple[int | None, ...]  # tensor id per input slot; None for a constant
    outputs: tuple[int, ...]
    params: dict[str, ParamRef]
    data_movement: bool
    input_is_float: tuple[bool, ...] = ()
    output_is_float: tuple[bool, ...] = ()

    @property
    def is_module(self) -> bool:
        return self.kind is LayerKind.MODULE


@dataclass(frozen=True)
class ModelIO:
    """A tensor leaf of the model's inputs or outputs, with a readable path (``input[1]``, ``logits``)."""

    index: int
    path: str
    tensor: int
    is_float: bool


@dataclass
class Graph:
    """The captured graph of one model."""

    layers: list[Layer]
    tensors: dict[int, TensorNode]
    inputs: list[ModelIO]
    outputs: list[ModelIO]
    input_structure: object  # pytree spec of (args, kwargs), for shape checks of model I/O requests
    output_structure: object
    module_types: dict[str, type] = field(default_factory=dict)  # qualified name -> original class

    def __post_init__(self) -> None:
        self._by_name = {layer.name: layer for layer in self.layers}

    def new_tensor(self, is_float: bool, shape: tuple[int, ...], producer: tuple[int, int] | None) -> int:
        """Add a tensor node (for a layer first seen after capture); its id."""
        tid = max(self.tensors, default=-1) + 1
        self.tensors[tid] = TensorNode(id=tid, is_float=is_float, shape=shape, producer=producer)
        return tid

    def append(self, layer: Layer) -> None:
        """Add a layer first seen after capture (a path ``dummy_input`` did not take)."""
        self.layers.append(layer)
        self._by_name[layer.name] = layer

    def layer(self, name: str) -> Layer | None:
        return self._by_name.get(name)

    def readers(self, tensor_id: int) -> Iterator[tuple[Layer, int]]:
        """Compute layers reading ``tensor_id``, looking through data-movement layers."""
        stack = [tensor_id]
        seen: set[int] = set()
        while stack:
            tid = stack.pop()
            if tid in seen:
                continue
            seen.add(tid)
            for layer_index, slot in self.tensors[tid].consumers:
                layer = self.layers[layer_index]
                if layer.data_movement:
                    if slot == 0:
                        stack.extend(layer.outputs)
                else:
                    yield layer, slot

    def source(self, tensor_id: int) -> int:
        """Walk upstream through data-movement layers to the tensor that carries the value."""
        tid = tensor_id
        while True:
            node = self.tensors[tid]
            if node.producer is None:
                return tid
            layer = self.layers[node.producer[0]]
            if not layer.data_movement or not layer.inputs or layer.inputs[0] is None:
                return tid
            tid = layer.inputs[0]

"""Graph capture by recording one eager forward pass.

Design (see docs/capture.md): the model runs once, eagerly, on the dummy input.
Forward hooks on leaf modules record each leaf call; a ``TorchFunctionMode`` records
every torch function / Tensor method called outside leaf modules. Tensors are followed
by identity, so the graph knows which call produced what each call reads. Calls that
read no tensor derived from the model's inputs (mask and position-id construction,
constants) are not layers. Nothing about the model is rewritten: the quantized forward
later runs the model's own Python code again and finds each functional call by the
module making it, the function and its ordinal (see :mod:`mixprec.capture.callsite`).

The capture is the starting point, not a limit: a path first taken later gets its layers
then (see :mod:`mixprec.sim.runtime`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from mixprec.capture import op_types as ops
from mixprec.capture import sdpa
from mixprec.capture.callsite import (
    KV_CACHE_WRITES,
    SiteKey,
    canonical_name,
    is_counted,
    is_kv_cache_call,
    kv_cache_name,
    site_name,
)
from mixprec.capture.graph import Graph, Layer, LayerKind, ModelIO, ParamRef, TensorNode
from mixprec.errors import CaptureError


@dataclass
class CaptureResult:
    """The graph, plus what the quantized forward needs to find call sites again."""

    graph: Graph
    output: Any
    # Per functional call site (scope, function, ordinal) of a counted function: the index of its
    # layer, or None where that call was not a layer (it read no tensor derived from the inputs).
    sites: dict[SiteKey, int | None] = field(default_factory=dict)
    leaf_modules: dict[str, nn.Module] = field(default_factory=dict)
    input_skeleton: Any = None
    output_skeleton: Any = None


def skeleton(value: Any, index_of: Callable[[torch.Tensor], int | None]) -> Any:
    """The structure of model inputs/outputs: tensors -> their ModelIO index, containers -> list/dict."""
    if isinstance(value, torch.Tensor):
        return index_of(value)
    if isinstance(value, (list, tuple)):
        return [skeleton(v, index_of) for v in value]
    if isinstance(value, Mapping):
        return {str(k): skeleton(v, index_of) for k, v in value.items()}
    return None


def is_leaf(module: nn.Module) -> bool:
    return isinstance(module, ops.ATOMIC_MODULES) or next(module.children(), None) is None


def module_param_refs(
    module: nn.Module, name: str, key_and_name: Callable[[torch.Tensor], tuple[int, str]]
) -> dict[str, ParamRef]:
    """The parameters leaf module ``name`` reads, by name relative to it; ``key_and_name`` gives a
    parameter's ParamRef key and qualified name."""
    params = {}
    for rel, param in module.named_parameters(remove_duplicate=False):
        owner, _, attr = (f"{name}.{rel}" if name else rel).rpartition(".")
        key, qualified = key_and_name(param)
        params[rel] = ParamRef(key, qualified, owner, attr, param.ndim)
    return params


def module_layer_fields(
    module: nn.Module, name: str, call_index: int, params: dict[str, ParamRef]
) -> dict[str, Any]:
    """The Layer fields of call ``call_index`` of leaf module ``name`` other than its inputs and
    outputs: one definition for capture and for the sites the sim's runtime adds later."""
    return {
        "name": name if call_index == 0 else f"{name}#{call_index}",
        "kind": LayerKind.MODULE,
        "op": type(module),
        "type_name": type(module).__name__,
        "op_type": ops.module_op_type(module),
        "module_name": name,
        "call_index": call_index,
        "params": params,
        "data_movement": ops.is_data_movement_module(module),
    }


def split_dummy_input(dummy_input: Any) -> tuple[tuple, dict]:
    """A tensor -> one positional input; a tuple/list -> positional inputs; a mapping -> keyword inputs."""
    if isinstance(dummy_input, torch.Tensor):
        return (dummy_input,), {}
    if isinstance(dummy_input, (tuple, list)):
        return tuple(dummy_input), {}
    if isinstance(dummy_input, Mapping):  # a dict, or a tokenizer's BatchEncoding
        return (), dict(dummy_input)
    raise TypeError(
        f"dummy_input must be a tensor, a tuple/list of positional inputs, or a dict (mapping) of keyword "
        f"inputs; got {type(dummy_input).__name__}"
    )


def io_path(prefix: str, keypath: tuple) -> str:
    """Readable path of a pytree leaf: ``input[0]``, ``attention_mask``, ``output.logits``."""
    text = prefix
    for key in keypath:
        if isinstance(key, pytree.SequenceKey):
            text += f"[{key.idx}]"
        else:
            name = key.key if isinstance(key, pytree.MappingKey) else getattr(key, "name", str(key))
            text = f"{text}.{name}" if text else str(name)
    return text


class _Recorder:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.module_names: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.module_names.setdefault(id(module), name)
        self.all_module_names = set(self.module_names.values())
        self.param_keys: dict[int, int] = {}
        self.param_home: dict[int, tuple[str, str, str]] = {}
        for owner_name, owner in model.named_modules(remove_duplicate=False):
            for attr, param in owner.named_parameters(recurse=False):
                key = self.param_keys.setdefault(id(param), len(self.param_keys))
                qualified = f"{owner_name}.{attr}" if owner_name else attr
                self.param_home.setdefault(key, (qualified, owner_name, attr))
        self.tensor_of: dict[int, int] = {}  # id(tensor object) -> node id
        self.keep_alive: list[torch.Tensor] = []
        self.nodes: dict[int, TensorNode] = {}
        self.layers: list[Layer] = []
        self.scope: list[str] = [""]
        self.leaf_depth = 0
        self.pending: list[tuple[tuple[int | None, ...], tuple[bool, ...]]] = []
        self.sites: dict[SiteKey, int | None] = {}
        self.module_call_counts: dict[str, int] = {}
        self.ordinals: dict[tuple[str, str], int] = {}
        self.kv_counts: dict[str, int] = {}
        self.leaf_modules: dict[str, nn.Module] = {}

    # tensors -------------------------------------------------------------------------
    def new_node(self, tensor: torch.Tensor, **where: Any) -> int:
        node_id = len(self.nodes)
        self.nodes[node_id] = TensorNode(
            id=node_id, is_float=tensor.is_floating_point(), shape=tuple(tensor.shape), **where
        )
        self.tensor_of[id(tensor)] = node_id
        self.keep_alive.append(tensor)
        return node_id

    def input_slots(self, leaves: list) -> tuple[list[int | None], list[bool], list[torch.Tensor]]:
        slots: list[int | None] = []
        floats: list[bool] = []
        params: list[torch.Tensor] = []
        for leaf in leaves:
            if isinstance(leaf, nn.Parameter):
                params.append(leaf)
            elif isinstance(leaf, torch.Tensor):
                slots.append(self.tensor_of.get(id(leaf)))
                floats.append(leaf.is_floating_point())
        return slots, floats, params

    def param_ref(self, param: torch.Tensor) -> tuple[int, str]:
        key = self.param_keys[id(param)]
        return key, self.param_home[key][0]

    def add_layer(self, **fields: Any) -> Layer:
        layer = Layer(index=len(self.layers), **fields)
        for slot, tid in enumerate(layer.inputs):
            if tid is not None:
                self.nodes[tid].consumers.append((layer.index, slot))
        self.layers.append(layer)
        return layer

    def bind_outputs(
        self, layer_index: int, tensors: list[torch.Tensor]
    ) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        ids = tuple(self.new_node(t, producer=(layer_index, k)) for k, t in enumerate(tensors))
        return ids, tuple(t.is_floating_point() for t in tensors)

    # leaf modules ----------------------------------------------------------------------
    def leaf_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.leaf_depth == 0:
            slots, floats, _ = self.input_slots(pytree.tree_leaves((args, kwargs)))
            self.pending.append((tuple(slots), tuple(floats)))
        self.leaf_depth += 1

    def leaf_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.leaf_depth -= 1
        if self.leaf_depth:
            return
        slots, floats = self.pending.pop()
        name = self.module_names[id(module)]
        count = self.module_call_counts.get(name, 0)
        self.module_call_counts[name] = count + 1
        params = module_param_refs(module, name, self.param_ref)
        self.leaf_modules[name] = module
        layer = self.add_layer(
            **module_layer_fields(module, name, count, params),
            inputs=slots,
            outputs=(),
            input_is_float=floats,
        )
        tensors = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
        layer.outputs, layer.output_is_float = self.bind_outputs(layer.index, tensors)

    def scope_pre_hook(self, module: nn.Module, args: tuple) -> None:
        self.scope.append(self.module_names[id(module)])

    def scope_post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.scope.pop()

    # functional calls ------------------------------------------------------------------
    def functional_call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        canonical = canonical_name(func)
        scope = self.scope[-1]
        ordinal = self.ordinals.get((scope, canonical), 0)
        self.ordinals[(scope, canonical)] = ordinal + 1
        key = (scope, canonical, ordinal)
        leaves = pytree.tree_leaves((args, kwargs))
        slots, floats, param_leaves = self.input_slots(leaves)
        output = func(*args, **kwargs)
        index = self.record_layer(func, canonical, key, args, slots, floats, param_leaves, output)
        if is_counted(canonical):
            self.sites[key] = index
        return output

    def record_layer(
        self,
        func: Callable,
        canonical: str,
        key: SiteKey,
        args: tuple,
        slots: list[int | None],
        floats: list[bool],
        param_leaves: list[torch.Tensor],
        output: Any,
    ) -> int | None:
        """Add the call as a layer if it reads a tensor derived from the inputs; its index or None."""
        data_movement = canonical in ops.DATA_MOVEMENT_FUNCTIONS
        if not any(s is not None for s in slots) or not (data_movement or is_counted(canonical)):
            return None
        if ops.is_in_place(func):
            tensors = [args[0]] if args and isinstance(args[0], torch.Tensor) else []
        else:
            tensors = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
        if not tensors:
            return None
        scope = key[0]
        params = {}
        for param in param_leaves:
            pkey = self.param_keys.get(id(param))
            if pkey is None:
                continue
            qualified, owner, attr = self.param_home[pkey]
            rel = qualified[len(scope) + 1 :] if scope and qualified.startswith(scope + ".") else qualified
            params[rel] = ParamRef(pkey, qualified, owner, attr, param.ndim)
        name = site_name(scope, canonical, key[2], self.all_module_names)
        if canonical in KV_CACHE_WRITES and is_kv_cache_call():
            count = self.kv_counts.get(scope, 0)
            self.kv_counts[scope] = count + 1
            name = kv_cache_name(scope, count)
        layer = self.add_layer(
            name=name,
            kind=LayerKind.FUNCTION,
            op=func,
            type_name=canonical,
            op_type=ops.function_op_type(canonical),
            module_name=scope,
            call_index=key[2],
            inputs=tuple(slots),
            outputs=(),
            params=params,
            data_movement=data_movement,
            input_is_float=tuple(floats),
        )
        layer.outputs, layer.output_is_float = self.bind_outputs(layer.index, tensors)
        return layer.index


class _CaptureMode(TorchFunctionMode):
    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.recorder.leaf_depth:
            return func(*args, **kwargs)
        if canonical_name(func) == sdpa.NAME:
            return sdpa.decomposed_sdpa(self.recorder.functional_call, *args, **kwargs)
        return self.recorder.functional_call(func, args, kwargs)


def capture(model: nn.Module, args: tuple, kwargs: dict) -> CaptureResult:
    """Run ``model(*args, **kwargs)`` once and record its graph of layers.

    Raises:
        CaptureError: the forward pass failed; the message names the call that failed.
    """
    rec = _Recorder(model)
    flat_inputs = pytree.tree_flatten_with_path((args, kwargs))[0]
    inputs = []
    input_ids: dict[int, int] = {}
    for keypath, leaf in flat_inputs:
        if isinstance(leaf, torch.Tensor):
            first, rest = keypath[0].idx, keypath[1:]
            path = io_path("input" if first == 0 else "", rest)
            node = rec.new_node(leaf, model_input=len(inputs))
            input_ids[id(leaf)] = len(inputs)
            inputs.append(ModelIO(len(inputs), path, node, leaf.is_floating_point()))
    handles = []
    for module in model.modules():
        # The root is never a leaf: a model without submodules is all functional calls.
        if is_leaf(module) and module is not model:
            handles.append(module.register_forward_pre_hook(rec.leaf_pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(rec.leaf_post_hook, with_kwargs=True))
        else:
            handles.append(module.register_forward_pre_hook(rec.scope_pre_hook))
            handles.append(module.register_forward_hook(rec.scope_post_hook))
    try:
        with torch.no_grad(), _CaptureMode(rec):
            output = model(*args, **kwargs)
    except CaptureError:
        raise
    except Exception as exc:
        where = rec.layers[-1].name if rec.layers else "(before the first layer)"
        raise CaptureError(
            f"capturing {type(model).__name__} failed in its forward pass after layer {where!r}: "
            f"{type(exc).__name__}: {exc}. The model must run eagerly on dummy_input "
            "(check dummy_input's shapes and dtypes, and that model(*dummy_input) works)."
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    outputs = []
    out_flat, _ = pytree.tree_flatten_with_path(output)
    for keypath, leaf in out_flat:
        if isinstance(leaf, torch.Tensor) and id(leaf) in rec.tensor_of:
            outputs.append(
                ModelIO(
                    len(outputs),
                    io_path("output", keypath),
                    rec.tensor_of[id(leaf)],
                    leaf.is_floating_point(),
                )
            )
    if not any(not layer.data_movement for layer in rec.layers):
        raise CaptureError(
            f"{type(model).__name__} has no layer reading its inputs: nothing to quantize "
            "(is dummy_input passed the way forward() expects it?)"
        )
    graph = Graph(
        layers=rec.layers,
        tensors=rec.nodes,
        inputs=inputs,
        outputs=outputs,
        input_structure=pytree.tree_flatten((args, kwargs))[1],
        output_structure=pytree.tree_structure(output),
        module_types={name: type(m) for name, m in model.named_modules()},
    )
    output_index = {io.tensor: io.index for io in outputs}

    def in_index(t: torch.Tensor) -> int | None:
        return input_ids.get(id(t))

    args_skeleton = [skeleton(a, in_index) for a in args]
    kwargs_skeleton = {k: skeleton(v, in_index) for k, v in kwargs.items()}
    if kwargs and args:
        input_skeleton: Any = {**{str(i): a for i, a in enumerate(args_skeleton)}, **kwargs_skeleton}
    else:
        input_skeleton = kwargs_skeleton if kwargs else args_skeleton
    output_skeleton = skeleton(output, lambda t: output_index.get(rec.tensor_of.get(id(t), -1)))
    return CaptureResult(graph, output, rec.sites, rec.leaf_modules, input_skeleton, output_skeleton)

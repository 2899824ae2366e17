"""Putting quantizers on ``sim.model``: at build from the captured graph, and later for call sites
first seen at run time (a path ``dummy_input`` did not take).

A site first seen at run time gets what the capture would have given it: a layer in the graph
with a stable name, quantizers from the config defaults for its op type, a row in
``precision_table()``. It is targetable by ``set_precision`` from then on and calibrated by the
next ``compute_encodings`` (during which it is created observing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from mixprec.capture import op_types as ops
from mixprec.capture.callsite import (
    KNOWN_COMPUTE,
    KV_CACHE_WRITES,
    SiteKey,
    is_kv_cache_call,
    is_kv_cache_name,
    kv_cache_name,
    remember_torch_function_names,
    site_name,
)
from mixprec.capture.graph import Layer, LayerKind, ParamRef
from mixprec.capture.recorder import CaptureResult, is_leaf, module_layer_fields, module_param_refs
from mixprec.sim.forwards import LeafForward
from mixprec.sim.mode import RootForward, ScopeHook
from mixprec.sim.model_inputs import InputSlots, positional_names
from mixprec.sim.placement import layer_templates
from mixprec.sim.runtime import FunctionalSite, LayerQuantizers, SimRuntime, param_key, quantized_class

logger = logging.getLogger(__name__)


class SiteBuilder:
    """Builds the sim's quantizer holders and wires the runtime into ``sim.model``.

    ``sim`` is the ``QuantizationSimModel`` being built (typed ``Any``: this layer sits below it);
    the builder reads its graph, placement, config and default precisions and extends its
    per-layer tables when a site first runs.
    """

    def __init__(self, sim: Any) -> None:
        self.sim = sim
        self._param_keys: dict[int, int] | None = None

    # build --------------------------------------------------------------------------------
    def install(self, result: CaptureResult, input_slots: InputSlots | None = None) -> SimRuntime:
        sim = self.sim
        graph, placement = sim.graph, sim.placement
        rt = SimRuntime()
        rt.factory = self
        remember_torch_function_names()  # so compiled forwards name functions eager ones never ran
        # walked before the quantizer holders are attached (they would make leaves look like parents)
        own_modules = [(name, m, is_leaf(m)) for name, m in sim.model.named_modules()]
        sim._layer_quantizers = []
        functional = nn.ModuleDict()
        sites: dict[int, FunctionalSite] = {}
        shared: dict[int, Any] = {}
        for key, template in placement.params.items():
            layer = graph.layers[sim._param_layers[key][0]]
            ref = next(r for r in layer.params.values() if r.key == key)
            shared[key] = sim._build(template, template.initial, ref.qualified_name, param=True)
        for layer in graph.layers:
            lq = self._quantizers(layer, shared)
            sim._layer_quantizers.append(lq)
            if layer.is_module:
                self._attach(sim.model.get_submodule(layer.module_name), lq)
            else:
                functional[functional_key(layer.name)] = lq
                if self._has_places(layer):
                    sites[layer.index] = FunctionalSite(
                        layer.name, layer.op, lq, list(layer.params), written=_written(layer)
                    )
        rt.sites = {key: None if index is None else sites.get(index) for key, index in result.sites.items()}
        recorded = frozenset(key[1] for key, index in result.sites.items() if index is not None)
        rt.counted = recorded | KNOWN_COMPUTE | KV_CACHE_WRITES.keys()
        rt.input_quantizers = nn.ModuleList(
            [
                None if t is None else sim._build(t, t.initial, f"model input {io.path}")
                for t, io in zip(placement.model_inputs, graph.inputs, strict=True)
            ]
        )
        root = sim.model
        # the modules reading each float model input: a submodule called on its own quantizes
        # only the inputs read inside it (an encoder's features, not a block's hidden states)
        read_in = {
            io.index: [layer.module_name for layer, _ in graph.readers(io.tensor)]
            for io in graph.inputs
            if io.is_float
        }
        for name, module, leaf in own_modules:
            module.__dict__["_mixprec_runtime"] = rt
            if module is root:
                continue
            if leaf:
                module.forward = LeafForward(module, name, rt)
            else:
                read = frozenset(i for i, scopes in read_in.items() if _within(scopes, name))
                hook = ScopeHook(rt, name, True, positional_names(type(module).forward), read)
                module.register_forward_pre_hook(hook, with_kwargs=True)
                module.register_forward_hook(ScopeHook(rt, name, False), always_call=True)
        rt.input_slots = input_slots
        root.mixprec_functional = functional
        root.mixprec_input_quantizers = rt.input_quantizers
        root.forward = RootForward(root, rt)
        root.__class__ = quantized_class(type(root))
        return rt

    def _has_places(self, layer: Layer) -> bool:
        p = self.sim.placement
        return bool(layer.params) or any(p.inputs[layer.index]) or any(p.outputs[layer.index])

    def _quantizers(self, layer: Layer, shared: dict[int, Any]) -> LayerQuantizers:
        sim = self.sim
        lq = LayerQuantizers(len(layer.inputs), len(layer.outputs), [param_key(n) for n in layer.params])
        for slot, template in enumerate(sim.placement.inputs[layer.index]):
            if template is not None:
                lq.input_quantizers[slot] = sim._build(
                    template, template.initial, f"{layer.name} input {slot}"
                )
        for slot, template in enumerate(sim.placement.outputs[layer.index]):
            if template is not None:
                lq.output_quantizers[slot] = sim._build(
                    template, template.initial, f"{layer.name} output {slot}"
                )
        for name, ref in layer.params.items():
            lq.param_quantizers[param_key(name)] = shared.get(ref.key)
        return lq

    @staticmethod
    def _attach(module: nn.Module, lq: LayerQuantizers) -> None:
        if "mixprec_sites" not in module._modules:
            module.mixprec_sites = nn.ModuleList()
            # AIMET-style access (module.param_quantizers["weight"]) to the first call site's holders;
            # plain attributes, so state_dict keeps one key per quantizer
            for attr in ("input_quantizers", "output_quantizers", "param_quantizers"):
                module.__dict__[attr] = getattr(lq, attr)
        module.mixprec_sites.append(lq)

    # sites first seen at run time ---------------------------------------------------------
    def new_function_site(
        self, key: SiteKey, func: Callable, args: tuple, kwargs: dict, output: Any
    ) -> FunctionalSite | None:
        scope, canonical, ordinal = key
        floats, params = self._inputs(pytree.tree_leaves((args, kwargs)), scope)
        if not any(floats):
            return None  # masks, indices, shapes: nothing a quantizer would sit on
        if ops.is_in_place(func):
            outs = [args[0]] if args and isinstance(args[0], torch.Tensor) else []
        else:
            outs = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
        sim = self.sim
        name = site_name(scope, canonical, ordinal, set(sim._modules))
        if canonical in KV_CACHE_WRITES and is_kv_cache_call():
            name = kv_cache_name(scope, self._kv_writes(scope, canonical))
            cache = sim.graph.layer(name)
            if cache is not None:
                # the same cache written by another kind of cache (dynamic / static): one layer
                lq = sim._layer_quantizers[cache.index]
                return FunctionalSite(name, func, lq, [], written=KV_CACHE_WRITES[canonical])
        layer = Layer(
            index=len(sim.graph.layers),
            name=name,
            kind=LayerKind.FUNCTION,
            op=func,
            type_name=canonical,
            op_type=ops.function_op_type(canonical),
            module_name=scope,
            call_index=ordinal,
            inputs=(None,) * len(floats),
            outputs=(),
            params=params,
            data_movement=False,
            input_is_float=tuple(floats),
        )
        lq = self._grow(layer, outs, None)
        sim.model.mixprec_functional[functional_key(layer.name)] = lq
        if not self._has_places(layer):
            return None
        return FunctionalSite(layer.name, func, lq, list(params), written=_written(layer))

    def _kv_writes(self, scope: str, canonical: str) -> int:
        """How many KV-cache writes by ``canonical`` module ``scope`` already has: the next one is
        ``kv_cache_name(scope, that count)`` (keys and values alternate)."""
        return sum(
            1
            for (where, function, _), site in self.sim._runtime.sites.items()
            if where == scope
            and function == canonical
            and site is not None
            and is_kv_cache_name(scope, site.name)
        )

    def new_module_site(
        self, name: str, index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> LayerQuantizers:
        floats, _ = self._inputs(pytree.tree_leaves((args, kwargs)), name)
        params = module_param_refs(module, name, self._param_ref)
        outs = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
        layer = Layer(
            index=len(self.sim.graph.layers),
            **module_layer_fields(module, name, index, params),
            inputs=(None,) * len(floats),
            outputs=(),
            input_is_float=tuple(floats),
        )
        lq = self._grow(layer, outs, module)
        self._attach(module, lq)
        return lq

    def _inputs(self, leaves: list, scope: str) -> tuple[list[bool], dict[str, ParamRef]]:
        floats: list[bool] = []
        params: dict[str, ParamRef] = {}
        for leaf in leaves:
            if isinstance(leaf, nn.Parameter):
                key, qualified = self._param_ref(leaf)
                owner, _, attr = qualified.rpartition(".")
                rel = (
                    qualified[len(scope) + 1 :] if scope and qualified.startswith(scope + ".") else qualified
                )
                params[rel] = ParamRef(key, qualified, owner, attr, leaf.ndim)
            elif isinstance(leaf, torch.Tensor):
                floats.append(leaf.is_floating_point())
        return floats, params

    def _param_ref(self, param: torch.Tensor) -> tuple[int, str]:
        """The ParamRef key of ``param`` (shared with the layers already reading it) and its name."""
        sim = self.sim
        if self._param_keys is None:
            self._param_keys = {}
            for layer in sim.graph.layers:
                for ref in layer.params.values():
                    p = sim.model.get_submodule(ref.owner)._parameters.get(ref.attr)
                    if p is not None:
                        self._param_keys.setdefault(id(p), ref.key)
        names = {id(p): n for n, p in sim.model.named_parameters(remove_duplicate=False)}
        key = self._param_keys.get(id(param))
        if key is None:
            key = max(sim.placement.params, default=-1) + 1
            key = max(key, max(self._param_keys.values(), default=-1) + 1)
            self._param_keys[id(param)] = key
        return key, names.get(id(param), f"<parameter {key}>")

    def _grow(self, layer: Layer, outs: list[torch.Tensor], module: nn.Module | None) -> LayerQuantizers:
        sim = self.sim
        graph, placement = sim.graph, sim.placement
        layer.outputs = tuple(
            graph.new_tensor(t.is_floating_point(), tuple(t.shape), (layer.index, k))
            for k, t in enumerate(outs)
        )
        layer.output_is_float = tuple(t.is_floating_point() for t in outs)
        ins, out_templates, param_templates = layer_templates(
            layer, sim.config, module, sim.activation_precision, sim.param_precision
        )
        placement.inputs.append(ins)
        placement.outputs.append(out_templates)
        shared: dict[int, Any] = {}
        fresh = []
        for name, ref in layer.params.items():
            readers = sim._param_layers.get(ref.key)
            if readers:
                shared[ref.key] = sim._layer_quantizers[readers[0]].param_quantizers[
                    param_key(next(n for n, r in graph.layers[readers[0]].params.items() if r.key == ref.key))
                ]
            elif name in param_templates:
                template = param_templates[name]
                placement.params[ref.key] = template
                shared[ref.key] = sim._build(template, template.initial, ref.qualified_name, param=True)
                fresh.append(shared[ref.key])
            sim._param_layers.setdefault(ref.key, []).append(layer.index)
        graph.append(layer)
        lq = self._quantizers(layer, shared)
        sim._layer_quantizers.append(lq)
        scheme = sim._runtime.calibration_scheme
        if scheme is not None:
            for q in lq.all_quantizers():
                if not q.is_calibrating:
                    q.begin_calibration(scheme, collect=not any(q is f for f in fresh))
        logger.info("new layer %r (%s) on a path dummy_input did not take", layer.name, layer.type_name)
        return lq


def _within(module_names: list[str], scope: str) -> bool:
    return any(m == scope or m.startswith(scope + ".") for m in module_names)


def _written(layer: Layer) -> tuple[int, str] | None:
    """Where a KV-cache write in place takes its new states (``FunctionalSite.written``)."""
    if is_kv_cache_name(layer.module_name, layer.name):
        return KV_CACHE_WRITES.get(layer.type_name)
    return None


def functional_key(name: str) -> str:
    """The ``mixprec_functional`` key of a layer: dots become ``:`` (ModuleDict keys hold none),
    and a name that is an ``nn.ModuleDict`` attribute (``to``, ``float``, ``type``) gets a trailing
    ``:``, which no layer name has."""
    key = name.replace(".", ":")
    return key + ":" if hasattr(nn.ModuleDict, key) else key

"""The instance ``forward`` of a leaf module of ``sim.model``: quantized inputs, parameters, outputs.

Parameters are quantized without touching the module: the common layer types are computed by
their functional form with the quantized weight (``F.linear``, ``Conv._conv_forward``,
``F.embedding``, ``F.layer_norm``, transformers' ``Conv1D``), which is thread-safe and which
dynamo traces. Any other type with a quantized parameter runs its own forward with the quantized
tensors put in place of the parameters for the duration of the call (under a lock in eager mode,
so concurrent forwards never see each other's swap).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree


def quantize_leaves(value: Any, quantizers: nn.ModuleList, rt: Any) -> Any:
    """Apply ``quantizers[k]`` to the k-th non-parameter tensor leaf of ``value``."""
    qs = quantizers._modules
    if type(value) is torch.Tensor or (
        isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
    ):
        q = qs.get("0")
        return value if q is None else rt.apply(q, value)
    leaves, spec = pytree.tree_flatten(value)
    slot = 0
    changed = False
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and not isinstance(leaf, nn.Parameter):
            q = qs.get(str(slot))
            slot += 1
            if q is not None:
                leaves[i] = rt.apply(q, leaf)
                changed = True
    return pytree.tree_unflatten(leaves, spec) if changed else value


def _kind(module: nn.Module) -> str:
    if type(module) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "linear"
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return "conv"
    if type(module) is nn.Embedding:
        return "embedding"
    if type(module) is nn.LayerNorm:
        return "layer_norm"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "hf_conv1d"
    return "generic"


class OwnForwardView:
    """Introspection of an instance ``forward`` object sees ``type(self.module).forward``."""

    module: nn.Module

    @property
    def __wrapped__(self) -> Callable:
        # inspect.signature(sim.model.forward) (transformers' generate reads it) sees the model's own
        return types.MethodType(type(self.module).forward, self.module)

    @property
    def __code__(self) -> types.CodeType:
        # torch.export reads forward.__code__ for its diagnostics
        return type(self.module).forward.__code__


class LeafForward(OwnForwardView):
    """Instance ``forward`` of a leaf module: finds this call's site and quantizes around it.

    Attributes:
        module: the leaf module (its class is untouched).
        name: its qualified name in ``sim.model``.
        params: ``(relative name, its param_quantizers key, owner module, attribute)`` of each
            parameter it reads.
    """

    def __init__(self, module: nn.Module, name: str, runtime: Any) -> None:
        self.module = module
        self.name = name
        self.runtime = runtime
        self.kind = _kind(module)
        self.params = [
            (rel, rel.replace(".", ":"), module.get_submodule(rel.rpartition(".")[0]), rel.rpartition(".")[2])
            for rel, _ in module.named_parameters(remove_duplicate=False)
        ]

    def __setstate__(self, state: dict[str, Any]) -> None:
        # pickled before params carried their param_quantizers key
        state["params"] = [
            p if len(p) == 4 else (p[0], p[0].replace(".", ":"), *p[1:]) for p in state["params"]
        ]
        self.__dict__.update(state)

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rt = self.runtime
        compiling = torch.compiler.is_compiling()
        # rt.state(), inline: this runs for every leaf call
        st = rt._trace_state if compiling else rt._local.__dict__.get("state")
        if st is None:
            sites = self.module._modules.get("mixprec_sites")
            if sites is None or not len(sites):
                return rt.new_module_call(self, 0, args, kwargs)
            return self.run(sites[0], args, kwargs)
        if st.leaf_depth or st.scope[-1] is None:
            return self.original(*args, **kwargs)
        sites = self.module._modules.get("mixprec_sites")
        counts = st.counts
        index = counts.get(self.name, 0)
        counts[self.name] = index + 1
        st.leaf_depth += 1
        if compiling:
            # no try/finally under dynamo: it cannot resume a graph broken inside one (a site first
            # met under compile, sim/compiled.py); a raising forward's state is dropped anyway
            if sites is None or index >= len(sites):
                output = rt.new_module_call(self, index, args, kwargs)
            else:
                output = self.run(sites[index], args, kwargs)
            st.leaf_depth -= 1
            return output
        mode = st.pop_mode()
        # eager: ModuleList's __len__ / __getitem__ are Python calls, its _modules ("0", "1", ...) are not
        site = None if sites is None else sites._modules.get(str(index))
        try:
            if site is None:
                return rt.new_module_call(self, index, args, kwargs)
            return self.run(site, args, kwargs)
        finally:
            if mode is not None:
                torch._C._push_on_torch_function_stack(mode)
            st.leaf_depth -= 1

    def run(self, site: Any, args: tuple, kwargs: dict) -> Any:
        rt = self.runtime
        args, kwargs = site.quantize_inputs(args, kwargs, rt)
        quantized = {}
        pq = site._modules["param_quantizers"]._modules
        for rel, key, owner, attr in self.params:
            q = pq.get(key)
            if q is not None:
                quantized[rel] = rt.quantized_param(q, owner._parameters[attr])
        if not quantized:
            output = self.original(*args, **kwargs)
        else:
            output = self.compute(quantized, args, kwargs)
        return site.quantize_outputs(output, rt)

    def compute(self, quantized: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        m = self.module
        kind = self.kind
        if kind != "generic" and len(args) == 1 and not kwargs:
            x = args[0]
            w = quantized.get("weight")
            if w is None:  # only then: m.weight is a Python call (nn.Module.__getattr__)
                w = m.weight
            b = quantized.get("bias", m._parameters.get("bias"))
            if kind == "linear":
                return F.linear(x, w, b)
            if kind == "conv":
                return m._conv_forward(x, w, b)
            if kind == "embedding":
                return F.embedding(
                    x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse
                )
            if kind == "layer_norm":
                return F.layer_norm(x, m.normalized_shape, w, b, m.eps)
            if kind == "hf_conv1d":
                out = torch.addmm(b, x.view(-1, x.size(-1)), w)
                return out.view(*x.shape[:-1], m.nf)
        return self._swapped(quantized, args, kwargs)

    def _swapped(self, quantized: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        rt = self.runtime
        compiling = torch.compiler.is_compiling()
        if not compiling:
            rt._lock.acquire()
        swapped = []
        try:
            for rel, _, owner, attr in self.params:
                if rel in quantized:
                    swapped.append((owner, attr, owner._parameters[attr]))
                    owner._parameters[attr] = quantized[rel]
            return self.original(*args, **kwargs)
        finally:
            for owner, attr, original in swapped:
                owner._parameters[attr] = original
            if not compiling:
                rt._lock.release()

"""One functional call site (``x + y``, ``torch.matmul``, ``F.linear``) and its quantizers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from mixprec.capture import op_types as ops
from mixprec.sim.forwards import quantize_leaves


def _nests(value: Any) -> bool:
    """Whether pytree would look inside ``value`` (a container of further leaves)."""
    return isinstance(value, (list, tuple, dict)) or type(value) in pytree.SUPPORTED_NODES


class FunctionalSite:
    """A functional layer: its name, its quantizers and the order of the parameters it reads.

    ``written``: for a KV-cache write in place (``KV_CACHE_WRITES`` of mixprec.capture.callsite),
    the position and keyword of the argument holding the new states, which the layer's output
    quantizer quantizes before they are stored; None for every other site.
    """

    written: tuple[int, str] | None = None  # also for sites pickled before it existed

    def __init__(
        self,
        name: str,
        func: Callable,
        quantizers: Any,
        params: list[str],
        has_places: bool = True,
        written: tuple[int, str] | None = None,
    ) -> None:
        self.name = name
        self.has_places = has_places
        self.func = func
        self.quantizers = quantizers
        self.param_order = [p.replace(".", ":") for p in params]
        self.in_place = ops.is_in_place(func)
        self.dunder_in_place = getattr(func, "__name__", "").startswith("__i")
        self.written = written

    def call(self, func: Callable, args: tuple, kwargs: dict, rt: Any) -> Any:
        if self.written is not None:
            return self._write_quantized(func, args, kwargs, rt)
        mods = self.quantizers._modules
        if self._reads_quantized(mods):
            args, kwargs = self._quantize_arguments(args, kwargs, rt)
        output = func(*args, **kwargs)
        if self.in_place and not self.dunder_in_place:
            return self.quantize_in_place(args, output, rt)
        oq = mods["output_quantizers"]
        q = oq._modules.get("0")
        if q is not None and type(output) is torch.Tensor:
            return rt.apply(q, output)  # the common case of quantize_leaves, without its checks
        return quantize_leaves(output, oq, rt)

    def _write_quantized(self, func: Callable, args: tuple, kwargs: dict, rt: Any) -> Any:
        """A static cache's ``keys.index_copy_(2, positions, new)``: ``new`` is quantized on its way
        in, so the cache holds what a dynamic cache's quantized ``cat`` would (the positions not
        yet written hold zeros, which every integer grid represents exactly)."""
        q = self.quantizers._modules["output_quantizers"]._modules.get("0")
        position, keyword = self.written  # type: ignore[misc]
        if q is not None:
            if len(args) > position and isinstance(args[position], torch.Tensor):
                args = (*args[:position], rt.apply(q, args[position]), *args[position + 1 :])
            elif isinstance(kwargs.get(keyword), torch.Tensor):
                kwargs = {**kwargs, keyword: rt.apply(q, kwargs[keyword])}
        return func(*args, **kwargs)

    def _reads_quantized(self, mods: dict) -> bool:
        for q in mods["input_quantizers"]._modules.values():
            if q is not None:
                return True
        if self.param_order:
            pq = mods["param_quantizers"]._modules
            return any(pq.get(k) is not None for k in self.param_order)
        return False

    def quantize_in_place(self, args: tuple, output: Any, rt: Any) -> Any:
        """``x.add_(y)`` returns ``x``: quantize ``x`` itself, so later readers of it see the grid."""
        oq = self.quantizers.output_quantizers._modules.get("0")
        if oq is None or not args or not isinstance(args[0], torch.Tensor):
            return output
        target = args[0]
        with torch.no_grad():
            target.copy_(rt.apply(oq, target))
        return output

    def _quantize_arguments(self, args: tuple, kwargs: dict, rt: Any) -> tuple[tuple, dict]:
        mods = self.quantizers._modules
        iq = mods["input_quantizers"]._modules
        if (
            not kwargs
            and not self.param_order
            and all(type(a) is torch.Tensor or not _nests(a) for a in args)
        ):
            # positional tensors and scalars (x + y, torch.matmul(a, b)): the leaves are the arguments
            out = list(args)
            slot = 0
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter):
                    inq = iq.get(str(slot))
                    if inq is not None:
                        out[i] = rt.apply(inq, a)
                    slot += 1
            return tuple(out), kwargs
        leaves, spec = pytree.tree_flatten((args, kwargs))
        slot = n_param = 0
        pq = mods["param_quantizers"]._modules
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, nn.Parameter):
                if n_param < len(self.param_order):
                    p = pq.get(self.param_order[n_param])
                    if p is not None:
                        leaves[i] = rt.quantized_param(p, leaf)
                n_param += 1
            elif isinstance(leaf, torch.Tensor):
                inq = iq.get(str(slot))
                if inq is not None:
                    leaves[i] = rt.apply(inq, leaf)
                slot += 1
        return pytree.tree_unflatten(leaves, spec)

"""Which quantizer a tensor argument of ``sim.model`` takes: found by the argument's name.

The capture numbers the model's input tensors in the order of ``dummy_input``. Calls name their
arguments differently: positionally or by keyword, in another keyword order, with arguments the
dummy did not have (``generate()`` passes ``encoder_outputs`` and a cache where the dummy passed
``input_features``). So each model input quantizer is keyed by the forward parameter it came in
(positional arguments take their parameter's name) and its place among that argument's tensors;
an argument of a name the dummy did not have takes none. A submodule called on its own (an
encoder run by ``generate()``) quantizes the same way its arguments that bear the name of a model
input read inside it (so a block called with hidden states named like the image input is not).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

logger = logging.getLogger(__name__)

InputKey = tuple[str, int]  # (argument name, index among that argument's tensors)


def positional_names(forward: Callable) -> tuple[str, ...]:
    """The names of ``forward``'s parameters that take positional arguments, after ``self``."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return ()
    names = []
    for p in parameters[1:]:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return tuple(names)


def argument_name(names: tuple[str, ...], position: int) -> str:
    """The name of the positional argument at ``position`` (``*k`` past the named parameters)."""
    return names[position] if position < len(names) else f"*{position - len(names)}"


def named_arguments(args: tuple, kwargs: dict, names: tuple[str, ...]) -> list[tuple[str, Any]]:
    """``(name, value)`` of each argument of a call, positional ones first."""
    return [(argument_name(names, i), a) for i, a in enumerate(args)] + list(kwargs.items())


def input_keys(args: tuple, kwargs: dict, names: tuple[str, ...]) -> list[InputKey]:
    """The key of each tensor leaf of ``(args, kwargs)``, in the capture's order of model inputs."""
    keys: list[InputKey] = []
    for name, value in named_arguments(args, kwargs, names):
        tensors = [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]
        keys.extend((name, k) for k in range(len(tensors)))
    return keys


class InputSlots:
    """The model input quantizer of each argument key of the root's forward.

    Attributes:
        names: the root forward's positional parameter names.
        slots: ``(argument name, tensor index) -> index`` into the runtime's ``input_quantizers``.
    """

    def __init__(self, names: tuple[str, ...], slots: dict[InputKey, int]) -> None:
        self.names = names
        self.slots = slots
        self.told: set[str] = set()  # argument names logged by tell_unquantized

    @classmethod
    def of(cls, model: nn.Module, args: tuple, kwargs: dict) -> InputSlots:
        names = positional_names(type(model).forward)
        return cls(names, {key: i for i, key in enumerate(input_keys(args, kwargs, names))})

    def quantize(
        self,
        args: tuple,
        kwargs: dict,
        quantizers: nn.ModuleList,
        rt: Any,
        names: tuple[str, ...] | None = None,
        only: frozenset[int] | None = None,
    ) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with each float tensor quantized by its key's quantizer; ``names``
        are the positional parameter names of the forward called (the root's by default), ``only``
        the model inputs to quantize (all by default)."""
        qs = quantizers._modules
        names = self.names if names is None else names
        new_args = tuple(self._value(argument_name(names, i), a, qs, rt, only) for i, a in enumerate(args))
        new_kwargs = {k: self._value(k, v, qs, rt, only) for k, v in kwargs.items()}
        return new_args, new_kwargs

    def tell_unquantized(self, args: tuple, kwargs: dict) -> None:
        """Log, once per argument name, a float tensor argument of the root that no model input
        quantizer is keyed by (``inputs_embeds`` where the dummy passed ``input_ids``): it enters
        the model as given, and the user is told so rather than left to find out."""
        for name, value in named_arguments(args, kwargs, self.names):
            if (
                type(value) is torch.Tensor
                and value.is_floating_point()
                and (name, 0) not in self.slots
                and name not in self.__dict__.setdefault("told", set())
            ):
                self.told.add(name)
                logger.warning(
                    "sim.model got the float tensor argument %r, which dummy_input did not have: it "
                    "enters the model unquantized (model inputs take their quantizers by argument "
                    "name). Build the sim with a dummy_input that passes %r to give it a quantizer.",
                    name,
                    name,
                )

    def _value(self, name: str, value: Any, qs: dict, rt: Any, only: frozenset[int] | None) -> Any:
        if isinstance(value, torch.Tensor):
            return self._leaf(name, 0, value, qs, rt, only)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        leaves, spec = pytree.tree_flatten(value)
        k = 0
        changed = False
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                leaves[i] = self._leaf(name, k, leaf, qs, rt, only)
                changed = changed or leaves[i] is not leaf
                k += 1
        return pytree.tree_unflatten(leaves, spec) if changed else value

    def _leaf(
        self, name: str, k: int, t: torch.Tensor, qs: dict, rt: Any, only: frozenset[int] | None
    ) -> torch.Tensor:
        slot = self.slots.get((name, k))
        if slot is None or isinstance(t, nn.Parameter) or not t.is_floating_point():
            return t
        if only is not None and slot not in only:
            return t
        q = qs.get(str(slot))
        return t if q is None else rt.apply(q, t)

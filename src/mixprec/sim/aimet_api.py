"""The reference's ``QuantizationSimModel`` methods that ported scripts call, on mixprec's sim.

``QuantizationSimModel`` inherits ``ReferenceSimAPI``; each method keeps the reference's meaning
(docs/porting_from_aimet.md lists them and where mixprec differs). Quantizer names follow the
reference's ``<module>.input_quantizers.<i>`` / ``.output_quantizers.<i>`` /
``.param_quantizers.<name>`` form and resolve with ``sim.model.get_submodule(name)``.
"""

from __future__ import annotations

import inspect
import json
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from mixprec.errors import RequestError, UnsupportedArgumentError
from mixprec.quant.quantizers import QuantizerBase
from mixprec.sim.placement import Place, PlaceKind
from mixprec.sim.runtime import param_key

logger = logging.getLogger(__name__)

_LISTS = {PlaceKind.INPUT: "input_quantizers", PlaceKind.OUTPUT: "output_quantizers"}


class _NotGiven:
    def __repr__(self) -> str:
        return "<not given>"


NOT_GIVEN: Any = _NotGiven()
"""Default of ``compute_encodings``' ``forward_pass_callback_args``: call the callback with the model only."""


def check_constructor_kwargs(kwargs: dict[str, Any]) -> None:
    """The reference's constructor keywords that mixprec's signature lacks.

    ``rounding_mode="nearest"`` (or None) is what mixprec does; anything else is refused by name.
    """
    for name, value in kwargs.items():
        if name == "rounding_mode" and value in (None, "nearest"):
            continue
        if name == "rounding_mode":
            raise UnsupportedArgumentError(
                f"rounding_mode={value!r}: mixprec rounds to nearest only; drop the argument or pass 'nearest'"
            )
        raise UnsupportedArgumentError(
            f"QuantizationSimModel got an unexpected keyword argument {name!r}; accepted: model, dummy_input, "
            "quant_scheme, default_output_bw, default_param_bw, in_place, config_file, default_data_type "
            "(and the reference's rounding_mode='nearest')"
        )


def one_or_two_argument_callback(callback: Any, args: Any) -> tuple[Callable[[nn.Module, Any], Any], Any]:
    """``compute_encodings`` callback as ``callback(model, args)``: the reference calls
    ``callback(model)`` when no args are given, and older scripts take ``(model, args)``."""
    if args is not NOT_GIVEN or not callable(callback):
        return callback, None if args is NOT_GIVEN else args
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume the reference's form
        return (lambda model, _: callback(model)), None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_two = any(p.kind is p.VAR_POSITIONAL for p in params) or (
        len(positional) >= 2 and positional[1].default is inspect.Parameter.empty
    )
    return (callback, None) if takes_two else ((lambda model, _: callback(model)), None)


class ReferenceSimAPI:
    """Mixin of ``QuantizationSimModel`` (uses its graph, places and quantizers)."""

    # ------------------------------------------------------------------ modules and quantizers

    def named_qmodules(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, module)`` of every quantized layer, in graph order: modules of ``sim.model``
        (with ``input_quantizers``, ``output_quantizers``, ``param_quantizers``), and functional
        calls (``x + y``) as ``mixprec_functional.<layer>`` holders of the same three lists."""
        seen: set[str] = set()
        for layer in self.graph.layers:
            name = layer.module_name if layer.is_module else _functional_name(layer.name)
            if name in seen:
                continue
            seen.add(name)
            yield name, self.model.get_submodule(name) if name else self.model

    def qmodules(self) -> Iterator[nn.Module]:
        """The modules of ``named_qmodules``."""
        for _, module in self.named_qmodules():
            yield module

    def named_quantizers(self) -> Iterator[tuple[str, QuantizerBase]]:
        """``(name, quantizer)`` of every quantizer once; ``sim.model.get_submodule(name)`` is it."""
        for place, q in self.quantizers():
            yield self.quantizer_name(place), q

    def quantizer_name(self, place: Place) -> str:
        """The name of the quantizer slot at ``place`` under ``sim.model``."""
        if place.kind is PlaceKind.MODEL_INPUT:
            return f"mixprec_input_quantizers.{place.slot}"
        layer = self.graph.layers[place.layer]
        if layer.is_module:
            module = self._modules[layer.module_name]
            lq = self._layer_quantizers[place.layer]
            index = next(i for i, site in enumerate(module.mixprec_sites) if site is lq)
            # the first call site's lists are also the module's own attributes (mixprec.sim.sites)
            base = layer.module_name if index == 0 else _join(layer.module_name, f"mixprec_sites.{index}")
        else:
            base = _functional_name(layer.name)
        if place.kind is PlaceKind.PARAM:
            return _join(base, f"param_quantizers.{param_key(str(place.slot))}")
        return _join(base, f"{_LISTS[place.kind]}.{place.slot}")

    # ------------------------------------------------------------------ excluding

    def exclude_layers_from_quantization(self, layers_to_exclude: Iterable[Any]) -> None:
        """Remove every quantizer (inputs, outputs, params) of the given modules of ``sim.model``
        and of the layers inside them (layer names are accepted too)."""
        prefixes = []
        for item in layers_to_exclude:
            name = (
                item
                if isinstance(item, str)
                else self.module_name(item)
                if isinstance(item, nn.Module)
                else None
            )
            if name is None or (isinstance(item, str) and self.named_module(item) is None):
                raise RequestError(
                    f"exclude_layers_from_quantization: {item!r} is not a module (or module name) of sim.model; "
                    "pass modules of sim.model, e.g. [sim.model.fc]"
                )
            prefixes.append(name)
        doomed = [
            place
            for place in self.places()
            if place.layer is not None and _inside(self.graph.layers[place.layer], prefixes)
        ]
        for place in doomed:
            self.set_precision_at(place, None)
        self._excluded_layer_names = [*getattr(self, "_excluded_layer_names", []), *prefixes]
        logger.info("excluded %d quantizer places of %s from quantization", len(doomed), prefixes)

    def exclude_param_from_quantization(self, param_name_to_exclude: str) -> None:
        """Remove the quantizer of every parameter called ``param_name_to_exclude`` (e.g. ``"bias"``)."""
        for place in list(self.places()):
            if place.kind is PlaceKind.PARAM and place.slot == param_name_to_exclude:
                self.set_precision_at(place, None)

    # ------------------------------------------------------------------ settings

    def set_percentile_value(self, percentile_value: float) -> None:
        """The percentile ``QuantScheme.post_training_percentile`` keeps (in (50, 100]);
        used by the next ``compute_encodings``, also for quantizers created later."""
        for _, q in self.quantizers():
            q.set_percentile(percentile_value)  # validates before anything changes: first one raises
        self._percentile_value = float(percentile_value)

    def get_supported_kernels(self) -> dict[str, list[dict[str, Any]]]:
        """The config's ``supported_kernels``: ``{"defaults": [...], "<op type>": [...]}``, each
        entry ``{"activation": {"bitwidth": 16, "dtype": "int"}, "param": {...}}``."""
        kernels: dict[str, list[dict[str, Any]]] = {}
        if self.config.default_kernels is not None:
            kernels["defaults"] = [k.to_dict() for k in self.config.default_kernels]
        for op_type, rule in self.config.op_types.items():
            if rule.supported_kernels is not None:
                kernels[op_type] = [k.to_dict() for k in rule.supported_kernels]
        return kernels

    # ------------------------------------------------------------------ frozen encodings

    def load_and_freeze_encodings(
        self, encoding_path: str, ignore_when_quantizer_disabled: bool = False
    ) -> None:
        """Load activation and param encodings, frozen (``compute_encodings`` keeps them)."""
        self.load_encodings(
            encoding_path,
            strict=not ignore_when_quantizer_disabled,
            partial=True,
            requires_grad=False,
            allow_overwrite=False,
        )

    def set_and_freeze_param_encodings(self, encoding_path: str) -> None:
        """Load only the param encodings of a file, frozen (e.g. AdaRound's output, in the
        reference's torch-keyed format or mixprec's); activation encodings then come from
        ``compute_encodings``."""
        document = json.loads(Path(encoding_path).read_text())
        section = document.get("mixprec") if isinstance(document, dict) else None
        if isinstance(section, dict) and isinstance(section.get("quantizers"), list):
            params = [q for q in section["quantizers"] if isinstance(q, dict) and q.get("kind") == "param"]
            document = {**document, "mixprec": {**section, "quantizers": params}}
        elif isinstance(document, dict) and "param_encodings" in document:  # the reference's format
            document = {"param_encodings": document["param_encodings"]}
        elif isinstance(document, dict):  # older AdaRound files: the param encodings at top level
            document = {"param_encodings": document}
        self.load_encodings(document, strict=True, partial=True, requires_grad=False, allow_overwrite=False)

    # ------------------------------------------------------------------ pickling (save_checkpoint)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # weak references to the float model's modules: meaningless in another process
        state["_float_names"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._float_names = weakref.WeakKeyDictionary()


def _functional_name(layer_name: str) -> str:
    # the key of the layer's holder in sim.model.mixprec_functional (see QuantizationSimModel._install)
    return f"mixprec_functional.{layer_name.replace('.', ':')}"


def _join(base: str, rest: str) -> str:
    return f"{base}.{rest}" if base else rest


def _inside(layer: Any, prefixes: list[str]) -> bool:
    # a functional call belongs to the module whose forward made it (its module_name)
    names = (layer.name, layer.module_name)
    return any(p == "" or n == p or n.startswith(p + ".") for n in names for p in prefixes)

"""QuantizationSimModel: a quantized copy of a float model that keeps its module hierarchy.

The sim is the composition root of the engine: it captures the graph, places and builds the
quantizers, installs the runtime, and hands itself (as a :class:`~mixprec.sim.state.PrecisionState`)
to calibration, export and the mixed-precision planner, none of which import this module.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mixprec.capture.graph import Graph
from mixprec.capture.recorder import capture, is_leaf, split_dummy_input
from mixprec.config.rules import SimConfig, load_config
from mixprec.core.granularity import Granularity
from mixprec.core.precision import NumberKind, Precision, QuantizationDataType
from mixprec.quant.learnable import LearnableIntQuantizer
from mixprec.quant.masks import MASK_THRESHOLD, check_threshold
from mixprec.quant.observers import QuantScheme
from mixprec.quant.quantizers import QuantizerBase, make_quantizer
from mixprec.sim.aimet_api import (
    NOT_GIVEN,
    ReferenceSimAPI,
    check_constructor_kwargs,
    one_or_two_argument_callback,
)
from mixprec.sim.calibration import calibrate
from mixprec.sim.model_inputs import InputSlots
from mixprec.sim.model_state import buffers_restored, refuse_sim_model
from mixprec.sim.place_access import PlaceAccess
from mixprec.sim.placement import (
    Place,
    PlaceKind,
    Placement,
    SlotTemplate,
    place_quantizers,
)
from mixprec.sim.runtime import LayerQuantizers, SimRuntime, original_class, param_key
from mixprec.sim.sites import SiteBuilder


class QuantizationSimModel(ReferenceSimAPI, PlaceAccess):
    """Simulates quantization of ``model``: quantizers at every layer output, input and param
    the config asks for, including functional calls (``x + y``, ``torch.matmul``), with no
    model preparation.

    Args:
        model: the float model. It is deep-copied unless ``in_place=True``.
        dummy_input: one tensor, a tuple of positional inputs, or a dict of keyword inputs.
        quant_scheme: ``"tf"`` (min-max), ``"tf_enhanced"`` (noise-minimizing range search),
            ``"percentile"``, or a ``QuantScheme`` (also the reference's names, e.g.
            ``QuantScheme.post_training_tf_enhanced``); None means ``"tf_enhanced"``. The range
            learning schemes (``QuantScheme.training_range_learning_with_tf_init`` /
            ``..._tf_enhanced_init``) calibrate as tf / tf_enhanced, then integer encodings are
            trainable parameters (see docs/qat.md).
        default_output_bw: bitwidth of activation quantizers.
        default_param_bw: bitwidth of parameter quantizers.
        in_place: quantize ``model`` itself instead of a copy.
        config_file: a quantsim-config JSON path, a bundled preset name, a dict, or None (default preset).
        default_data_type: ``QuantizationDataType.int`` or ``.float`` (16 -> fp16, 8 -> fp8).
        **reference_kwargs: the reference's ``rounding_mode`` (``"nearest"`` only); anything
            else raises ``UnsupportedArgumentError``. The positional order is the reference's.

    Example:
        >>> sim = QuantizationSimModel(model, dummy_input=torch.randn(1, 3, 224, 224))
        >>> sim.compute_encodings(lambda m, _: m(x), None)
        >>> y = sim.model(x)
    """

    def __init__(
        self,
        model: nn.Module,
        dummy_input: Any,
        quant_scheme: str | QuantScheme | None = "tf_enhanced",
        default_output_bw: int = 8,
        default_param_bw: int = 8,
        in_place: bool = False,
        config_file: Any = None,
        default_data_type: Any = QuantizationDataType.int,
        **reference_kwargs: Any,
    ) -> None:
        check_constructor_kwargs(reference_kwargs)
        if quant_scheme is None:
            quant_scheme = QuantScheme.TF_ENHANCED
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        refuse_sim_model(model)
        try:
            kind = NumberKind(QuantizationDataType.parse(default_data_type).value)
        except ValueError as exc:
            raise ValueError(f"default_data_type: {exc}") from None
        self.activation_precision = _default_precision("default_output_bw", default_output_bw, kind)
        self.param_precision = _default_precision("default_param_bw", default_param_bw, kind)
        self.quant_scheme = QuantScheme.parse(quant_scheme)
        # range learning schemes calibrate like their calibration_scheme, then encodings train
        self.range_learning = self.quant_scheme.learnable
        self.config: SimConfig = load_config(config_file)
        self._mask_threshold: float | None = MASK_THRESHOLD
        # labels of quantizers the last compute_encodings gave only empty tensors
        self.empty_at_calibration: list[str] = []
        args, kwargs = split_dummy_input(dummy_input)
        self._float_names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        if not in_place:
            for name, module in model.named_modules():
                self._float_names.setdefault(module, name)
        self.model = model if in_place else copy.deepcopy(model)
        with buffers_restored(self.model):  # a model in train mode keeps its BatchNorm statistics
            result = capture(self.model, args, kwargs)
        self.graph: Graph = result.graph
        self.input_skeleton = result.input_skeleton
        self.output_skeleton = result.output_skeleton
        self.leaf_module_names = frozenset(
            name for name, m in self.model.named_modules() if m is not self.model and is_leaf(m)
        )
        self._modules = dict(self.model.named_modules())
        self._module_names = {id(m): n for n, m in self._modules.items()}
        self.placement: Placement = place_quantizers(
            self.graph, self.config, self._modules, self.activation_precision, self.param_precision
        )
        self._param_layers: dict[int, list[int]] = {}
        for layer in self.graph.layers:
            for ref in layer.params.values():
                self._param_layers.setdefault(ref.key, []).append(layer.index)
        self._install(result, InputSlots.of(self.model, args, kwargs))

    # building ---------------------------------------------------------------------------
    def _install(self, result: Any, input_slots: InputSlots) -> None:
        self._layer_quantizers: list[LayerQuantizers] = []
        self._runtime: SimRuntime = SiteBuilder(self).install(result, input_slots)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # copy.deepcopy(sim): the runtime's link back to its sim is not copied with it
        self.__dict__.update(state)
        self._runtime.factory = SiteBuilder(self)

    @property
    def cache_quantized_weights(self) -> bool:
        """Reuse fake-quantized parameters across inference forwards (default True).

        Costs memory of about one copy of the quantized weights; False computes them every forward
        (see docs/performance.md). Every weight edit shows in the next forward, in-place edits
        through ``param.data`` included: the cache checks a content fingerprint of each cached
        parameter every forward (``mixprec.sim.weight_cache``).
        """
        return self._runtime.cache_weights

    @cache_quantized_weights.setter
    def cache_quantized_weights(self, value: bool) -> None:
        self._runtime.cache_weights = bool(value)
        if not value:
            self._runtime.clear_cache()

    def clear_weight_cache(self) -> None:
        """Forget cached fake-quantized parameters; the next forward recomputes them."""
        self._runtime.clear_cache()

    def _build(
        self, template: SlotTemplate, precision: Precision | None, label: str, param: bool = False
    ) -> QuantizerBase | None:
        if precision is None or precision.is_full:
            return None
        s = template.settings
        settings = dict(
            symmetric=s.symmetric,
            granularity=s.granularity,
            unsigned_symmetric=s.unsigned_symmetric,
            strict_symmetric=s.strict_symmetric,
            label=label,
        )
        if self.range_learning and precision.is_int:
            q: QuantizerBase = LearnableIntQuantizer(precision.bits, **settings)
        else:
            q = make_quantizer(precision, **settings)
        percentile = getattr(self, "_percentile_value", None)  # set_percentile_value
        if percentile is not None:
            q.set_percentile(percentile)
        if not param:
            q.mask_threshold = self._mask_threshold  # see docs/masks.md
        device = _model_device(self.model)
        return q if device is None else q.to(device)

    @property
    def runtime(self) -> SimRuntime:
        """The runtime the quantized modules call into (shared by every layer of this sim)."""
        return self._runtime

    @property
    def mask_threshold(self) -> float | None:
        """Activation values at or below this are additive-mask values (docs/masks.md); None: none are.

        Setting it changes every activation quantizer, now and later; recalibrate afterwards.
        """
        return self._mask_threshold

    @mask_threshold.setter
    def mask_threshold(self, value: float | None) -> None:
        self._mask_threshold = check_threshold(value)
        for place, q in self.quantizers():
            if place.kind is not PlaceKind.PARAM:
                q.mask_threshold = self._mask_threshold

    # names ------------------------------------------------------------------------------
    def module_name(self, module: nn.Module) -> str | None:
        """Qualified name of ``module`` in ``sim.model`` (None if it is not part of it)."""
        name = self._module_names.get(id(module))
        return name if name is not None and self._modules[name] is module else None

    def float_module_name(self, module: nn.Module) -> str | None:
        """Qualified name of ``module`` in the float model the sim was built from."""
        return self._float_names.get(module)

    def named_module(self, name: str) -> nn.Module | None:
        return self._modules.get(name)

    def param_layers(self, key: int) -> list[int]:
        """Indices of the layers reading the parameter with ParamRef.key ``key``."""
        return self._param_layers[key]

    # places (reading them: sim/place_access.py) -----------------------------------------
    def set_precision_at(
        self, place: Place, precision: Precision | None, granularity: Granularity | None = None
    ) -> None:
        """Put a fresh quantizer of ``precision`` at ``place`` (None or fp32 removes it).

        The place keeps its symmetry and granularity; the new quantizer needs calibration.
        A parameter's quantizer is replaced for every layer that reads that parameter.
        """
        label = self.describe(place)
        template = self.template_at(place)
        current = self.quantizer_at(place)
        if granularity is None and current is not None:
            granularity = current.granularity  # a precision change keeps the place's granularity
        if granularity is not None:
            template = SlotTemplate(
                dataclasses.replace(template.settings, granularity=granularity), template.initial
            )
        new = self._build(template, precision, label, param=place.kind is PlaceKind.PARAM)
        if place.kind is PlaceKind.MODEL_INPUT:
            self._runtime.input_quantizers[int(place.slot)] = new
            return
        lq = self._layer_quantizers[place.layer]
        if place.kind is PlaceKind.INPUT:
            lq.input_quantizers[int(place.slot)] = new
        elif place.kind is PlaceKind.OUTPUT:
            lq.output_quantizers[int(place.slot)] = new
        else:
            ref = self.graph.layers[place.layer].params[str(place.slot)]
            for index in self._param_layers[ref.key]:
                other = self.graph.layers[index]
                for name, r in other.params.items():
                    if r.key == ref.key:
                        self._layer_quantizers[index].param_quantizers[param_key(name)] = new

    # calibration ------------------------------------------------------------------------
    def compute_encodings(
        self, forward_pass_callback: Callable[..., Any], forward_pass_callback_args: Any = NOT_GIVEN
    ) -> None:
        """Run ``forward_pass_callback(sim.model, forward_pass_callback_args)`` and set every encoding.

        Without ``forward_pass_callback_args`` the callback is called as ``callback(sim.model)``
        (a callback taking two arguments gets ``None`` as the second), as in the reference.

        While the callback runs, every quantizer passes values through unchanged and records
        statistics of the float values it sees (one pass calibrates all quantizers, and a
        quantizer's range does not depend on upstream ranges still being computed). Parameter
        encodings come from the parameters themselves. If anything fails (no data reached a
        quantizer, NaN/inf), every encoding is left as it was before the call.
        """
        callback, args = one_or_two_argument_callback(forward_pass_callback, forward_pass_callback_args)
        calibrate(self, callback, args)

    # export -----------------------------------------------------------------------------
    def export(
        self,
        path: str,
        filename_prefix: str,
        dummy_input: Any = None,
        onnx_export_args: Any = None,
        propagate_encodings: bool = False,
        export_to_torchscript: bool = False,
        use_embedded_encodings: bool = False,
        export_model: bool = True,
        filename_prefix_encodings: str | None = None,
        *,
        onnx_opset: int | None = None,
        **unknown: Any,
    ) -> Any:
        """Write ``<prefix>.onnx``, ``<prefix>.encodings`` and ``<prefix>_qdq.onnx`` into ``path``.

        The arguments after ``dummy_input`` are the reference's, in its order;
        docs/porting_from_aimet.md says what each does here (some raise
        ``UnsupportedArgumentError`` naming the alternative).
        """
        # Imported on use: export needs the optional onnx packages (mixprec[export]).
        from mixprec.export.reference_args import export_reference

        return export_reference(
            self,
            path,
            filename_prefix,
            dummy_input,
            onnx_export_args,
            propagate_encodings,
            onnx_opset,
            {
                "export_to_torchscript": export_to_torchscript,
                "use_embedded_encodings": use_embedded_encodings,
                "export_model": export_model,
                "filename_prefix_encodings": filename_prefix_encodings,
                **unknown,  # refused by name
            },
        )

    def load_encodings(
        self,
        encodings: Any,
        strict: bool = True,
        partial: bool = True,
        requires_grad: bool | None = None,
        allow_overwrite: bool | None = True,
    ) -> None:
        """Load an ``.encodings`` file written by :meth:`export` (or its parsed dict).

        ``strict``, ``partial``, ``requires_grad`` and ``allow_overwrite`` have the reference's
        meaning (see ``mixprec.export.loading.load_encodings_into``). A refused load changes nothing.
        """
        from mixprec.export.loading import load_encodings_into

        load_encodings_into(
            self,
            encodings,
            strict=strict,
            partial=partial,
            requires_grad=requires_grad,
            allow_overwrite=allow_overwrite,
        )

    def __repr__(self) -> str:
        n = sum(1 for _ in self.quantizers())
        name = original_class(self.model).__name__
        return f"QuantizationSimModel({name}, layers={len(self.graph.layers)}, quantizers={n})"


def _default_precision(arg: str, bitwidth: Any, kind: NumberKind) -> Precision:
    try:
        return Precision.from_bitwidth(bitwidth, kind)
    except ValueError as exc:
        accepted = "2..16 (or 32)" if kind is NumberKind.INT else "8, 16 or 32"
        raise ValueError(
            f"{arg}={bitwidth!r} is not a valid {kind.value} bitwidth; accepted: {accepted}"
        ) from exc


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device if p.device.type != "cpu" else None
    return None

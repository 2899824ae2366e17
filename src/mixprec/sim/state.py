"""What the sim's collaborators may read and change of a sim: two typed protocols.

:class:`QuantizationSimModel` satisfies both. Modules below it (calibration, effective precisions,
request targeting, resolution, the report, export) are typed against these protocols and never
import the sim itself, so the sim is the composition root and imports flow one way (see
docs/architecture.md).

* :class:`PrecisionView`: the graph, the placement and the precision held at each place. A plan's
  ``PlannedState`` (the sim's precisions with a plan's changes laid over them) satisfies it too,
  so effective precisions are computed the same way for the sim and for a plan.
* :class:`PrecisionState`: the sim's whole quantization state: the model, quantizers by place,
  names, settings, and the one mutation collaborators need (``set_precision_at``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mixprec.capture.graph import Graph
from mixprec.config.rules import SimConfig
from mixprec.core.granularity import Granularity
from mixprec.core.precision import Precision
from mixprec.quant.observers import QuantScheme
from mixprec.quant.quantizers import QuantizerBase
from mixprec.sim.placement import Place, Placement, SlotTemplate

if TYPE_CHECKING:
    import torch
    from torch import nn


@runtime_checkable
class PrecisionView(Protocol):
    """Read-only: the graph, where quantizers may sit, and the precision at each place."""

    graph: Graph
    placement: Placement

    def precision_at(self, place: Place) -> Precision | None:
        """The precision of the quantizer at ``place`` (None: no quantizer there)."""
        ...

    def granularity_at(self, place: Place) -> Granularity | None:
        """The granularity of the quantizer at ``place`` (None: no quantizer there)."""
        ...


@runtime_checkable
class PrecisionState(PrecisionView, Protocol):
    """A sim's quantization state, as calibration, export, targeting and the report use it.

    Attributes:
        model: the quantized model (``sim.model``).
        config: the sim config the placement came from.
        quant_scheme: how activation encodings are computed.
        activation_precision / param_precision: the sim's default precisions.
        leaf_module_names: qualified names of the modules the capture treated as leaves.
        runtime: the sim's runtime (export sets its tracing state; calibration its calibration scheme).
    """

    model: nn.Module
    config: SimConfig
    quant_scheme: QuantScheme
    activation_precision: Precision
    param_precision: Precision
    leaf_module_names: frozenset[str]
    runtime: Any

    def places(self) -> Iterator[Place]:
        """Every place where a quantizer exists or may be created."""
        ...

    def quantizer_at(self, place: Place) -> QuantizerBase | None:
        """The quantizer at ``place`` (None where there is none)."""
        ...

    def quantizers(self) -> Iterator[tuple[Place, QuantizerBase]]:
        """Each quantizer once (a shared parameter's quantizer at its first place)."""
        ...

    def set_precision_at(
        self, place: Place, precision: Precision | None, granularity: Granularity | None = None
    ) -> None:
        """Put a fresh quantizer of ``precision`` at ``place`` (None removes it)."""
        ...

    def template_at(self, place: Place) -> SlotTemplate:
        """The settings a place keeps whatever its precision."""
        ...

    def describe(self, place: Place) -> str:
        """A readable name of ``place`` (``conv1 output 0``, ``conv1.weight``)."""
        ...

    def param_tensor(self, place: Place) -> torch.Tensor:
        """The parameter a ``PARAM`` place quantizes."""
        ...

    def param_layers(self, key: int) -> list[int]:
        """Indices of the layers reading the parameter with ``ParamRef.key`` ``key``."""
        ...

    def module_name(self, module: nn.Module) -> str | None:
        """Qualified name of ``module`` in ``model`` (None if it is not part of it)."""
        ...

    def float_module_name(self, module: nn.Module) -> str | None:
        """Qualified name of ``module`` in the float model the sim was built from."""
        ...

    def named_module(self, name: str) -> nn.Module | None:
        """The module of ``model`` with qualified name ``name``."""
        ...

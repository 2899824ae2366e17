"""Reading the reference's torch-keyed encodings (format 0.6.1, as its ``load_encodings`` and
AdaRound write them) into mixprec load items:

``{"param_encodings": {"<module>.<param>": [entry, ...]},
"activation_encodings": {"<module>": {"input": {"0": entry}, "output": {"0": entry}}}}``,
each entry ``{"bitwidth", "dtype", "is_symmetric", "min", "max", "offset", "scale"}`` with the
file convention's offset (``min = offset*scale``). One entry per channel for per-channel
parameters (channels along the quantizer's axis, else axis 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mixprec.core.granularity import Granularity, PerChannel, PerTensor
from mixprec.core.precision import Precision
from mixprec.export.encodings import LoadItem
from mixprec.quant.base import Encoding
from mixprec.quant.quantizers import make_quantizer
from mixprec.sim.placement import Place, PlaceKind

if TYPE_CHECKING:
    from mixprec.sim.state import PrecisionState


def is_reference_document(data: Any) -> bool:
    """A torch-keyed reference file: encodings sections and no ``mixprec`` section."""
    return (
        isinstance(data, dict)
        and "mixprec" not in data
        and any(isinstance(data.get(k), dict) for k in ("param_encodings", "activation_encodings"))
    )


def _entries(value: Any, where: str) -> list[dict[str, Any]]:
    entries = [value] if isinstance(value, dict) else value
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{where}: expected an encoding entry or a list of them, got {value!r}")
    return entries


def _precision(entries: list[dict[str, Any]], where: str) -> Precision:
    kinds = {(e.get("dtype", "int"), e.get("bitwidth")) for e in entries}
    if len(kinds) != 1:
        raise ValueError(f"{where}: entries disagree on dtype/bitwidth: {sorted(map(str, kinds))}")
    dtype, bits = kinds.pop()
    try:
        return Precision.from_bitwidth(bits, str(dtype))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _encoding(
    sim: PrecisionState, place: Place, entries: list[dict[str, Any]], where: str
) -> tuple[Precision, Encoding]:
    precision = _precision(entries, where)
    current = sim.quantizer_at(place)
    settings = sim.template_at(place).settings
    granularity: Granularity = PerTensor()
    if len(entries) > 1:
        if place.kind is not PlaceKind.PARAM:
            raise ValueError(f"{where}: {len(entries)} entries; activation encodings are per tensor here")
        axis = (
            current.granularity.axis
            if current is not None and isinstance(current.granularity, PerChannel)
            else 0
        )
        channels = sim.param_tensor(place).shape[axis]
        if channels != len(entries):
            raise ValueError(f"{where}: {len(entries)} entries for {channels} channels along axis {axis}")
        granularity = PerChannel(axis)
    if precision.is_float and precision.bits != 8:  # fp16: a cast, no encoding values
        return precision, Encoding(precision, granularity, True)
    symmetric = str(entries[0].get("is_symmetric", "False")).lower() == "true"
    try:
        scale = torch.tensor([float(e["scale"]) for e in entries], dtype=torch.float32)
        offset = torch.tensor([int(e["offset"]) for e in entries], dtype=torch.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bad or missing scale/offset ({exc})") from None
    if isinstance(granularity, PerTensor):
        scale, offset = scale.reshape(()), offset.reshape(())
    if precision.is_float:  # fp8: the scale only
        return precision, Encoding(precision, granularity, True, scale)
    strict = bool(settings.strict_symmetric)
    enc = Encoding(precision, granularity, symmetric, scale, offset, strict_symmetric=strict)
    scratch = make_quantizer(
        precision,
        symmetric=symmetric,
        granularity=granularity,
        unsigned_symmetric=settings.unsigned_symmetric,
        strict_symmetric=strict,
    )
    scratch.set_encoding(enc)  # validates scale and offsets before anything changes
    return precision, enc


def read_reference_encodings(
    sim: PrecisionState, data: dict[str, Any], source: str, strict: bool
) -> list[LoadItem]:
    """Load items for a torch-keyed reference file.

    Raises:
        ValueError: an entry is malformed, or (``strict``) names a module, parameter or slot
            this sim does not quantize; the message names it.
    """
    if not data.get("param_encodings") and not data.get("activation_encodings"):
        raise ValueError(
            f"{source} has no 'mixprec' section and its param_encodings/activation_encodings are empty: "
            "nothing to load"
        )
    modules: dict[str, list[Any]] = {}
    for layer in sim.graph.layers:
        if layer.is_module:
            modules.setdefault(layer.module_name, []).append(layer)
    items: list[LoadItem] = []

    def add(place: Place | None, value: Any, where: str) -> None:
        if place is None:
            if strict:
                raise ValueError(
                    f"{where}: this sim has no such quantizer place (pass strict=False to skip it)"
                )
            return
        precision, enc = _encoding(sim, place, _entries(value, where), where)
        items.append(LoadItem(place, precision, enc))

    for key, value in (data.get("param_encodings") or {}).items():
        module, _, param = str(key).rpartition(".")
        layer = next((lay for lay in modules.get(module, []) if param in lay.params), None)
        add(
            None if layer is None else Place(PlaceKind.PARAM, layer.index, param), value, f"{source}: {key!r}"
        )
    for module, sides in (data.get("activation_encodings") or {}).items():
        for side, kind in (("input", PlaceKind.INPUT), ("output", PlaceKind.OUTPUT)):
            for slot, value in ((sides or {}).get(side) or {}).items():
                where = f"{source}: {module!r} {side} {slot}"
                layer = (modules.get(module) or [None])[0]
                if layer is None or not str(slot).isdigit():
                    add(None, value, where)
                    continue
                slots = (sim.placement.inputs if kind is PlaceKind.INPUT else sim.placement.outputs)[
                    layer.index
                ]
                index = int(slot)
                exists = index < len(slots) and slots[index] is not None
                add(Place(kind, layer.index, index) if exists else None, value, where)
    return items

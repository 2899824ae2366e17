"""The ``.encodings`` file: AIMET's 0.6.1 JSON format keyed by ONNX tensor names, plus a
``mixprec`` section that maps each of the sim's quantizer places to its entry (for loading).

Floats are written as Python floats of the float32 values, whose JSON text reads back to the
same float32: loading a file reproduces the encodings bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mixprec.config.op_rules import bool_text
from mixprec.core.granularity import Granularity, PerBlock, PerChannel, PerTensor
from mixprec.core.precision import Precision
from mixprec.quant.quantizers import Encoding, QuantizerBase, make_quantizer
from mixprec.sim.placement import Place, PlaceKind
from mixprec.sim.state import PrecisionState

FORMAT_VERSION = "0.6.1"
MIXPREC_SECTION_VERSION = 1
SECTIONS = {True: "param_encodings", False: "activation_encodings"}


def encoding_entries(q: QuantizerBase) -> list[dict[str, Any]]:
    """AIMET-style entries of a quantizer: one per channel (one for per-tensor)."""
    enc = q.get_encoding()
    p = enc.precision
    if p.is_float:
        base: dict[str, Any] = {
            "bitwidth": p.bits,
            "dtype": "float",
            "exponent_bits": p.exponent_bits,
            "mantissa_bits": p.mantissa_bits,
        }
        if enc.scale is None:
            return [base]
        rows = zip(
            enc.scale.reshape(-1).tolist(),
            enc.min.reshape(-1).tolist(),
            enc.max.reshape(-1).tolist(),
            strict=True,
        )  # type: ignore[union-attr]
        return [
            {**base, "is_symmetric": "True", "min": mn, "max": mx, "offset": 0, "scale": s}
            for s, mn, mx in rows
        ]
    flat = [t.reshape(-1).tolist() for t in (enc.scale, enc.offset, enc.min, enc.max)]  # type: ignore[union-attr]
    return [
        {
            "bitwidth": p.bits,
            "dtype": "int",
            "is_symmetric": bool_text(enc.symmetric),
            "min": mn,
            "max": mx,
            "offset": int(off),
            "scale": s,
        }
        for s, off, mn, mx in zip(*flat, strict=True)
    ]


def granularity_to_json(g: Granularity) -> dict[str, Any]:
    if isinstance(g, PerChannel):
        return {"kind": "per_channel", "axis": g.axis}
    if isinstance(g, PerBlock):
        return {"kind": "per_block", "axis": g.axis, "block_size": g.block_size}
    return {"kind": "per_tensor"}


def _place_json(sim: PrecisionState, place: Place) -> dict[str, Any]:
    layer = None if place.layer is None else sim.graph.layers[place.layer].name
    return {"kind": place.kind.value, "layer": layer, "slot": place.slot, "label": sim.describe(place)}


@dataclass(frozen=True)
class Row:
    """One quantizer (or one unquantized place) of the sim, and its tensor in the ONNX model."""

    place: Place
    quantizer: QuantizerBase | None
    keys: tuple[str, ...]  # the first is the one loading reads; a quantizer may act on several


def build_encodings(sim: PrecisionState, rows: list[Row]) -> dict[str, Any]:
    """The JSON document of the sim's encodings (``rows`` come from the export's coverage map)."""
    sections: dict[str, dict[str, Any]] = {"activation_encodings": {}, "param_encodings": {}}
    places = []
    for row in rows:
        entry = _place_json(sim, row.place)
        q = row.quantizer
        if q is None:
            places.append({**entry, "precision": "fp32", "tensor": None})
            continue
        section = SECTIONS[row.place.kind is PlaceKind.PARAM]
        entries = encoding_entries(q)
        for key in row.keys:
            sections[section][key] = entries
        scale = q.get_encoding().scale
        enc_settings = {
            "precision": q.precision.name,
            "granularity": granularity_to_json(q.granularity),
            "encoding_shape": None if scale is None else list(scale.shape),
            "symmetric": q.symmetric,
            "strict_symmetric": bool(getattr(q, "strict_symmetric", False)),
            # values at or below it pass unquantized (docs/masks.md); absent: none do
            "mask_threshold": q.mask_threshold if q.passes_masks else None,
        }
        places.append({**entry, **enc_settings, "tensor": row.keys[0], "section": section})
    per_channel = any(
        isinstance(r.quantizer.granularity, PerChannel) for r in rows if r.quantizer is not None
    )
    return {
        "version": FORMAT_VERSION,
        **sections,
        "excluded_layers": [],
        "quantizer_args": {
            "activation_bitwidth": sim.activation_precision.bits,
            "param_bitwidth": sim.param_precision.bits,
            "dtype": "float" if sim.activation_precision.is_float else "int",
            "is_symmetric": bool_text(sim.config.default_param_symmetric),
            "per_channel_quantization": bool_text(per_channel),
            "quant_scheme": sim.quant_scheme.value,
        },
        "mixprec": {"version": MIXPREC_SECTION_VERSION, "quantizers": places},
    }


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadItem:
    """What loading does at one place: the precision to hold (None: no quantizer) and its encoding."""

    place: Place
    precision: Precision | None
    encoding: Encoding | None
    mask_threshold: float | None = None


def _granularity_from_json(data: dict[str, Any]) -> Granularity:
    kind = data.get("kind")
    if kind == "per_channel":
        return PerChannel(int(data["axis"]))
    if kind == "per_block":
        return PerBlock(int(data["block_size"]), int(data["axis"]))
    if kind == "per_tensor":
        return PerTensor()
    raise ValueError(f"unknown granularity {data!r}")


def _find_place(sim: PrecisionState, item: dict[str, Any], where: str, places: set[Place]) -> Place:
    kind = PlaceKind(item["kind"])
    if kind is PlaceKind.MODEL_INPUT:
        place = Place(kind, None, int(item["slot"]))
    else:
        layer = sim.graph.layer(item["layer"])
        if layer is None:
            raise ValueError(f"{where}: layer {item['layer']!r} is not in this sim's model")
        place = Place(kind, layer.index, item["slot"] if kind is PlaceKind.PARAM else int(item["slot"]))
    if place not in places:
        raise ValueError(f"{where}: this sim has no quantizer place {item['label']!r}")
    return place


def _encoding(
    item: dict[str, Any],
    entries: list[dict[str, Any]],
    precision: Precision,
    granularity: Granularity,
    where: str,
) -> Encoding:
    symmetric, strict = bool(item["symmetric"]), bool(item.get("strict_symmetric", False))
    if precision.is_float and not any("scale" in e for e in entries):
        return Encoding(precision, granularity, True)
    for e in entries:
        if int(e.get("bitwidth", -1)) != precision.bits:
            raise ValueError(f"{where}: entry bitwidth {e.get('bitwidth')!r} differs from {precision}")
    shape = tuple(
        item.get("encoding_shape") or (() if isinstance(granularity, PerTensor) else (len(entries),))
    )
    scale = torch.tensor([float(e["scale"]) for e in entries], dtype=torch.float32).reshape(shape)
    if precision.is_float:
        return Encoding(precision, granularity, True, scale)
    offset = torch.tensor([int(e["offset"]) for e in entries], dtype=torch.int64).reshape(shape)
    return Encoding(precision, granularity, symmetric, scale, offset, strict_symmetric=strict)


def read_encodings(sim: PrecisionState, data: dict[str, Any], source: str) -> list[LoadItem]:
    """Validate a parsed ``.encodings`` document against ``sim`` and say what loading changes.

    Every encoding is tried on a scratch quantizer with the place's settings first, so a bad
    file raises here, before the sim changes.

    Raises:
        ValueError: the file is not a mixprec export, or does not fit this sim (names the place).
    """
    section = data.get("mixprec") if isinstance(data, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("quantizers"), list):
        raise ValueError(
            f"{source} has no 'mixprec' section: only files written by PrecisionState.export can be "
            "mapped back onto a sim's quantizers"
        )
    items: list[LoadItem] = []
    places = set(sim.places())
    for item in section["quantizers"]:
        where = f"{source}: quantizer {item.get('label')!r}"
        try:
            place = _find_place(sim, item, where, places)
            precision = Precision.parse(item["precision"])
            if precision.is_full:
                items.append(LoadItem(place, None, None))
                continue
            entries = data[item["section"]][item["tensor"]]
            granularity = _granularity_from_json(item["granularity"])
            enc = _encoding(item, entries, precision, granularity, where)
            settings = sim.template_at(place).settings
            scratch = make_quantizer(
                precision,
                symmetric=settings.symmetric,
                granularity=granularity,
                unsigned_symmetric=settings.unsigned_symmetric,
                strict_symmetric=settings.strict_symmetric,
                label=item.get("label", ""),
            )
            scratch.set_encoding(enc)
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(detail if detail.startswith(source) else f"{where}: {detail}") from None
        mask = item.get("mask_threshold")
        items.append(LoadItem(place, precision, enc, None if mask is None else float(mask)))
    return items

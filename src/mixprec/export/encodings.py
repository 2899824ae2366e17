"""The ``.encodings`` file: AIMET's 0.6.1 JSON format keyed by ONNX tensor names, plus a
``mixprec`` section that maps each of the sim's quantizer places to its entry (for loading).

Floats are written as Python floats of the float32 values, whose JSON text reads back to the
same float32: loading a file reproduces the encodings bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from mixprec.config.op_rules import bool_text
from mixprec.core.granularity import Granularity, PerBlock, PerChannel, PerTensor
from mixprec.core.precision import Precision
from mixprec.errors import EncodingFileError
from mixprec.quant.qmath import encoding_shape
from mixprec.quant.quantizers import Encoding, QuantizerBase, make_quantizer
from mixprec.sim.placement import Place, PlaceKind
from mixprec.sim.runtime import original_class
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
        "mixprec": {
            "version": MIXPREC_SECTION_VERSION,
            "model": {"class": original_class(sim.model).__name__, "fingerprint": model_fingerprint(sim)},
            "quantizers": places,
        },
    }


# ----------------------------------------------------------------------------- loading


def model_fingerprint(sim: PrecisionState) -> str:
    """A digest of the sim's layers (names, types) and parameter shapes: equal for sims of one model.

    Loading takes the file's precisions over only from a file of the same model (a mixed precision
    sim's file reproduces it in a fresh sim); from another model's file they are refused.
    """
    layers = [
        [
            layer.name,
            layer.type_name,
            sorted((n, list(_param_shape(sim, r))) for n, r in layer.params.items()),
        ]
        for layer in sim.graph.layers
    ]
    return hashlib.sha256(json.dumps(layers).encode()).hexdigest()[:32]


def _param_shape(sim: PrecisionState, ref: Any) -> tuple[int, ...]:
    return tuple(sim.model.get_submodule(ref.owner)._parameters[ref.attr].shape)


@dataclass(frozen=True)
class LoadItem:
    """What loading does at one place: the precision to hold (None: no quantizer) and its encoding."""

    place: Place
    precision: Precision | None
    encoding: Encoding | None
    mask_threshold: float | None = None


def _granularity_from_json(data: Any) -> Granularity:
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "per_channel":
        return PerChannel(int(data["axis"]))
    if kind == "per_block":
        return PerBlock(int(data["block_size"]), int(data["axis"]))
    if kind == "per_tensor":
        return PerTensor()
    raise ValueError(
        f"granularity {data!r} is not one of {{'kind': 'per_tensor' | 'per_channel' | 'per_block', ...}}"
    )


def _find_place(sim: PrecisionState, item: dict[str, Any], places: set[Place]) -> Place:
    kind = PlaceKind(item["kind"])
    slot = item["slot"]
    if kind is PlaceKind.PARAM:
        if not isinstance(slot, str):
            raise ValueError(f"a param slot is a parameter name, got {slot!r}")
    elif isinstance(slot, bool) or not isinstance(slot, int):
        raise ValueError(f"slot must be an integer, got {slot!r}")
    if kind is PlaceKind.MODEL_INPUT:
        place = Place(kind, None, slot)
    else:
        layer = sim.graph.layer(item["layer"]) if isinstance(item["layer"], str) else None
        if layer is None:
            raise ValueError(f"layer {item['layer']!r} is not in this sim's model")
        place = Place(kind, layer.index, slot)
    if place not in places:
        raise ValueError(f"this sim has no quantizer place {item.get('label')!r}")
    return place


def _encoding(item: dict[str, Any], entries: Any, precision: Precision, granularity: Granularity) -> Encoding:
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"the encodings entry {item['tensor']!r} is not a non-empty list of objects")
    symmetric, strict = bool(item["symmetric"]), bool(item.get("strict_symmetric", False))
    if precision.is_float and not any("scale" in e for e in entries):
        return Encoding(precision, granularity, True)
    for e in entries:
        if int(e.get("bitwidth", -1)) != precision.bits:
            raise ValueError(f"entry bitwidth {e.get('bitwidth')!r} differs from {precision}")
    shape = item.get("encoding_shape") or (() if isinstance(granularity, PerTensor) else (len(entries),))
    if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"encoding_shape must be a list of positive integers, got {shape!r}")
    if math.prod(shape) != len(entries):
        raise ValueError(
            f"encoding_shape {list(shape)} does not hold the {len(entries)} entries of {item['tensor']!r}"
        )
    scale = torch.tensor([float(e["scale"]) for e in entries], dtype=torch.float32).reshape(tuple(shape))
    if precision.is_float:
        return Encoding(precision, granularity, True, scale)
    offset = torch.tensor([int(e["offset"]) for e in entries], dtype=torch.int64).reshape(tuple(shape))
    return Encoding(precision, granularity, symmetric, scale, offset, strict_symmetric=strict)


def _check_fits(sim: PrecisionState, place: Place, enc: Encoding) -> None:
    """The encoding's shape against the parameter it quantizes (another model's file may not fit)."""
    if place.kind is not PlaceKind.PARAM or isinstance(enc.granularity, PerTensor) or enc.scale is None:
        return
    shape = _param_shape(sim, sim.graph.layers[place.layer].params[str(place.slot)])  # type: ignore[index]
    try:
        needed = encoding_shape(enc.granularity, shape)
    except (ValueError, IndexError) as exc:
        raise ValueError(
            f"{enc.granularity} does not fit this sim's parameter of shape {list(shape)}: {exc}"
        ) from None
    got = tuple(enc.scale.shape)
    if got != needed:
        what = f"{got[0]} channels" if isinstance(enc.granularity, PerChannel) else f"shape {list(got)}"
        want = needed[0] if isinstance(enc.granularity, PerChannel) else list(needed)
        raise ValueError(
            f"the file has {enc.granularity} encodings for {what}; this sim's parameter of shape "
            f"{list(shape)} needs {want}"
        )


def read_encodings(sim: PrecisionState, data: Any, source: str) -> list[LoadItem]:
    """Validate a parsed ``.encodings`` document against ``sim`` and say what loading changes.

    Every encoding is tried on a scratch quantizer with the place's settings first, and checked
    against the parameter it quantizes, so a bad file raises here, before the sim changes.

    Raises:
        EncodingFileError: the file is not a mixprec export, is malformed, or does not fit this sim
            (names the entry and the quantizer).
    """
    section = data.get("mixprec") if isinstance(data, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("quantizers"), list):
        raise EncodingFileError(
            f"{source} has no 'mixprec' section with a 'quantizers' list: only files written by "
            "QuantizationSimModel.export can be mapped back onto a sim's quantizers"
        )
    model = section.get("model")
    same_model = isinstance(model, dict) and model.get("fingerprint") == model_fingerprint(sim)
    items: list[LoadItem] = []
    places = set(sim.places())
    for i, item in enumerate(section["quantizers"]):
        label = item.get("label") if isinstance(item, dict) else None
        where = f"{source}: mixprec.quantizers[{i}]" + (f" (quantizer {label!r})" if label else "")
        try:
            if not isinstance(item, dict):
                raise ValueError(f"expected an object, got {item!r}")
            place = _find_place(sim, item, places)
            precision = Precision.parse(item["precision"])
            current = sim.precision_at(place)
            if not same_model and (None if precision.is_full else precision) != current:
                raise ValueError(
                    f"the file has {precision} here, this sim has {current or 'fp32'}; the file was written for "
                    "another model (its layers or parameter shapes differ), whose precisions are not taken over. "
                    "Load a file of this model, or make the precisions agree first (MixedPrecisionConfigurator)"
                )
            if precision.is_full:
                items.append(LoadItem(place, None, None))
                continue
            entries = data[item["section"]][item["tensor"]]
            granularity = _granularity_from_json(item["granularity"])
            enc = _encoding(item, entries, precision, granularity)
            _check_fits(sim, place, enc)
            settings = sim.template_at(place).settings
            scratch = make_quantizer(
                precision,
                symmetric=settings.symmetric,
                granularity=granularity,
                unsigned_symmetric=settings.unsigned_symmetric,
                strict_symmetric=settings.strict_symmetric,
                label=str(label or ""),
            )
            scratch.set_encoding(enc)
            mask = item.get("mask_threshold")
            mask = None if mask is None else float(mask)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise EncodingFileError(f"{where}: {detail}") from None
        items.append(LoadItem(place, precision, enc, mask))
    return items

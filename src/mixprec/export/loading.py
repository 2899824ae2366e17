"""``sim.load_encodings`` with the reference's options: ``strict``, ``partial``,
``requires_grad`` and ``allow_overwrite`` (docs/porting_from_aimet.md).

The file (or dict) is validated against the sim first (``read_encodings``), and every check of
the options runs before the sim changes: a refused load leaves the sim as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixprec.errors import EncodingFileError, UnsupportedArgumentError
from mixprec.export.encodings import read_encodings
from mixprec.export.reference_encodings import is_reference_document, read_reference_encodings
from mixprec.sim.placement import PlaceKind

if TYPE_CHECKING:
    from mixprec.sim.state import PrecisionState


def _document(encodings: Mapping | str | os.PathLike) -> tuple[dict[str, Any], str]:
    if isinstance(encodings, Mapping):
        return dict(encodings), "<encodings dict>"
    source = str(encodings)
    try:
        return json.loads(Path(encodings).read_text()), source
    except json.JSONDecodeError as exc:
        raise EncodingFileError(f"{source} is not JSON: {exc}") from None
    except RecursionError:
        raise EncodingFileError(f"{source}: JSON nested too deeply to be an encodings file") from None


def _known(sim: PrecisionState, item: Any) -> bool:
    """Whether the file's quantizer entry names a place this sim has (for ``strict=False``)."""
    if not isinstance(item, dict):
        return True  # let read_encodings report the malformed entry
    if item.get("kind") == PlaceKind.MODEL_INPUT.value:
        return True
    layer = sim.graph.layer(item.get("layer")) if isinstance(item.get("layer"), str) else None
    if layer is None:
        return False
    if item.get("kind") == PlaceKind.PARAM.value:
        return item.get("slot") in layer.params
    return True


def load_encodings_into(
    sim: PrecisionState,
    encodings: Mapping | str | os.PathLike,
    *,
    strict: bool = True,
    partial: bool = True,
    requires_grad: bool | None = None,
    allow_overwrite: bool | None = True,
) -> None:
    """Load a mixprec ``.encodings`` file (or its parsed dict) into ``sim``.

    Args:
        strict: True: an entry naming a layer or parameter this sim lacks is an error.
            False: such entries are skipped.
        partial: True: quantizers the file does not mention keep their encodings.
            False: they are removed (the file then decides every quantizer).
        requires_grad: True/False: the loaded encodings are trainable or not (True needs a
            range-learning ``quant_scheme``); None: unchanged.
        allow_overwrite: False freezes the loaded encodings against ``compute_encodings`` and
            later loads; None leaves each quantizer's flag as it is.

    Raises:
        EncodingFileError: the file is malformed or does not fit this sim (read_encodings names
            the entry and the quantizer).
        UnsupportedArgumentError: ``requires_grad=True`` on a sim whose encodings are not
            trainable, or a loaded quantizer is frozen (``allow_overwrite(False)`` earlier).
    """
    data, source = _document(encodings)
    if is_reference_document(data):
        items = read_reference_encodings(sim, data, source, strict)
    else:
        items = _read_mixprec(sim, data, source, strict)
    _apply(sim, items, partial=partial, requires_grad=requires_grad, allow_overwrite=allow_overwrite)


def _read_mixprec(sim: PrecisionState, data: dict[str, Any], source: str, strict: bool) -> list:
    section = data.get("mixprec")
    if isinstance(section, dict) and isinstance(section.get("quantizers"), list):
        kept = [item for item in section["quantizers"] if (strict or _known(sim, item))]
        data = {**data, "mixprec": {**section, "quantizers": kept}}
    return read_encodings(sim, data, source)


def _apply(
    sim: PrecisionState,
    items: list,
    *,
    partial: bool,
    requires_grad: bool | None,
    allow_overwrite: bool | None,
) -> None:
    if requires_grad and not sim.quant_scheme.learnable:
        raise UnsupportedArgumentError(
            f"load_encodings(requires_grad=True): the encodings of a sim built with "
            f"quant_scheme={sim.quant_scheme.name} are not trainable; build the sim with "
            "quant_scheme=QuantScheme.training_range_learning_with_tf_init (or ..._tf_enhanced_init), "
            "or pass requires_grad=None/False. Nothing was loaded"
        )
    frozen = [
        sim.describe(item.place)
        for item in items
        if (q := sim.quantizer_at(item.place)) is not None and not q.is_overwrite_allowed()
    ]
    if frozen:
        shown = ", ".join(repr(f) for f in frozen[:5]) + (
            f" and {len(frozen) - 5} more" if len(frozen) > 5 else ""
        )
        raise UnsupportedArgumentError(
            f"load_encodings: {len(frozen)} quantizer(s) are frozen ({shown}); call "
            "q.allow_overwrite(True) on them first. Nothing was loaded"
        )

    for item in items:
        current = sim.quantizer_at(item.place)
        if item.precision is None:
            if current is not None:
                sim.set_precision_at(item.place, None)
            continue
        enc = item.encoding
        if current is None or current.precision != item.precision or current.granularity != enc.granularity:  # type: ignore[union-attr]
            sim.set_precision_at(item.place, item.precision, enc.granularity)  # type: ignore[union-attr]
        q = sim.quantizer_at(item.place)
        if enc.precision.is_int and q.symmetric != enc.symmetric:  # type: ignore[union-attr]
            q.symmetric = enc.symmetric  # type: ignore[union-attr]  # the file's symmetry wins
        q.set_encoding(enc)  # type: ignore[union-attr,arg-type]
        mask = getattr(item, "mask_threshold", None)  # docs/masks.md: mask values pass unquantized
        if mask is not None:
            q.mask_threshold = mask  # type: ignore[union-attr]
        q.passes_masks = mask is not None  # type: ignore[union-attr]
        if requires_grad is not None:
            q.requires_grad_(requires_grad)  # type: ignore[union-attr]
        if allow_overwrite is not None:
            q.allow_overwrite(allow_overwrite)  # type: ignore[union-attr]
    if not partial:
        named = {item.place for item in items}
        for place in list(sim.places()):
            if place not in named and sim.quantizer_at(place) is not None:
                sim.set_precision_at(place, None)

"""compute_encodings: one observing pass over the user's data, then every encoding at once."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mixprec.errors import CalibrationError
from mixprec.quant.qmath import MIN_SPAN
from mixprec.quant.quantizers import QuantizerBase
from mixprec.sim.distributed import run_calibration_pass
from mixprec.sim.model_state import eval_mode
from mixprec.sim.placement import PlaceKind
from mixprec.sim.state import PrecisionState

logger = logging.getLogger(__name__)


def calibrate(sim: PrecisionState, callback: Callable[[nn.Module, Any], Any], args: Any) -> None:
    """Observe float values in one pass (in eval mode, see ``eval_mode``), then set encodings; on any
    failure restore the previous ones."""
    if not callable(callback):
        raise TypeError(f"forward_pass_callback must be callable as callback(model, args), got {callback!r}")
    entries = list(sim.quantizers())
    saved = [(q, q.get_encoding() if q.needs_encoding and q.is_initialized() else None) for _, q in entries]
    for place, q in entries:
        # Parameter encodings come from the parameters themselves: no need to observe them per batch.
        # Frozen encodings (allow_overwrite(False)) only pass values through and stay as they are.
        collect = place.kind is not PlaceKind.PARAM and q.is_overwrite_allowed()
        q.begin_calibration(sim.quant_scheme, collect=collect)
    # layers first seen during the pass are created observing (see mixprec.sim.sites)
    sim.runtime.calibration_scheme = sim.quant_scheme
    known = {id(q) for _, q in entries}
    try:
        with torch.no_grad(), eval_mode(sim.model):
            # under torch.distributed this also combines the statistics of every rank
            run_calibration_pass(sim, entries, callback, args)
        sim.runtime.calibration_scheme = None
        entries += [(place, q) for place, q in sim.quantizers() if id(q) not in known]
        unreached = _unreached(entries)
        empty, tiny = [], []
        for place, q in entries:
            if not q.is_overwrite_allowed():
                q.abort_calibration()
            elif id(q) in unreached:
                if _only_empty(q):
                    empty.append(q.label)
                q.abort_calibration()  # a layer off the calibration data's paths keeps what it had
            elif place.kind is PlaceKind.PARAM:
                q.calibrate_tensor(sim.param_tensor(place).detach(), sim.quant_scheme)
            else:
                tiny += _below_min_span(q)
                q.end_calibration()
    except BaseException as exc:
        sim.runtime.calibration_scheme = None
        saved += [(q, None) for _, q in sim.quantizers() if id(q) not in known]
        for q, encoding in saved:
            q.abort_calibration()
            if encoding is None:
                q.reset_encoding()
            else:
                q.set_encoding(encoding)
        if isinstance(exc, CalibrationError):
            # keeps the cause a distributed failure carries (the callback's exception on its rank)
            raise CalibrationError(f"{exc}\nno encoding was changed") from exc.__cause__
        raise
    sim.empty_at_calibration = empty
    if empty:
        warnings.warn(
            f"{len(empty)} quantizer(s) saw only empty tensors during calibration and have no new "
            f"encoding: {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''} (listed in "
            "sim.empty_at_calibration). They pass empty tensors through; a forward that gives them "
            "values raises until calibration data reaches them.",
            stacklevel=3,
        )
    if tiny:
        warnings.warn(
            "values smaller than the smallest range a quantizer represents "
            f"({MIN_SPAN:g}) quantize to 0 at: {'; '.join(tiny[:10])}{' ...' if len(tiny) > 10 else ''}",
            stacklevel=3,
        )


def _unreached(entries: list) -> set[int]:
    """Activation quantizers no data reached, when data reached others (a path the calibration
    data did not take: not an error, those layers keep their encodings and are named in a warning).
    When nothing was reached at all, the empty set: ``end_calibration`` then raises."""
    observing = [(p, q) for p, q in entries if p.kind is not PlaceKind.PARAM and q.observer is not None]
    # only additive-mask values (docs/masks.md) is data: the range [0, 0]
    empty = [(p, q) for p, q in observing if q.observer.num_values == 0 and not q.saw_masks]
    if not empty or len(empty) == len(observing):
        return set()
    labels = ", ".join(q.label for _, q in empty[:8]) + (" ..." if len(empty) > 8 else "")
    message = (
        f"compute_encodings: no data reached {len(empty)} quantizer(s) ({labels}); their layers did not run on "
        "the calibration data and keep their previous encodings (none if never calibrated)"
    )
    logger.warning(message)
    warnings.warn(message, stacklevel=4)
    return {id(q) for _, q in empty}


def _only_empty(q: QuantizerBase) -> bool:
    obs = q.observer
    return obs is not None and obs.num_values == 0 and obs.empty_batches > 0 and not q.saw_masks


def _below_min_span(q: QuantizerBase) -> list[str]:
    """``["label (max |x| = ...)"]`` when every value ``q`` observed is nonzero-but-tiny."""
    obs = q.observer
    if obs is None or obs.num_values == 0 or obs.min is None or obs.max is None:
        return []
    absmax = float(torch.maximum(obs.min.abs(), obs.max.abs()).min())
    return [f"{q.label} (max |x| = {absmax:.3g})"] if 0 < absmax < MIN_SPAN else []

"""compute_encodings: one observing pass over the user's data, then every encoding at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mixprec.errors import CalibrationError
from mixprec.sim.distributed import run_calibration_pass
from mixprec.sim.placement import PlaceKind
from mixprec.sim.state import PrecisionState


def calibrate(sim: PrecisionState, callback: Callable[[nn.Module, Any], Any], args: Any) -> None:
    """Observe float values in one pass, then set encodings; on any failure restore the previous ones."""
    if not callable(callback):
        raise TypeError(f"forward_pass_callback must be callable as callback(model, args), got {callback!r}")
    entries = list(sim.quantizers())
    saved = [(q, q.get_encoding() if q.needs_encoding and q.is_initialized() else None) for _, q in entries]
    for place, q in entries:
        # Parameter encodings come from the parameters themselves: no need to observe them per batch.
        # Frozen encodings (allow_overwrite(False)) only pass values through and stay as they are.
        collect = place.kind is not PlaceKind.PARAM and q.is_overwrite_allowed()
        q.begin_calibration(sim.quant_scheme, collect=collect)
    try:
        with torch.no_grad():
            # under torch.distributed this also combines the statistics of every rank
            run_calibration_pass(sim, entries, callback, args)
        for place, q in entries:
            if not q.is_overwrite_allowed():
                q.abort_calibration()
            elif place.kind is PlaceKind.PARAM:
                q.calibrate_tensor(sim.param_tensor(place).detach(), sim.quant_scheme)
            else:
                q.end_calibration()
    except BaseException as exc:
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

"""compute_encodings: one observing pass over the user's data, then every encoding at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._placement import PlaceKind
from .errors import CalibrationError

if TYPE_CHECKING:
    from .sim import QuantizationSimModel


def calibrate(sim: QuantizationSimModel, callback: Callable[[nn.Module, Any], Any], args: Any) -> None:
    """Observe float values in one pass, then set encodings; on any failure restore the previous ones."""
    if not callable(callback):
        raise TypeError(f"forward_pass_callback must be callable as callback(model, args), got {callback!r}")
    entries = list(sim.quantizers())
    saved = [(q, q.get_encoding() if q.needs_encoding and q.is_initialized else None) for _, q in entries]
    for _, q in entries:
        q.begin_calibration(sim.quant_scheme)
    try:
        with torch.no_grad():
            callback(sim.model, args)
        for place, q in entries:
            if place.kind is PlaceKind.PARAM:
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
            raise CalibrationError(f"{exc}\nno encoding was changed") from None
        raise

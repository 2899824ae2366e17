"""A snapshot of every quantizer of a sim, to prove that a failed call changed nothing."""

from __future__ import annotations

from mixprec import QuantizationSimModel


def full_snapshot(sim: QuantizationSimModel) -> tuple:
    """Every place's quantizer: identity, class, precision, settings and encoding tensors; and training."""
    state = []
    for place in sim.places():
        q = sim.quantizer_at(place)
        if q is None:
            state.append((place, None))
            continue
        enc = None
        if q.needs_encoding and q.is_initialized():
            e = q.get_encoding()
            enc = tuple(None if t is None else t.tolist() for t in (e.scale, e.offset, e.min, e.max))
        state.append(
            (
                place,
                id(q),
                type(q).__name__,
                q.precision,
                q.symmetric,
                str(q.granularity),
                q.is_initialized(),
                enc,
            )
        )
    return tuple(state), sim.model.training

"""``SensitivityReport.suggest``: the fewest layers at the higher precision that meet a target.

Which side is "higher" comes from the sweep: when the tried precision is lower than what the
candidates had (int8 -> int4, the usual question), every candidate starts at the tried
precision and the most sensitive ones are kept at their precision; when it is higher (int4 ->
int8), the candidates that gain most are promoted. Either way the candidates are taken in
ranking order, and ``k``, the number at the higher precision, is the smallest that meets the
target: a binary search over ``k`` where each step applies the whole profile to the sim
(through the configurator, as ``apply_profile`` would) and scores it on the sweep's batches, so
the returned profile is one that was measured to meet the target. The search assumes the
metric improves as ``k`` grows; where it does not, the answer still meets the target but may not
be the smallest.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from mixprec.analysis.candidates import Candidate, apply_requests, revert
from mixprec.analysis.session import all_reduce_sum, run_batch
from mixprec.core.param_spec import ParamSpec
from mixprec.errors import RequestError
from mixprec.mixed.configurator import MixedPrecisionConfigurator
from mixprec.mixed.profile import Profile, SetPrecision

# The report passes itself in (it imports this module): ``report`` below is a SensitivityReport.
SensitivityReport = Any

log = logging.getLogger(__name__)


def suggest(
    report: SensitivityReport,
    *,
    min_sqnr_db: float | None = None,
    target: float | None = None,
    max_kept: int | None = None,
    num_changed: int | None = None,
) -> Profile:
    """See the module docstring. The returned profile's ``source`` names the measured metric.

    Raises:
        RequestError: not exactly one goal, ``min_sqnr_db`` with a custom metric, or a target that
            even the best case (no layer at the lower precision) does not meet.
    """
    goals = {"min_sqnr_db": min_sqnr_db, "target": target, "max_kept": max_kept, "num_changed": num_changed}
    given = [k for k, v in goals.items() if v is not None]
    if len(given) != 1:
        raise RequestError(f"suggest takes exactly one of {', '.join(goals)}; got {given or 'none'}")
    session, metric = report._session, report._metric
    if session is None or metric is None:
        raise RequestError("suggest needs the report analyze_sensitivity returned (it re-runs the model)")
    if min_sqnr_db is not None:
        if metric.unit != "dB":
            raise RequestError(
                f"min_sqnr_db needs the default SQNR metric; this report uses {metric.name}; use target="
            )
        target = min_sqnr_db
    n = len(report.rows)
    demote = _lower_is_tried(report._candidates, report.rows)
    # order[:k] are the candidates at the higher precision
    order = (
        list(range(n))
        if demote
        else sorted(range(n), key=lambda i: report.rows[i].delta, reverse=metric.higher_is_better)
    )

    def profile_for(k: int) -> Profile:
        return _profile(report, order, k, demote)

    def score(k: int) -> float:
        return _evaluate(report, profile_for(k))

    def meets(value: float) -> bool:
        return value >= target if metric.higher_is_better else value <= target

    if max_kept is not None or num_changed is not None:
        k = max(0, min(n, max_kept if max_kept is not None else (n - num_changed if demote else num_changed)))
        value = score(k)
    else:
        best = n  # every candidate at the higher precision
        best_value = report.baseline if demote else score(n)
        if not meets(best_value):
            raise RequestError(
                f"target {target} is not met even with every candidate at the higher precision "
                f"({metric.name} {best_value:.4g}); lower the target"
            )
        lo, hi, value = 0, best, best_value  # meets(hi) holds
        while lo < hi:
            mid = (lo + hi) // 2
            v = score(mid)
            if meets(v):
                hi, value = mid, v
            else:
                lo = mid + 1
        k = hi
    log.info("suggest: %d of %d candidates at the higher precision; %s %.4g", k, n, metric.name, value)
    profile = profile_for(k)
    unit = f" {metric.unit}" if metric.unit else ""
    source = f"<suggested: {k} of {n} kept, {metric.name} {value:.4g}{unit}>"
    return Profile(profile.requests, strict=False, source=source)


def _lower_is_tried(candidates: list[Candidate], rows: list[Any]) -> bool:
    votes = 0
    for c in candidates:
        for ch in c.changes:
            old, new = _bits(ch.old), _bits(ch.new)
            votes += (new < old) - (new > old)
    if votes:
        return votes > 0
    return sum(r.delta for r in rows) <= 0


def _bits(precision: Any) -> float:
    return math.inf if precision is None or precision.is_full else precision.bits


def _profile(report: SensitivityReport, order: list[int], k: int, demote: bool) -> Profile:
    """Entries in ranking order: the lower precision where it goes, the higher where a layer keeps it."""
    settings = report._settings
    entries = []
    n = len(order)
    high = set(order[:k])
    for rank, i in enumerate(range(n), 1):
        c, row = report._candidates[i], report.rows[i]
        at_tried = (i not in high) if demote else (i in high)
        unit = f" {report.unit}" if report.unit else ""
        note = (
            f"{row.layer}: {row.delta:+.3f}{unit} ({report.metric} {row.metric:.3f}{unit}) with only this "
            f"layer at {report.tried}; rank {rank} of {n}"
        )
        if at_tried:
            activation, param = settings["activation"], settings["param"]
            note = f"{'changed' if demote else 'promoted'}: {note}"
        else:
            if not demote:
                continue  # not promoted: nothing to request
            activation, param = _previous(c, settings)
            note = f"kept: {note}"
        for t in c.profile_targets:
            entries.append(_entry(t, activation, param, note))
    return Profile(tuple(entries), strict=False)


def _previous(c: Candidate, settings: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """The precisions the candidate had before the tried one, for the names the sweep changed."""
    param = None
    if settings["param"]:
        param = {}
        for name in settings["param"]:
            olds = {ch.old for ch in c.changes if ch.place.kind.value == "param" and _param_name(ch) == name}
            if len(olds) == 1:
                old = olds.pop()
                param[name] = "fp32" if old is None else old.name
    activation = None
    if settings["activation"] is not None:
        olds = {ch.old for ch in c.changes if ch.place.kind.value in ("input", "output")}
        if len(olds) == 1:
            old = olds.pop()
            activation = "fp32" if old is None else old.name
    return activation, param or None


def _param_name(ch: Any) -> str:
    return str(ch.place.slot).rsplit(".", 1)[-1]


def _entry(target: str, activation: Any, param: dict[str, Any] | None, comment: str) -> SetPrecision:
    return SetPrecision(
        target,
        None if activation is None else _name(activation),
        tuple((k, ParamSpec.parse(v)) for k, v in (param or {}).items()),
        comment=comment,
    )


def _name(activation: Any) -> str:
    from mixprec.core.precision import Precision

    return Precision.parse(activation).name


def _evaluate(report: SensitivityReport, profile: Profile) -> float:
    """Apply ``profile`` to the sim as ``apply_profile`` would, score it on the batches, undo it."""
    session = report._session
    sim = session.sim
    calibrate = report._settings["calibrate"]
    if calibrate:
        session.set_baseline_encodings()
    mp = MixedPrecisionConfigurator(sim)
    mp.apply_profile(profile)
    changes, encodings = apply_requests(sim, mp)
    try:
        seen: set[int] = set()
        for ch in changes:
            q = sim.quantizer_at(ch.place)
            if q is not None and id(q) not in seen:
                seen.add(id(q))
                if not session.encode(ch.place, q):
                    session._observe_new([(ch.place, q)])
        total = None
        with torch.no_grad():
            for b, batch in enumerate(session.batches):
                stats = session.score(b, run_batch(sim.model, batch))
                total = stats if total is None else total + stats
    finally:
        revert(sim, changes, encodings)
        if calibrate:
            session.restore_user_encodings()
    if total is None:  # a rank without batches still takes part in the sum
        total = torch.zeros(session.metric.width, dtype=torch.float64)
    return session.metric.value(all_reduce_sum(total))

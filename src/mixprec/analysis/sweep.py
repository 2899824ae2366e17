"""``analyze_sensitivity``: try one precision on each candidate layer alone and score the model."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from mixprec.analysis.candidates import Candidate, expand_targets, plan_changes
from mixprec.analysis.metrics import float_leaves, make_metric, sqnr_stats
from mixprec.analysis.replay import Diverged, Tape, unseen
from mixprec.analysis.report import SensitivityReport, build_report
from mixprec.analysis.session import Session, all_reduce_sum, run_batch
from mixprec.core.param_spec import ParamSpec
from mixprec.core.precision import Precision
from mixprec.errors import EncodingNotComputedError, RequestError
from mixprec.quantsim import QuantizationSimModel

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def clock() -> float:
    """The clock of ``SensitivityReport.timings``: wall seconds (benchmarks/bench_sensitivity.py
    swaps in process CPU seconds, steadier on a shared machine)."""
    return CLOCK()


CLOCK: Callable[[], float] = time.perf_counter


def analyze_sensitivity(
    sim: QuantizationSimModel,
    batches: Iterable[Any],
    targets: Any,
    param: dict[str, Any] | None = None,
    activation: Any = None,
    metric: Any = None,
    *,
    layers: Any = None,
    calibrate: bool = True,
    higher_is_better: bool = True,
    fast: bool = True,
    progress: Progress | None = None,
) -> SensitivityReport:
    """Try a precision on each candidate layer alone, score the model, rank the layers.

    Args:
        sim: the sim; it is left as it was (precisions and encodings) when this returns.
        batches: the data, iterated several times (a list is made of it). A dict batch is passed
            as keyword inputs, a tuple/list as positional inputs, anything else as the one input.
            Under ``torch.distributed`` each rank passes its own shard.
        targets: what to try, as ``set_precision`` takes it: a module class (one candidate per
            module of that class), a module, a layer name, glob or ``re:`` regex, a function
            (one candidate per call site), or a list of these.
        param: the precision to try on parameters, e.g. ``{"weight": "int4"}`` or
            ``{"weight": {"precision": "int4", "block_size": 32}}``.
        activation: the activation precision to try (as ``set_precision``'s ``activation``).
        metric: None for the output SQNR against the float model (dB), or a callable
            ``fn(output, float_output) -> float`` averaged over batches.
        layers: inside each candidate, change only layers of this class or function
            (``targets=LlamaDecoderLayer, layers=nn.Linear``: one candidate per decoder layer).
        calibrate: True: baseline encodings from ``batches`` (see docs/sensitivity.md);
            False: keep the sim's encodings for every quantizer the candidate does not change.
        higher_is_better: for a callable ``metric``: False for a loss.
        fast: reuse the baseline forward up to each candidate (exact, see docs/sensitivity.md).
        progress: called as ``progress(done, total, layer_name)`` after each candidate.

    Returns:
        A :class:`SensitivityReport`, rows most sensitive first.

    Raises:
        RequestError: bad targets, precisions or metric, no batches, or no candidate that the
            tried precision changes.
    """
    if not isinstance(sim, QuantizationSimModel):
        raise TypeError(f"analyze_sensitivity needs a mixprec.QuantizationSimModel, got {type(sim).__name__}")
    if param is None and activation is None:
        raise RequestError(
            "analyze_sensitivity needs a precision to try: param={'weight': 'int4'} and/or activation"
        )
    batches = list(batches)
    metric_ = make_metric(metric, higher_is_better)
    tried = describe_tried(activation, param)
    timings: dict[str, float] = {}
    began = start = clock()
    candidates = plan_changes(sim, expand_targets(sim, targets), activation, param, layers)
    if not candidates:
        raise RequestError(f"targets {targets!r}: trying {tried} changes no quantizer of any of them")
    timings["plan_s"] = clock() - start
    session = Session(sim, batches, metric_)
    sweep = _Sweep(session, candidates, fast)
    try:
        start = clock()
        session.observe_float(candidates, calibrate)  # every rank runs it, even with no batches of its own
        timings["float_pass_s"] = clock() - start
        if calibrate:
            start = clock()
            session.set_baseline_encodings()
            timings["baseline_encodings_s"] = clock() - start
        else:
            _check_encodings(sim)
        stats, local = sweep.run(timings, progress)
    finally:
        if calibrate:
            session.restore_user_encodings()
    stats = all_reduce_sum(torch.cat([stats, local], dim=1))
    width = stats.shape[1] - 2
    timings["total_s"] = clock() - began
    report = build_report(
        candidates, stats[:, :width], stats[:, width:], metric_, tried, timings, sweep.counts, session.macs
    )
    report._session = session
    report._settings = {"calibrate": calibrate, "activation": activation, "param": param, "layers": layers}
    return report


def describe_tried(activation: Any, param: dict[str, Any] | None) -> str:
    parts = []
    try:
        if activation is not None:
            parts.append(f"activation {Precision.parse(activation).name}")
        for name, value in (param or {}).items():
            parts.append(f"{name} {ParamSpec.parse(value)}")
    except (ValueError, TypeError) as exc:
        raise RequestError(f"the precision to try is not valid: {exc}") from exc
    return ", ".join(parts)


def _check_encodings(sim: QuantizationSimModel) -> None:
    for _, q in sim.quantizers():
        if q.needs_encoding and not q.is_initialized():
            raise EncodingNotComputedError(
                f"calibrate=False keeps the sim's encodings, but {q.label!r} has none; call "
                "sim.compute_encodings first or pass calibrate=True"
            )


class _Sweep:
    """The baseline, the recorded forwards, and one (replayed) forward per candidate and batch."""

    def __init__(self, session: Session, candidates: list[Candidate], fast: bool) -> None:
        self.s = session
        self.candidates = candidates
        self.fast = fast
        self.tapes: list[Tape] = []
        self.probe: tuple[Tape, Any] | None = None  # one recorded item for the check, see _verify
        self.cut_names: dict[nn.Module, str] = {}
        self.counts = {"candidates": len(candidates), "replayed": 0, "full": 0, "fallbacks": 0}

    def run(self, timings: dict[str, float], progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
        s, n = self.s, len(self.candidates)
        start = clock()
        with torch.no_grad():
            if self.fast:
                _warm_up(s.sim.model, s.batches[0]) if s.batches else None
                timings["warm_up_s"] = clock() - start
                start = clock()
                baseline = self._record()  # the baseline forwards, recorded
                timings["baseline_and_record_s"] = clock() - start
                self.counts["snapshot_mb"] = round(sum(t.nbytes() for t in self.tapes) / 2**20, 1)
                start = clock()
                self.probe = self._record_probe()
                timings["verify_s"] = clock() - start
            else:
                baseline = [run_batch(s.sim.model, b) for b in s.batches]
                timings["baseline_s"] = clock() - start
        base_stats = _sum((s.score(i, out) for i, out in enumerate(baseline)), s.metric)
        del baseline
        cuts = [self._cut(c) for c in self.candidates]
        order = sorted(range(n), key=lambda i: -1 if cuts[i] is None else cuts[i][1], reverse=True)
        with_cut = [i for i in order if cuts[i] is not None]
        verify = with_cut[len(with_cut) // 2] if with_cut else None
        width = base_stats.numel()
        stats = torch.zeros(n + 1, width, dtype=torch.float64)
        local = torch.zeros(n + 1, 2, dtype=torch.float64)
        stats[n] = base_stats
        for key in _CANDIDATE_TIMINGS:
            timings[key] = 0.0
        checked = timings.get("verify_s", 0.0)
        start = clock()
        for done, i in enumerate(order, 1):
            stats[i], local[i] = self._candidate(self.candidates[i], cuts[i], verify == i, timings)
            if progress is not None:
                progress(done, n, self.candidates[i].name)
        # the check's forwards are counted in verify_s, not in the candidates' time
        timings["sweep_s"] = clock() - start - (timings.get("verify_s", 0.0) - checked)
        self.tapes = []
        self.probe = None
        return stats, local

    def _record(self) -> list[Any]:
        names = {}
        for c in self.candidates:
            for m in c.cut_modules:
                names[m] = self.s.sim.module_name(m)
        self.cut_names = names
        outputs = []
        for batch in self.s.batches:
            tape = Tape(names)
            outputs.append(tape.record(lambda batch=batch: run_batch(self.s.sim.model, batch)))
            self.tapes.append(tape)
        return outputs

    def _cut(self, c: Candidate) -> tuple[str, int] | None:
        if not self.fast or not c.cut_modules or not self.tapes:
            return None
        names = [self.s.sim.module_name(m) for m in c.cut_modules]
        if any(name not in t.cut_at for t in self.tapes for name in names):
            return None  # a module that did not run on some batch: nothing to reuse there
        tape = self.tapes[0]
        name = min(names, key=lambda n: tape.cut_at[n])
        return name, tape.cut_at[name]

    def _candidate(
        self, c: Candidate, cut: tuple[str, int] | None, verify: bool, timings: dict[str, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s
        mark = clock()
        saved = s.apply(c.changes)
        local = None
        total = None
        try:
            mark = _lap(timings, "candidates_apply_s", mark)
            if verify and cut is not None:
                with torch.no_grad():  # before this candidate's forwards, which it may switch to full
                    self._verify(c, cut)
                mark = _lap(timings, "verify_s", mark)
            local = _LocalError(s, c)
            with torch.no_grad():
                for b, batch in enumerate(s.batches):
                    local.start(b)
                    out = self._forward(b, batch, cut, lambda b=b: local.start(b))
                    local.commit()
                    mark = _lap(timings, "candidates_forward_s", mark)
                    stats = s.score(b, out)
                    total = stats if total is None else total + stats
                    mark = _lap(timings, "candidates_score_s", mark)
        finally:
            if local is not None:
                local.close()
            s.revert(c.changes, saved)
            _lap(timings, "candidates_revert_s", mark)
        return _sum([] if total is None else [total], s.metric), local.total

    def _forward(self, b: int, batch: Any, cut: tuple[str, int] | None, restart: Callable[[], None]) -> Any:
        model = self.s.sim.model
        if cut is not None and self.fast:
            try:
                out = self.tapes[b].replay(cut[0], lambda: run_batch(model, batch))
                self.counts["replayed"] += 1
                return out
            except Diverged as exc:
                log.info("sensitivity: replay diverged (%s); running the forward in full", exc)
                self.counts["fallbacks"] += 1
                restart()  # the hooks of the abandoned forward counted nothing that stays
        self.counts["full"] += 1
        return run_batch(model, batch)

    def _record_probe(self) -> tuple[Tape, Any] | None:
        """A recorded forward on the first item of the first batch, for :meth:`_verify`; None when
        the batch cannot be cut smaller (the check then uses the first batch itself)."""
        if not self.s.batches:
            return None
        batch = self.s.batches[0]
        item = _first_item(batch)
        if _numel(item) >= _numel(batch):
            return None
        tape = Tape(self.cut_names)
        try:
            tape.record(lambda: run_batch(self.s.sim.model, item))
        except Exception:  # noqa: BLE001 (a model that needs the whole batch: check on the batch)
            return None
        return tape, item

    def _verify(self, c: Candidate, cut: tuple[str, int]) -> None:
        """Once per sweep: a replayed forward must equal the full one, or no forward is replayed.

        The check replays ``c`` from its cut and runs it in full on one item of the first batch
        when the batch can be cut (the same replay machinery, at an eighth of the cost for 8
        items), else on the first batch.
        """
        model = self.s.sim.model
        tape, batch = self.tapes[0], self.s.batches[0]
        if self.probe is not None and cut[0] in self.probe[0].cut_at:
            tape, batch = self.probe
        try:
            replayed = tape.replay(cut[0], lambda: run_batch(model, batch))
        except Diverged as exc:
            log.info(
                "sensitivity: the check's replay of %s diverged (%s); its forwards fall back", c.name, exc
            )
            return
        if not _equal(run_batch(model, batch), replayed):
            log.warning(
                "sensitivity: the replayed forward of %s differs from the full forward; running every "
                "candidate in full (slower, same results)",
                c.name,
            )
            self.fast = False
        self.counts["verified"] = c.name


_CANDIDATE_TIMINGS = (
    "candidates_apply_s", "candidates_forward_s", "candidates_score_s", "candidates_revert_s"
)  # fmt: skip


def _lap(timings: dict[str, float], key: str, since: float) -> float:
    now = clock()
    timings[key] = timings.get(key, 0.0) + now - since
    return now


def _numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, dict):
        return sum(_numel(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_numel(v) for v in value)
    return 0


class _LocalError:
    """SQNR statistics of a candidate module's output against its float output, per batch."""

    def __init__(self, session: Session, c: Candidate) -> None:
        self.total = torch.zeros(2, dtype=torch.float64)
        self.refs = session.module_outputs.get(c.name)
        self.pending = torch.zeros(2, dtype=torch.float64)
        self.calls = 0
        self.batch = 0
        self.handle = None
        if c.module is not None and self.refs is not None:
            self.handle = c.module.register_forward_hook(unseen(self._hook))

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        refs = self.refs[self.batch]
        if self.calls < len(refs):
            self.pending += sqnr_stats(list(float_leaves(output)), refs[self.calls])
        self.calls += 1

    def start(self, b: int) -> None:
        self.batch, self.calls = b, 0
        self.pending = torch.zeros(2, dtype=torch.float64)

    def commit(self) -> None:
        self.total += self.pending

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def _sum(stats: Iterable[torch.Tensor], metric: Any) -> torch.Tensor:
    total = None
    for s in stats:
        total = s if total is None else total + s
    # a rank without batches still takes part in the sum over ranks
    return torch.zeros(metric.width, dtype=torch.float64) if total is None else total


def _warm_up(model: nn.Module, batch: Any) -> None:
    """One forward on the first item of a batch: quantized weights are computed and cached then,
    so that the recorded forward and the replays see the same calls (the cache does not depend
    on the input). A batch that cannot be cut to one item runs whole."""
    try:
        run_batch(model, _first_item(batch))
    except Exception:  # noqa: BLE001 (e.g. a model that needs the whole batch: run it whole)
        run_batch(model, batch)


def _first_item(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:1] if batch.dim() else batch
    if isinstance(batch, dict):
        return {k: _first_item(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_first_item(v) for v in batch)
    return batch


def _equal(a: Any, b: Any) -> bool:
    left, right = list(float_leaves(a)), list(float_leaves(b))
    return len(left) == len(right) and all(torch.equal(x, y) for x, y in zip(left, right, strict=True))

"""The state a sweep shares between its passes: batches, float references, observed statistics.

Encodings policy (docs/sensitivity.md): one observing pass over the batches with every quantizer
passing values through (the float model) records, for every activation quantizer, the statistics
of the float values that reach it. Baseline encodings come from those statistics (parameters:
from the parameter itself), as ``compute_encodings`` on the same batches would set them. A
changed layer's new quantizers get their encodings from the same statistics of their place and
the sim's quant scheme, so a row differs from the baseline only in the tried precision.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixprec.analysis.candidates import Candidate, Change, apply_changes, revert
from mixprec.analysis.metrics import Metric, float_leaves
from mixprec.analysis.replay import unseen
from mixprec.errors import CalibrationError
from mixprec.quant.quantizers import QuantizerBase
from mixprec.quantsim import QuantizationSimModel
from mixprec.sim.distributed import is_distributed, run_calibration_pass
from mixprec.sim.placement import Place, PlaceKind

log = logging.getLogger(__name__)


def run_batch(model: nn.Module, batch: Any) -> Any:
    """One forward, batches as ``forward_batches`` takes them (dict: keywords, tuple: positional)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (unchanged without a process group of more than one rank)."""
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class Session:
    """Float references and statistics for one sim and one list of batches."""

    def __init__(self, sim: QuantizationSimModel, batches: list[Any], metric: Metric) -> None:
        self.sim = sim
        self.batches = batches
        self.metric = metric
        self.float_outputs: list[Any] = []
        self.module_outputs: dict[str, list[list[torch.Tensor]]] = {}  # candidate -> batch -> calls
        self.macs: dict[str, int] = {}
        self.observers: dict[Place, Any] = {}
        self.user_encodings: list[tuple[Place, QuantizerBase, Any]] = []

    # the float pass ---------------------------------------------------------------------
    def observe_float(self, candidates: list[Candidate], calibrate: bool = True) -> None:
        """Run every batch through the float model (quantizers passing values through), keeping
        the outputs, candidate modules' outputs, MACs, and the statistics the encodings need: of
        every activation quantizer for the baseline (``calibrate``), else only of the places the
        candidates change (the baseline keeps the sim's encodings)."""
        sim = self.sim
        entries = list(sim.quantizers())
        self.user_encodings = [(p, q, _encoding(q)) for p, q in entries]
        changed = {ch.place for c in candidates for ch in c.changes}
        for place, q in entries:
            wanted = calibrate or place in changed
            q.begin_calibration(sim.quant_scheme, collect=place.kind is not PlaceKind.PARAM and wanted)
        handles = self._float_hooks(candidates)
        try:
            with torch.no_grad():
                run_calibration_pass(sim, entries, self._float_callback, None)
            self.observers = {
                place: q.observer
                for place, q in entries
                if place.kind is not PlaceKind.PARAM and q.observer is not None
            }
        finally:
            for h in handles:
                h.remove()
            for _, q in entries:
                q.abort_calibration()

    def _float_callback(self, model: nn.Module, _: Any) -> None:
        for batch in self.batches:
            for calls in self.module_outputs.values():
                calls.append([])
            self.float_outputs.append(run_batch(model, batch))

    def _float_hooks(self, candidates: list[Candidate]) -> list[Any]:
        handles = []
        for c in candidates:
            if c.module is None:
                continue
            self.module_outputs[c.name] = []

            @unseen
            def keep(module: nn.Module, args: Any, output: Any, name: str = c.name) -> None:
                self.module_outputs[name][-1].append([t.detach() for t in float_leaves(output)])

            handles.append(c.module.register_forward_hook(keep))
            for sub in c.module.modules():
                weight = getattr(sub, "weight", None)
                if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and weight is not None:

                    @unseen
                    def count(module: nn.Module, args: Any, output: Any, name: str = c.name) -> None:
                        if len(self.float_outputs) == 0 and isinstance(output, torch.Tensor) and output.dim():
                            per_item = output.numel() // output.shape[0]
                            self.macs[name] = self.macs.get(name, 0) + per_item * module.weight[0].numel()

                    handles.append(sub.register_forward_hook(count))
        return handles

    # encodings --------------------------------------------------------------------------
    def set_baseline_encodings(self) -> None:
        """Every quantizer's encoding from the observed statistics, as compute_encodings would set it
        (an encoding frozen with ``allow_overwrite(False)`` stays as it is, as there)."""
        for place, q in self.sim.quantizers():
            if q.is_overwrite_allowed():
                self.encode(place, q)

    def restore_user_encodings(self) -> None:
        """The encodings the sim had before the sweep, by place (a reverted place has a new quantizer)."""
        for place, _, encoding in self.user_encodings:
            q = self.sim.quantizer_at(place)
            if q is None:
                continue
            if encoding is not None:
                q.set_encoding(encoding)
            elif q.needs_encoding and q.is_initialized():
                q.reset_encoding()

    def encode(self, place: Place, q: QuantizerBase) -> bool:
        """Set ``q``'s encoding from its place's statistics; False when none were observed there."""
        if not q.needs_encoding:
            return True
        scheme = self.sim.quant_scheme
        if place.kind is PlaceKind.PARAM:
            q.calibrate_tensor(self.sim.param_tensor(place).detach(), scheme)
            return True
        observer = self.observers.get(place)
        if observer is None or observer.granularity != q.granularity:
            return False
        q.begin_calibration(scheme)
        q.observer = observer
        q.end_calibration()
        return True

    def apply(self, changes: list[Change]) -> dict[Place, Any]:
        """Put ``changes`` in place with encodings by the policy above; returns the replaced
        quantizers' encodings for :meth:`revert`."""
        saved = {ch.place: _encoding_at(self.sim, ch.place) for ch in changes}
        missing = [(p, q) for p, q in apply_changes(self.sim, changes) if not self.encode(p, q)]
        if missing:
            self._observe_new(missing)
        return saved

    def revert(self, changes: list[Change], saved: dict[Place, Any]) -> None:
        revert(self.sim, changes, saved)

    def _observe_new(self, missing: list[tuple[Place, QuantizerBase]]) -> None:
        """New quantizers at places the float pass did not observe: one more float pass for them."""
        sim = self.sim
        entries = list(sim.quantizers())
        new = {id(q) for _, q in missing}
        for _, q in entries:
            q.begin_calibration(sim.quant_scheme, collect=id(q) in new)
        try:
            with torch.no_grad():
                run_calibration_pass(sim, entries, lambda m, _: [run_batch(m, b) for b in self.batches], None)
            observed = {id(q): q.observer for _, q in entries if id(q) in new}
        finally:
            for _, q in entries:
                q.abort_calibration()
        for place, q in missing:
            self.observers[place] = observed[id(q)]
            if not self.encode(place, q):
                raise CalibrationError(f"sensitivity: no statistics for {sim.describe(place)}")

    # scoring ----------------------------------------------------------------------------
    def score(self, batch_index: int, output: Any) -> torch.Tensor:
        return self.metric.stats(output, self.float_outputs[batch_index])


def _encoding(q: QuantizerBase) -> Any:
    return q.get_encoding() if q.needs_encoding and q.is_initialized() else None


def _encoding_at(sim: QuantizationSimModel, place: Place) -> Any:
    q = sim.quantizer_at(place)
    return None if q is None else _encoding(q)

"""Metrics of a sensitivity sweep, as additive statistics so that batches and ranks combine by summing."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mixprec.errors import RequestError


def float_leaves(value: Any) -> Iterator[torch.Tensor]:
    """The floating-point tensors of a (nested) model output: tuples, lists, dicts, ModelOutputs."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from float_leaves(v)
    elif isinstance(value, dict):  # transformers' ModelOutput is an OrderedDict
        for v in value.values():
            yield from float_leaves(v)


def sqnr_stats(output: Any, reference: Any) -> torch.Tensor:
    """``[signal power sum, noise power sum]`` of ``output`` against ``reference`` (float64)."""
    signal = torch.zeros((), dtype=torch.float64)
    noise = torch.zeros((), dtype=torch.float64)
    for out, ref in zip(float_leaves(output), float_leaves(reference), strict=True):
        ref = ref.detach()
        # sums accumulate in float64 without a float64 copy of each (large) activation
        signal += ref.square().sum(dtype=torch.float64).cpu()
        noise += (out.detach() - ref).square_().sum(dtype=torch.float64).cpu()  # in place: one temporary
    return torch.stack([signal, noise])


def sqnr_db(stats: torch.Tensor) -> float:
    """10·log10(signal / noise); +inf for an exact match."""
    signal, noise = float(stats[0]), float(stats[1])
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass(frozen=True)
class Metric:
    """How a sweep scores a forward: per-batch additive statistics, then one value.

    ``higher_is_better`` orders the rows: the most sensitive layer is the one whose change moves
    the metric furthest in the bad direction.
    """

    name: str
    unit: str
    higher_is_better: bool
    stats: Callable[[Any, Any], torch.Tensor]  # (output, float output) -> 1-D float64 tensor
    value: Callable[[torch.Tensor], float]  # summed stats -> metric
    width: int = 2  # length of the stats tensor

    def badness(self, delta: float) -> float:
        """How much worse a delta is (positive = worse than the baseline)."""
        return -delta if self.higher_is_better else delta


OUTPUT_SQNR = Metric("output SQNR vs float", "dB", True, sqnr_stats, sqnr_db)


def make_metric(metric: Any, higher_is_better: bool = True) -> Metric:
    """``None`` (output SQNR vs the float model), a :class:`Metric`, or a callable
    ``fn(output, float_output) -> float`` averaged over batches (weighted by batch count)."""
    if metric is None:
        return OUTPUT_SQNR
    if isinstance(metric, Metric):
        return metric
    if not callable(metric):
        raise RequestError(
            f"metric must be None (output SQNR), a mixprec Metric or a callable fn(output, float_output) -> float, "
            f"got {metric!r}"
        )

    def stats(output: Any, reference: Any) -> torch.Tensor:
        value = metric(output, reference)
        try:
            value = float(value)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"metric {_name(metric)} must return a number, got {value!r}") from exc
        return torch.tensor([value, 1.0], dtype=torch.float64)

    def value(total: torch.Tensor) -> float:
        return float(total[0] / total[1]) if float(total[1]) else math.nan

    return Metric(_name(metric), "", higher_is_better, stats, value)


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__

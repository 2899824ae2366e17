"""Calibration callbacks over datasets: positional, keyword (token) and tensor batches, with progress."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn


def _run(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)  # token batches: input_ids, attention_mask, ...
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def forward_batches(
    batches: Iterable[Any],
    *,
    progress: bool = True,
    description: str = "calibrating",
    total: int | None = None,
) -> Callable[[nn.Module, Any], None]:
    """A ``compute_encodings`` callback that runs the model on every batch.

    A batch that is a dict is passed as keyword inputs (``input_ids``, ``attention_mask``, ...),
    a tuple/list as positional inputs, anything else as the single input.

    Example:
        >>> sim.compute_encodings(forward_batches(token_batches), None)
    """
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]

    def callback(model: nn.Module, _: Any) -> None:
        if not progress:
            for batch in batches:
                _run(model, batch)
            return
        try:
            from rich.progress import Progress
        except ImportError:
            for i, batch in enumerate(batches, 1):
                _run(model, batch)
                sys.stderr.write(f"\r{description}: {i}/{total or '?'}")
            sys.stderr.write("\n")
            return
        with Progress(transient=False) as bar:
            task = bar.add_task(description, total=total)
            for batch in batches:
                _run(model, batch)
                bar.advance(task)

    return callback

"""Keep the user's model state as it was around passes the library runs for its own purposes.

Capture and calibration run the model, and a model in train mode updates state as it runs
(BatchNorm running statistics, ``num_batches_tracked``). Those passes are not training: with
``in_place=True`` the model is the user's own, and a copy should equal its float model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from mixprec.errors import CaptureError
from mixprec.quant.quantizers import QuantizerBase
from mixprec.sim.runtime import original_class


@contextlib.contextmanager
def buffers_restored(model: nn.Module) -> Iterator[None]:
    """Run the block, then put every buffer of ``model`` back to its value before it.

    The model keeps its mode, so the pass takes the same path as training later will (a capture
    in eval mode could record another control flow than the train-mode forward).
    """
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                if buffer.shape == value.shape:
                    buffer.copy_(value)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with every module of ``model`` in eval mode, then restore each one's flag.

    Calibration observes the values inference will see: BatchNorm normalizing with its running
    statistics (and not updating them), dropout off. AIMET calibrates in eval mode as well.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def refuse_sim_model(model: nn.Module) -> None:
    """A sim's model holds quantizers and runtime hooks: capturing it again would quantize twice,
    and with ``in_place=True`` would rewrite the first sim's modules under it."""
    if any(hasattr(m, "_mixprec_runtime") or isinstance(m, QuantizerBase) for m in model.modules()):
        raise CaptureError(
            f"{original_class(model).__name__} is already the model of a QuantizationSimModel (it holds "
            "mixprec quantizers); build the new sim from the float model instead, or keep using the first "
            "sim (its quantizers can be changed with MixedPrecisionConfigurator)"
        )

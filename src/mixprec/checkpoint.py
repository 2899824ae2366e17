"""``save_checkpoint`` / ``load_checkpoint``: a whole sim (model, quantizers, encodings, config)
in one file, as the reference's functions of the same names do (it pickles the sim)."""

from __future__ import annotations

import os

import torch

from mixprec.errors import MixprecError
from mixprec.quantsim import QuantizationSimModel

# Plain pickling is enough: the sim's modules keep their classes (instance forwards and hooks are
# picklable objects, the nn.Sequential root view pickles as the user's class) and call sites are
# keyed by module names, not code objects (docs/capture.md).


def save_checkpoint(quant_sim_model: QuantizationSimModel, file_path: str | os.PathLike) -> None:
    """Save ``quant_sim_model`` to ``file_path`` (torch's pickle format), e.g. to resume QAT."""
    if not isinstance(quant_sim_model, QuantizationSimModel):
        raise TypeError(f"save_checkpoint needs a QuantizationSimModel, got {type(quant_sim_model).__name__}")
    torch.save(quant_sim_model, file_path)


def load_checkpoint(file_path: str | os.PathLike) -> QuantizationSimModel:
    """The sim saved by :func:`save_checkpoint`, on the devices it was saved from.

    Loading unpickles arbitrary objects (the model's own classes): load only files you trust.

    Raises:
        MixprecError: the file holds something other than a sim.
    """
    sim = torch.load(file_path, weights_only=False)
    if not isinstance(sim, QuantizationSimModel):
        raise MixprecError(f"{file_path} holds a {type(sim).__name__}, not a QuantizationSimModel checkpoint")
    return sim

"""``save_checkpoint`` / ``load_checkpoint``: a whole sim (model, quantizers, encodings, config)
in one file, as the reference's functions of the same names do (it pickles the sim)."""

from __future__ import annotations

import copyreg
import marshal
import os
import pickle
import types

import torch

from mixprec.errors import MixprecError
from mixprec.quantsim import QuantizationSimModel


def _reduce_code(code: types.CodeType) -> tuple:
    return marshal.loads, (marshal.dumps(code),)


class _Pickler(pickle.Pickler):
    # The sim keys functional call sites by code object (mixprec.capture.callsite). marshal
    # round-trips them to equal, equally hashed code objects, so the keys match the live
    # code after loading (same Python version and source).
    dispatch_table = {**copyreg.dispatch_table, types.CodeType: _reduce_code}


# what torch.save(pickle_module=...) needs: pickle with the code reducer
_PICKLE = types.ModuleType("mixprec_checkpoint_pickle")
_PICKLE.__dict__.update(Pickler=_Pickler, Unpickler=pickle.Unpickler, load=pickle.load, dump=pickle.dump)


def save_checkpoint(quant_sim_model: QuantizationSimModel, file_path: str | os.PathLike) -> None:
    """Save ``quant_sim_model`` to ``file_path`` (torch's pickle format), e.g. to resume QAT."""
    if not isinstance(quant_sim_model, QuantizationSimModel):
        raise TypeError(f"save_checkpoint needs a QuantizationSimModel, got {type(quant_sim_model).__name__}")
    torch.save(quant_sim_model, file_path, pickle_module=_PICKLE)


def load_checkpoint(file_path: str | os.PathLike) -> QuantizationSimModel:
    """The sim saved by :func:`save_checkpoint`, on the devices it was saved from.

    Loading unpickles arbitrary objects (the model's own classes): load only files you trust.
    Load with the Python version and model source that saved it (call sites are code objects).

    Raises:
        MixprecError: the file holds something other than a sim.
    """
    sim = torch.load(file_path, weights_only=False)
    if not isinstance(sim, QuantizationSimModel):
        raise MixprecError(f"{file_path} holds a {type(sim).__name__}, not a QuantizationSimModel checkpoint")
    return sim

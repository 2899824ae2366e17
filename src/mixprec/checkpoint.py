"""``save_checkpoint`` / ``load_checkpoint``: a whole sim (model, quantizers, encodings, config)
in one file, as the reference's functions of the same names do (it pickles the sim)."""

from __future__ import annotations

import marshal
import os
import pickle
import types

import torch

from mixprec.errors import MixprecError
from mixprec.quantsim import QuantizationSimModel
from mixprec.sim.runtime import QuantizedLeaf, QuantizedRoot, quantized_class


def _rebuild_quantized_class(cls: type, leaf: bool, root: bool) -> type:
    return quantized_class(cls, leaf=leaf, root=root)


class _Pickler(pickle.Pickler):
    """Pickle with two additions, so a checkpoint loads in a new process:

    * the sim's classes made at run time (``QuantizedSmallCNN``, mixprec.sim.runtime) are saved
      as the recipe that makes them again;
    * functional call sites are keyed by code object (mixprec.capture.callsite); marshal
      round-trips them to equal, equally hashed code objects, so the keys match the live code
      after loading (same Python version and model source).
    """

    def reducer_override(self, obj: object) -> object:
        if isinstance(obj, type) and "_mixprec_original_class" in obj.__dict__:
            leaf, root = issubclass(obj, QuantizedLeaf), issubclass(obj, QuantizedRoot)
            return _rebuild_quantized_class, (obj.__dict__["_mixprec_original_class"], leaf, root)
        if isinstance(obj, types.CodeType):
            return marshal.loads, (marshal.dumps(obj),)
        return NotImplemented


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

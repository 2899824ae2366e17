"""Learnable integer encodings: the ``training_range_learning_with_tf_init`` /
``training_range_learning_with_tf_enhanced_init`` schemes (``QuantScheme.learnable``; see docs/qat.md).

``compute_encodings`` initializes scale and offset as the ``tf`` / ``tf_enhanced`` scheme would;
they are ``nn.Parameter`` s of the quantizer, so ``sim.model.parameters()`` hands them to an
optimizer next to the weights. Gradients are those of LSQ (Esser et al., "Learned Step Size
Quantization", 2020), obtained by autograd through

    x_hat = clamp(round(x / s), o, o + 2**b - 1) * s

with a straight-through estimator for ``round`` (its gradient taken as 1) and the exact
gradient of ``clamp``. That gives, per value:

* ``d x_hat / d x``: 1 inside the grid's range, 0 where clipped (the frozen quantizers' STE);
* ``d x_hat / d s``: ``round(x/s) - x/s`` inside the range (the rounding error: the step grows
  or shrinks to fit values onto the grid), and the clamp bound ``o`` or ``o + 2**b - 1`` where
  clipped (the range widens to take in clipped values, against the rounding error inside);
* ``d x_hat / d o``: 0 inside, ``s`` where clipped (the range shifts toward clipped values).

Why this estimator: it is what the reference's range learning trains (scale and offset through a
straight-through round), it needs no extra state, and the step-size gradient weighs clipping
error against rounding error, which a min/max parametrization with an STE only through ``x``
does not. LSQ also multiplies the step-size gradient by ``1/sqrt(N * Qp)``; we leave that out:
it is a learning-rate choice, Adam-style optimizers normalize per-parameter gradient scale
anyway, and for SGD ``encoding_parameters`` makes a separate parameter group easy.

The offset is a float parameter rounded in the forward pass (again straight through), so the
exported offset is always the integer the forward used. Symmetric grids keep their fixed offset
(``-2**(b-1)``, or 0 for unsigned data): only the scale learns there.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from mixprec.core.granularity import Granularity, PerBlock, PerTensor
from mixprec.errors import EncodingNotComputedError
from mixprec.quant import qmath as qm
from mixprec.quant.quantizers import Encoding, IntQuantizer, QuantizerBase, _check_channels

MIN_SCALE = 1e-12
"""Floor of a learned scale: a step that trains to zero or below would divide by zero."""


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    """``round(t)`` forward, identity gradient backward."""
    return (t.round() - t).detach() + t


class LearnableIntQuantizer(IntQuantizer):
    """An :class:`IntQuantizer` whose ``scale`` and ``offset`` are trainable ``nn.Parameter`` s.

    Same arguments and encoding convention as ``IntQuantizer``. Before an encoding is set the
    parameters are empty; setting one (calibration, ``set_encoding``, ``load_state_dict``) changes
    their data in place, so an optimizer built earlier keeps training the same objects. Freeze the
    encodings with ``q.requires_grad_(False)``.
    """

    def __init__(self, bitwidth: int, symmetric: bool = False, granularity: Granularity | None = None,
                 unsigned_symmetric: bool = True, strict_symmetric: bool = False, label: str = "") -> None:  # fmt: skip
        super().__init__(bitwidth, symmetric, granularity, unsigned_symmetric, strict_symmetric, label)
        del self._buffers["scale"], self._buffers["offset"]
        self.scale = nn.Parameter(torch.empty(0))
        # symmetric grids have a fixed offset; a float parameter either way keeps one storage type
        self.offset = nn.Parameter(torch.empty(0), requires_grad=not symmetric)
        self._refresh()

    def _set_tensor(self, name: str, value: torch.Tensor) -> None:
        param = getattr(self, name)
        param.data = value.detach().to(device=param.device, dtype=param.dtype)

    def _refresh(self) -> None:
        self._by_ndim = {}
        self._base = None  # prepared for inference on demand: optimizer steps change the parameters
        self._uint8 = None  # no fast path in IntQuantizer.forward: the encoding may train
        self._prepared_for: tuple[int, ...] | None = None
        self._ready = self.scale.numel() > 0 and self.offset.shape == self.scale.shape
        # strictness drops the lowest code of signed grids only; symmetric offsets never train,
        # so this holds until the next encoding change (and forward needs no device sync)
        self._strict_lower = (
            self._ready and self._symmetric and self.strict_symmetric and bool((self.offset < 0).any())
        )

    def _offset_code(self) -> torch.Tensor:
        # a symmetric grid's offset is fixed even if someone sets requires_grad on every parameter
        offset = self.offset.detach() if self._symmetric else self.offset
        return _round_ste(offset).clamp(-(2**self.bitwidth - 1), 0)

    def get_encoding(self) -> Encoding:
        if not self._ready:
            raise EncodingNotComputedError(f"{self._where()} has no encoding yet")
        scale = self.scale.detach().clamp_min(MIN_SCALE).clone()
        offset = self._offset_code().detach().long()
        mn, mx = qm.grid_min_max(scale, offset, self.bitwidth)
        return Encoding(
            self._precision, self._granularity, self._symmetric, scale, offset, mn, mx, self.strict_symmetric
        )

    def _inference_params(self, ndim: int) -> qm.QParams:
        """The frozen quantizers' prepared parameters, rebuilt when the encoding changed (an
        optimizer step bumps the parameters' versions): one device sync per change, not per forward."""
        key = (self.scale._version, self.offset._version, self.scale.data_ptr(), self.offset.data_ptr())
        if key != self._prepared_for:
            scale, offset = self.scale.detach().clamp_min(MIN_SCALE), self._offset_code().detach()
            self._base = qm.int_qparams(scale, offset, self.bitwidth, self._strict_lower, as_python=True)
            self._by_ndim = {}
            self._prepared_for = key
        return self._base if isinstance(self._granularity, PerTensor) else self._params_for(ndim)  # type: ignore[return-value]

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        g = self._granularity
        _check_channels(self, x, qm.encoding_shape(g, x.shape))
        xs = qm.split_blocks(x, g) if isinstance(g, PerBlock) else x
        trains = torch.is_grad_enabled() and (
            x.requires_grad or self.scale.requires_grad or self.offset.requires_grad
        )
        if not trains:  # inference: the frozen quantizers' kernels and values
            return qm.fake_quantize_int_prepared(xs, self._inference_params(xs.ndim)).reshape(x.shape)
        scale, offset = self.scale.clamp_min(MIN_SCALE), self._offset_code()
        lo, hi = qm.int_clamp_bounds(offset, self.bitwidth, self._strict_lower)  # differentiable in offset
        if not isinstance(g, PerTensor):
            scale, lo, hi = (qm.view_encoding(t, g, xs.ndim) for t in (scale, lo, hi))
        xc = xs.to(torch.float32 if xs.dtype in (torch.float16, torch.bfloat16) else xs.dtype)
        codes = _round_ste(xc * (1.0 / scale))  # x * (1/s), as the frozen kernels compute it
        # clamp(codes, lo, hi), written so that a code on a bound counts as inside (relu'(0) = 0):
        # torch.clamp/minimum would split that gradient between the code and the bound
        codes = codes + torch.relu(lo - codes) - torch.relu(codes - hi)
        return (codes * scale).to(x.dtype).reshape(x.shape)


def encoding_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The learnable encodings (scales and offsets) inside ``module``, e.g. ``sim.model``.

    Example (SGD with its own learning rate, and no weight decay, for encodings):
        >>> enc = list(encoding_parameters(sim.model))
        >>> ids = {id(p) for p in enc}
        >>> weights = [p for p in sim.model.parameters() if id(p) not in ids]
        >>> opt = torch.optim.SGD([{"params": weights}, {"params": enc, "lr": 1e-4, "weight_decay": 0}], lr=1e-2)
    """
    seen: set[int] = set()
    for m in module.modules():
        if isinstance(m, QuantizerBase):
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

"""The cache of fake-quantized parameters, and how it notices that a parameter changed.

In inference the weights rarely change, so ``q(weight)`` is kept from one forward to the next
(``sim.cache_quantized_weights``; docs/performance.md has what it saves and costs). A cached
result is used only while all of these still hold:

- the same parameter object, at the same storage address, with the same dtype and shape
  (``.data = ...`` and ``load_state_dict`` of a new tensor fail this), and the same version
  counter (optimizer steps, ``copy_``, in-place ops on the parameter itself bump it);
- the quantizer's encoding tensors are the same objects at the same versions (a new encoding,
  learnable encodings after an optimizer step);
- the same **content fingerprint** of the parameter. Edits through ``param.data`` (``.data.mul_(2)``,
  ``.data.copy_(w)``, ``.data[0, 0] = 5``) go to a tensor with a version counter of its own, so
  nothing above sees them; the fingerprint does.

The fingerprint is two sums over the parameter, both recomputed each forward:

- the int32 sum (wrapping, mod ``2**32``) of its bytes read as int32 words: a change of any single
  word changes it (``0 < |d| < 2**32``), so any single edited value is always seen;
- position-weighted float sums: the parameter viewed as 64 rows, each column summed with fixed
  pseudo-random row weights ``b`` in [0.5, 1.5) (and that result folded once more the same way
  when it has more than 1024 sums). Moving values around (a swap, a permuted row, a ``copy_`` of a
  shuffled tensor) changes them unless the moved values agree to about 1e-5 of the weights'
  magnitude (float rounding of sums of 64 terms).

They are one pass each at memory speed, cheaper than fake-quantizing a large weight again (their
cost per forward is in docs/performance.md). Small parameters on the 8-bit per-tensor fast path (see ``MIN_CACHED``) are
instead fake-quantized every forward: cheaper than the fingerprint's fixed cost of a few torch
calls, and never stale. ``sim.clear_weight_cache()`` or ``sim.cache_quantized_weights = False`` remain for
anything else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MIN_CACHED = 2**17
"""Parameters with fewer elements whose quantizer takes the 8-bit per-tensor fast path
(``IntQuantizer._uint8``) are not cached: below this size the fingerprint's few torch calls cost
about as much as fake-quantizing again on CPU. Other quantizers (per channel, per block, 16-bit, fp8)
cost several torch calls even on small tensors, so their parameters are cached at any size."""

_KEPT = 1024  # sums kept per parameter: one fold up to 65536 elements, two above
_WEIGHTS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _row_weights(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The fixed weights ``b`` of the 64 rows (the same in every process)."""
    key = (device, dtype)
    w = _WEIGHTS.get(key)
    if w is None:
        g = torch.Generator().manual_seed(0x6D70)
        w = _WEIGHTS.setdefault(
            key, (torch.rand(64, generator=g, dtype=torch.float64) + 0.5).to(device, dtype)
        )
    return w


def _fold(values: torch.Tensor) -> torch.Tensor:
    """``values`` (1-D) as 64 rows, each column's weighted sum over the rows (a tail of fewer than
    64 values is kept, weighted)."""
    b = _row_weights(values.device, values.dtype)
    n = values.numel()
    head = n - n % 64
    if head == n:
        # [64, n / 64] transposed: the product reads memory once, in order
        return torch.mv(values.view(64, -1).t(), b)
    tail = values[head:] * b[: n - head]
    return torch.cat((torch.mv(values[:head].view(64, -1).t(), b), tail)) if head else tail


def fingerprint(t: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(int32 sum of the words, position-weighted float sums)`` of ``t`` (see the module docstring)."""
    flat = t.detach().view(-1) if t.is_contiguous() else t.detach().reshape(-1)
    try:
        words = flat.view(torch.int32) if flat.numel() * flat.element_size() % 4 == 0 else None
    except RuntimeError:  # a storage offset that int32 words cannot start at
        words = None
    if words is None:
        words = flat.view(torch.uint8).to(torch.int32)
    total = int(words.sum(dtype=torch.int32).item())
    values = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    sums = _fold(values)
    return total, sums if sums.numel() <= _KEPT else _fold(sums)


def _same(a: tuple[int, torch.Tensor], b: tuple[int, torch.Tensor]) -> bool:
    # NaN weights never compare equal: such a parameter is fake-quantized again each forward
    return a[0] == b[0] and torch.equal(a[1], b[1])


class _Entry:
    __slots__ = ("alias", "buffers", "checked_in", "fingerprint", "param", "q", "result", "states", "version")

    def __init__(
        self,
        q: nn.Module,
        param: torch.Tensor,
        buffers: tuple,
        fp: tuple[int, torch.Tensor],
        result: torch.Tensor,
    ) -> None:
        self.q = q
        self.param = param
        # an alias keeps the storage alive, so a new storage cannot take this address
        self.alias = param.detach()
        self.version = param._version
        self.buffers = buffers
        self.states = _states(buffers)
        self.fingerprint = fp
        self.result = result
        self.checked_in: object = None  # the forward whose fingerprint check last passed

    def keys_match(self, q: nn.Module, param: torch.Tensor, buffers: tuple) -> bool:
        alias = self.alias
        return (
            self.q is q
            and self.param is param
            and self.version == param._version
            and alias.data_ptr() == param.data_ptr()
            and alias.dtype == param.dtype
            and alias.shape == param.shape
            and len(self.buffers) == len(buffers)
            and all(a is b for a, b in zip(self.buffers, buffers, strict=True))
            and self.states == _states(buffers)
        )


def _states(buffers: tuple) -> tuple:
    return tuple((b._version, b.data_ptr()) for b in buffers if b is not None)


def _is_fake(t: torch.Tensor) -> bool:
    try:
        t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return True
    return t.device.type == "meta"


class WeightCache:
    """``q(param)`` per quantizer, reused while the checks in the module docstring hold."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}

    def get(
        self,
        q: nn.Module,
        param: torch.Tensor,
        apply: Callable[[nn.Module, torch.Tensor], Any],
        forward: object = None,
    ) -> torch.Tensor:
        """``q(param)``, from the cache when it is still valid. ``forward`` identifies the forward
        in progress (None: unknown): a parameter read twice in one forward (tied embeddings) is
        fingerprinted once."""
        if (param.numel() < MIN_CACHED and q.__dict__.get("_uint8") is not None) or _is_fake(param):
            return apply(q, param)
        # learnable encodings (mixprec.quant.learnable) are parameters, changed by optimizer steps
        # in place and by `.data =` assignments: identity, version and address key them
        buffers = (*q._buffers.values(), *q._parameters.values())
        entry = self._entries.get(id(q))
        if entry is not None and entry.keys_match(q, param, buffers):
            if forward is not None and entry.checked_in is forward:
                return entry.result
            fp = fingerprint(param)
            if _same(fp, entry.fingerprint):
                entry.checked_in = forward
                return entry.result
        else:
            fp = fingerprint(param)
        result = apply(q, param)
        entry = self._entries[id(q)] = _Entry(q, param, buffers, fp, result)
        entry.checked_in = forward
        return result

    def clear(self) -> None:
        self._entries.clear()

    def nbytes(self) -> int:
        """Memory held by the cached results."""
        return sum(e.result.numel() * e.result.element_size() for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

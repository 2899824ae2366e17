"""Prefix replay: run a forward from a cut point on, reusing what the baseline forward computed before it.

A sensitivity candidate changes quantizers of one layer; everything the forward computes before
that layer starts is the same as in the baseline forward. :class:`Tape` records one baseline
forward at the level of torch functions (a ``TorchFunctionMode`` entered outside the sim's own
mode, so it sees every call the sim makes, quantizer math included) and, at each cut point, keeps
a copy of the tensors still alive there. A replay from cut ``P`` then answers calls ``0..P-1``
without computing anything:

* a call that returned one of its own inputs (in-place ops, ``contiguous``) returns that input,
* a call whose output is needed after ``P`` returns a copy of what the baseline had at ``P``,
* small outputs and non-tensors (shapes, ``.item()`` values) return what the baseline returned,
  so Python control flow takes the same path,
* every other output is an uninitialized tensor of the recorded shape (its value is never read).

From ``P`` on every call computes. Any surprise (a call that is not the recorded one, or a
placeholder reaching a computing call) raises :class:`Diverged` and the caller falls back to a
full forward, so a replay is either exact or not used. See docs/sensitivity.md.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

SMALL = 256  # outputs up to this many elements are kept by value (masks, scalars, shapes as tensors)


def unseen(hook: Callable) -> Callable:
    """A module hook whose own torch calls no ``TorchFunctionMode`` sees: the sim's mode would take
    a hook's ``sum`` for a layer of the model, and a recording for a call of the forward."""

    @functools.wraps(hook)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch._C.DisableTorchFunction():
            return hook(*args, **kwargs)

    return run


class Diverged(BaseException):
    """The replayed forward did not follow the recorded one; run this forward in full instead.

    A BaseException, so that a model's or the sim's own ``except Exception``/``except RuntimeError``
    (fallback paths inside the forward) cannot catch it and take another path.
    """


def _tensor_leaves(args: tuple, kwargs: dict | None) -> list[torch.Tensor]:
    """Tensors among the arguments, one level into lists/tuples (``torch.cat([a, b])``)."""
    found = []
    for a in (*args, *(kwargs.values() if kwargs else ())):
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(x for x in a if isinstance(x, torch.Tensor))
    return found


def _as_leaves(out: Any) -> tuple[list[Any], bool] | None:
    """``(leaves, is_sequence)`` for a tensor or a flat list/tuple of tensors; None otherwise."""
    if isinstance(out, torch.Tensor):
        return [out], False
    if isinstance(out, (list, tuple)) and out and any(isinstance(x, torch.Tensor) for x in out):
        return list(out), True
    return None


@dataclass
class _Step:
    func: Callable
    raw: Any = None  # the recorded output when it holds no tensor
    kinds: list[tuple] = field(default_factory=list)  # per output leaf, see Tape._describe
    rebuild: Callable[[list[Any]], Any] | None = None  # leaves -> output (tuple/list/namedtuple)


class Tape:
    """One recorded forward on one batch, with the tensors alive at each cut point.

    Args:
        cuts: module -> cut name; a cut is taken when that module is first called (before it runs).
    """

    def __init__(self, cuts: dict[nn.Module, str]) -> None:
        self.steps: list[_Step] = []
        self.cut_at: dict[str, int] = {}  # cut name -> step index
        self._cuts = cuts
        self._alive: dict[tuple[int, int], weakref.ref] = {}  # (step, leaf) -> tensor
        self._producer: dict[int, tuple[tuple[int, int], weakref.ref]] = {}  # id(tensor) -> key
        self._last_use: dict[tuple[int, int], int] = {}
        self._saved: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}  # key -> (version, copy)
        self.snapshots: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        self._paused = False

    # recording ----------------------------------------------------------------------------
    def record(self, run: Callable[[], Any]) -> Any:
        """Run ``run()`` (one forward) while recording; returns its output."""
        handles = [m.register_forward_pre_hook(self._make_cut(name)) for m, name in self._cuts.items()]
        try:
            with _Recorder(self):
                output = run()
        finally:
            for h in handles:
                h.remove()
        for t in _flat(output):
            key = self._key(t) if isinstance(t, torch.Tensor) else None
            if key is not None:
                self._last_use[key] = len(self.steps)  # part of the result: needed after every cut
        self._prune()
        return output

    def _make_cut(self, name: str) -> Callable:
        @unseen
        def hook(module: nn.Module, args: Any) -> None:
            if name in self.cut_at:
                return
            self.cut_at[name] = len(self.steps)
            saved = {}
            self._paused = True  # the copies below are not calls of the forward
            for key, ref in list(self._alive.items()):
                t = ref()
                if t is None:
                    continue
                previous = self._saved.get(key)
                if previous is None or previous[0] != t._version:
                    previous = (t._version, t.detach().clone())
                    self._saved[key] = previous
                saved[key] = previous[1]
            self._paused = False
            self.snapshots[name] = saved

        return hook

    def _key(self, t: torch.Tensor) -> tuple[int, int] | None:
        entry = self._producer.get(id(t))
        if entry is None or entry[1]() is not t:
            return None
        return entry[0]

    def _observe(self, func: Callable, args: tuple, kwargs: dict | None, out: Any) -> None:
        index = len(self.steps)
        inputs = _tensor_leaves(args, kwargs)
        for t in inputs:
            key = self._key(t)
            if key is not None:
                self._last_use[key] = index
        step = _Step(func)
        shaped = _as_leaves(out)
        if shaped is None:
            step.raw = out
        else:
            leaves, is_seq = shaped
            step.kinds = [self._describe(index, i, leaf, inputs) for i, leaf in enumerate(leaves)]
            if is_seq:
                step.rebuild = _rebuilder(type(out))
        self.steps.append(step)

    def _describe(self, index: int, leaf_index: int, leaf: Any, inputs: list[torch.Tensor]) -> tuple:
        if not isinstance(leaf, torch.Tensor):
            return ("value", leaf)
        for j, t in enumerate(inputs):
            if leaf is t:
                return ("input", j)
        key = (index, leaf_index)
        ref = weakref.ref(leaf)
        self._alive[key] = ref
        self._producer[id(leaf)] = (key, ref)
        value = leaf.detach().clone() if leaf.numel() <= SMALL else None
        return ("tensor", key, tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype, leaf.device, value)

    def _prune(self) -> None:
        """Keep, per cut, only the copies some call at or after the cut reads."""
        for name, saved in self.snapshots.items():
            at = self.cut_at[name]
            self.snapshots[name] = {k: t for k, t in saved.items() if self._last_use.get(k, -1) >= at}
        self._alive.clear()
        self._producer.clear()
        self._saved.clear()

    def nbytes(self) -> int:
        seen: dict[int, int] = {}
        for saved in self.snapshots.values():
            for t in saved.values():
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    # replaying ----------------------------------------------------------------------------
    def replay(self, cut: str, run: Callable[[], Any]) -> Any:
        """Run ``run()`` answering the calls before ``cut`` from the tape.

        Raises:
            Diverged: the forward did not follow the tape (the caller reruns it in full).
        """
        with _Replayer(self, self.cut_at[cut], self.snapshots[cut]):
            return run()


def _flat(value: Any) -> Iterable[Any]:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flat(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flat(v)
    else:
        yield value


class _Recorder(TorchFunctionMode):
    def __init__(self, tape: Tape) -> None:
        super().__init__()
        self.tape = tape

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.tape._paused:
            self.tape._observe(func, args, kwargs, out)
        return out


class _Replayer(TorchFunctionMode):
    def __init__(self, tape: Tape, cut: int, saved: dict[tuple[int, int], torch.Tensor]) -> None:
        super().__init__()
        self.steps = tape.steps
        self.cut = cut
        self.saved = saved
        self.index = 0
        self.placeholders: dict[int, weakref.ref] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        index = self.index
        self.index = index + 1
        if index >= self.cut:
            if self.placeholders:
                for t in _tensor_leaves(args, kwargs):
                    ref = self.placeholders.get(id(t))
                    if ref is not None and ref() is t:
                        raise Diverged(
                            f"call {index} ({_name(func)}) reads a value the replay did not compute"
                        )
            return func(*args, **(kwargs or {}))
        if index >= len(self.steps) or not _same(self.steps[index].func, func):
            expected = _name(self.steps[index].func) if index < len(self.steps) else "the end"
            raise Diverged(f"call {index} is {_name(func)}, the recorded forward had {expected}")
        step = self.steps[index]
        if not step.kinds:
            return step.raw
        inputs = None
        leaves = []
        for kind in step.kinds:
            tag = kind[0]
            if tag == "value":
                v = kind[1]
                leaves.append(v.clone() if isinstance(v, torch.Tensor) else v)
            elif tag == "input":
                if inputs is None:
                    inputs = _tensor_leaves(args, kwargs)
                leaves.append(inputs[kind[1]])
            else:
                saved = self.saved.get(kind[1])
                if saved is None:
                    saved = kind[6]
                if saved is not None:
                    leaves.append(saved.clone())
                else:
                    t = _placeholder(kind[2], kind[3], kind[4], kind[5])
                    self.placeholders[id(t)] = weakref.ref(t)
                    leaves.append(t)
        return leaves[0] if step.rebuild is None else step.rebuild(leaves)


def _placeholder(shape: tuple, stride: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor standing for an output nobody reads (no computation, no copy)."""
    try:
        if dtype in _QUANTIZED:
            return torch._empty_affine_quantized(shape, scale=1.0, zero_point=0, dtype=dtype, device=device)
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    except Exception as exc:  # noqa: BLE001 (any failure here must not reach the model's own handlers)
        raise Diverged(f"cannot stand in for a {dtype} output: {exc}") from None


_QUANTIZED = {torch.quint8, torch.qint8, torch.qint32, torch.quint4x2}


def _same(recorded: Callable, func: Callable) -> bool:
    # property getters arrive as a fresh method-wrapper per access: equal, not identical
    return recorded is func or recorded == func


def _rebuilder(kind: type) -> Callable[[list[Any]], Any]:
    if hasattr(kind, "_fields") and not hasattr(kind, "n_fields"):  # collections.namedtuple
        return lambda xs: kind(*xs)
    return kind  # tuple, list, torch.return_types (structseq) take one sequence


def _name(func: Callable) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)

"""compute_encodings under torch.distributed: each rank observes its shard, statistics are combined.

Every rank runs the same collectives in the same order, so no rank waits on one that has failed:

1. The callback runs with observers that record NaN/inf/shape errors instead of raising, so a rank
   with bad data still finishes its callback (and any collectives the callback itself runs, such
   as DDP's buffer broadcast in forward); an exception of the callback is caught.
2. Status: one SUM all-reduce of a fixed-size ``[world, 6]`` table (failure code, message length,
   quantizer count and signature, shape signature, empty observers). On any failure the lowest
   failing rank broadcasts its message and every rank raises the same ``CalibrationError``.
3. Shapes, only when some rank has an observer that saw no data (or shapes differ): one MAX
   all-reduce.
4. Ranges: one MAX all-reduce of ``[-min, max, k]`` of every observer (MIN is MAX of negated
   values, exact) and of checksums of the quantized parameters.
5. Counts: one SUM all-reduce of ``num_values`` and of every histogram re-binned to the layout of
   the combined range. The result equals one observer having seen the union of the data, bit
   for bit (see ``RangeObserver.state_tensors``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixprec.errors import CalibrationError
from mixprec.quant import ranges as rg
from mixprec.quant.observers import RangeObserver
from mixprec.quant.quantizers import QuantizerBase
from mixprec.sim.placement import Place, PlaceKind
from mixprec.sim.state import PrecisionState

_OK, _FAILED = 0, 1
_BIG = 2**62  # stands in for "nothing here" in MAX reductions of int64 shapes
_MAX_MESSAGE_BYTES = 8192


def is_distributed() -> bool:
    """True inside an initialized ``torch.distributed`` process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def run_calibration_pass(
    sim: PrecisionState,
    entries: Sequence[tuple[Place, QuantizerBase]],
    callback: Callable[[nn.Module, Any], Any],
    args: Any,
) -> None:
    """Run ``callback(sim.model, args)``; in a process group, combine statistics across ranks.

    Call between ``begin_calibration`` and ``end_calibration`` of every quantizer. Without a
    process group (or with one rank) this only runs the callback.

    Raises:
        CalibrationError: on every rank alike, when any rank's callback raised, saw NaN/inf,
            saw no data at all, or when the sims or parameters differ across ranks.
    """
    if not is_distributed():
        callback(sim.model, args)
        return
    collecting = [q for _, q in entries if q.is_calibrating and q.observer is not None]
    for q in collecting:
        q.observer = _DeferringObserver.like(q.observer)  # type: ignore[arg-type]
    failure: Exception | None = None
    try:
        callback(sim.model, args)
    except Exception as exc:  # re-raised on every rank by _exchange_status
        failure = exc
    group = _Group.current()
    observers: list[_DeferringObserver] = [q.observer for q in collecting]  # type: ignore[misc]
    table = _exchange_status(group, observers, failure)
    shapes = _agree_on_shapes(group, observers, table)
    params = [(q, sim.param_tensor(p)) for p, q in entries if p.kind is PlaceKind.PARAM and q.needs_encoding]
    ranges = _reduce_ranges(group, observers, shapes, params)
    # results go where each quantizer lives, so every rank runs the range search on the same device type
    devices = [q.scale.device for q in collecting]
    for q, combined in zip(collecting, _sum_counts(group, observers, shapes, ranges, devices), strict=True):
        q.observer = combined


class _DeferringObserver(RangeObserver):
    """Records the first error of ``observe`` instead of raising it, then ignores later batches.

    A rank raising in the middle of its callback would skip collectives that the other ranks'
    callbacks still run (DDP forward broadcasts buffers) and leave them waiting forever.
    """

    error: str | None = None

    @classmethod
    def like(cls, obs: RangeObserver) -> _DeferringObserver:
        return cls(obs.granularity, histogram=obs.histogram, num_bins=obs.num_bins, label=obs.label)

    def observe(self, x: torch.Tensor) -> None:
        if self.error is not None:
            return
        try:
            super().observe(x)
        except (CalibrationError, ValueError) as exc:  # NaN/inf, or channels changing between batches
            self.error = str(exc)


@dataclass(frozen=True)
class _Group:
    """The default process group and the device its collectives take tensors on."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def current(cls) -> _Group:
        backend = str(dist.get_backend())
        device = torch.device("cpu")
        if backend not in ("gloo", "mpi") and "cpu:" not in backend:
            # NCCL and other accelerator-only backends take tensors on this rank's current device
            accel = getattr(torch, "accelerator", None)  # torch >= 2.6
            if accel is not None and accel.current_accelerator() is not None:
                device = torch.device(accel.current_accelerator().type, accel.current_device_index())
            elif torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        t = t.to(self.device)
        dist.all_reduce(t, op=op)
        return t


def _crc(value: object) -> int:
    return zlib.crc32(repr(value).encode())  # stable across processes, unlike hash()


def _local_failure(observers: Sequence[_DeferringObserver], failure: Exception | None) -> str:
    """This rank's failure message, or "" when it has none."""
    errors = [o.error for o in observers if o.error]
    raised = f"the forward_pass_callback raised {type(failure).__name__}: {failure}" if failure else ""
    if errors:
        more = f" (and {len(errors) - 1} quantizers after it)" if len(errors) > 1 else ""
        # the callback stopped at its exception, so recorded errors happened before it
        return errors[0] + more + (f"; then {raised}" if raised else "")
    if raised:
        return raised
    if observers and all(o.num_values == 0 for o in observers):
        return (
            f"no calibration data reached this rank: none of the {len(observers)} activation quantizers "
            "saw a value; every rank must run at least one batch of its shard of the calibration data"
        )
    return ""


def _exchange_status(
    group: _Group, observers: Sequence[_DeferringObserver], failure: Exception | None
) -> torch.Tensor:
    """All-reduce every rank's status; raise the same error everywhere if any rank failed.

    Returns:
        The ``[world, 6]`` table: failure, message length, quantizer count, quantizer signature,
        shape signature, empty observers.
    """
    message = _local_failure(observers, failure).encode()[:_MAX_MESSAGE_BYTES]
    signature = _crc([(o.label, o.granularity, o.histogram, o.num_bins) for o in observers])
    empty = sum(o.num_values == 0 for o in observers)
    shapes = _crc([o.encoding_shape for o in observers])
    row = [_FAILED if message else _OK, len(message), len(observers), signature, shapes, empty]
    table = torch.zeros(group.world, len(row), dtype=torch.int64)
    table[group.rank] = torch.tensor(row, dtype=torch.int64)
    table = group.all_reduce(table, dist.ReduceOp.SUM).cpu()
    failed = table[:, 0].nonzero().flatten().tolist()
    if failed:
        src = failed[0]
        size = int(table[src, 1])
        mine = torch.tensor(list(message), dtype=torch.uint8)
        buf = (mine if group.rank == src else torch.zeros(size, dtype=torch.uint8)).to(group.device)
        dist.broadcast(buf, src=src)
        text = bytes(buf.cpu().tolist()).decode(errors="replace")
        others = f" (rank{'s' if len(failed) > 2 else ''} {', '.join(map(str, failed[1:]))} failed too)"
        others = others if len(failed) > 1 else ""
        raise CalibrationError(
            f"calibration failed on rank {src} of {group.world}: {text}{others}"
        ) from failure
    if len(set(table[:, 2].tolist())) > 1 or len(set(table[:, 3].tolist())) > 1:
        counts = ", ".join(f"rank {r}: {int(n)}" for r, n in enumerate(table[:, 2]))
        raise CalibrationError(
            "the sims differ across ranks (activation quantizers, their labels, granularity or scheme: "
            f"{counts} quantizers); build the same sim (model, config, precisions, quant_scheme) on every "
            "rank before compute_encodings"
        )
    return table


def _agree_on_shapes(
    group: _Group, observers: Sequence[_DeferringObserver], table: torch.Tensor
) -> list[tuple[int, ...] | None]:
    """Every observer's encoding shape (None: no rank saw data), agreed by all ranks.

    Raises:
        CalibrationError: a quantizer saw different numbers of channels/blocks on two ranks.
    """
    if int(table[:, 5].sum()) == 0 and len(set(table[:, 4].tolist())) == 1:
        return [o.encoding_shape for o in observers]  # every rank saw data everywhere, same shapes
    # per observer: [seen, ndim, d0, d1, -ndim, -d0, -d1]; MAX gives seen-anywhere, max and -min
    packed = torch.tensor([[0, -1, -1, -1, -_BIG, -_BIG, -_BIG]] * len(observers), dtype=torch.int64)
    for i, o in enumerate(observers):
        if o.encoding_shape is not None:
            ndim, dims = len(o.encoding_shape), [*o.encoding_shape, 1, 1][:2]
            packed[i] = torch.tensor([1, ndim, *dims, -ndim, -dims[0], -dims[1]])
    packed = group.all_reduce(packed.reshape(-1), dist.ReduceOp.MAX).cpu().reshape(-1, 7)
    shapes: list[tuple[int, ...] | None] = []
    for o, row in zip(observers, packed.tolist(), strict=True):
        if not row[0]:
            shapes.append(None)
            continue
        if row[1:4] != [-v for v in row[4:7]]:
            raise CalibrationError(
                f"quantizer {o.label!r} saw tensors with different numbers of channels/blocks on different "
                "ranks; calibration batches must have the same layout on every rank"
            )
        shapes.append(tuple(row[2 : 2 + row[1]]))
    return shapes


def _param_fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Per row: the sum of the float32 bit patterns, mod 2**52 (exact in float64).

    Exact integer arithmetic, so equal weights give equal sums whatever the device's reduction
    order; one cheap pass (min/max per row would cost four times as much on CPU).
    """
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    rows = t.detach().float().reshape(t.shape[0] if t.dim() else 1, -1)
    bits = rows.view(torch.int32).sum(dim=1, dtype=torch.int64)
    return bits.bitwise_and_((1 << 52) - 1).double()


def _reduce_ranges(
    group: _Group,
    observers: Sequence[_DeferringObserver],
    shapes: Sequence[tuple[int, ...] | None],
    params: Sequence[tuple[QuantizerBase, torch.Tensor]],
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``(min, max, k floor)`` of every observer over all ranks, on the communication device.

    Raises:
        CalibrationError: no rank saw data at some quantizer, or a quantized parameter differs
            across ranks.
    """
    dev = group.device
    sizes = [math.prod(s) if s is not None else 0 for s in shapes]
    parts = [torch.zeros(1, dtype=torch.float64, device=dev)]  # never reduce an empty tensor
    for o, g in zip(observers, sizes, strict=True):
        fields = 3 if o.histogram else 2
        if o.num_values:
            fields_t = [-o.min, o.max] + ([o.k.double()] if o.histogram else [])  # type: ignore[operator,union-attr]
            parts.append(torch.cat([f.to(dev) for f in fields_t]))
        else:
            parts.append(torch.full((fields * g,), float("-inf"), dtype=torch.float64, device=dev))
    prints = [_param_fingerprint(t).to(dev) for _, t in params]
    parts += [torch.cat([p, -p]) for p in prints]
    reduced = group.all_reduce(torch.cat(parts), dist.ReduceOp.MAX)
    offset = 1
    ranges: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    for o, g, shape in zip(observers, sizes, shapes, strict=True):
        fields = 3 if o.histogram else 2
        seg = reduced[offset : offset + fields * g].view(fields, g)
        offset += fields * g
        if shape is None:
            raise CalibrationError(
                f"no data reached quantizer {o.label!r} on any of the {group.world} ranks during calibration; "
                "check that the forward function runs the model on at least one batch that reaches this layer"
            )
        ranges.append((-seg[0], seg[1], seg[2].long() if o.histogram else None))
    for (q, _), p in zip(params, prints, strict=True):
        n = p.numel()
        seg = reduced[offset : offset + 2 * n]
        offset += 2 * n
        if not torch.equal(seg[:n], -seg[n:]):  # max == min across ranks, exactly
            raise CalibrationError(
                f"the parameter of quantizer {q.label!r} differs across ranks; load the same weights on every "
                "rank (or broadcast them, as wrapping in DistributedDataParallel does) before compute_encodings"
            )
    return ranges


def _sum_counts(
    group: _Group,
    observers: Sequence[_DeferringObserver],
    shapes: Sequence[tuple[int, ...] | None],
    ranges: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    devices: Sequence[torch.device],
) -> list[RangeObserver]:
    """Observers holding the statistics of every rank's data, identical on all ranks."""
    if not observers:
        return []  # the status exchange checked that no rank has any
    dev = group.device
    layouts: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    parts = [torch.tensor([o.num_values for o in observers], dtype=torch.int64, device=dev)]
    for o, (mn, mx, k_floor) in zip(observers, ranges, strict=True):
        if k_floor is None:
            layouts.append(None)
            continue
        # as RangeObserver.merge: the layout of the combined range, never finer than any rank's
        k = rg.aligned_exponent(mn, mx, o.num_bins, k_floor)
        start = rg.aligned_index(mn, k)
        layouts.append((k, start))
        if o.num_values:
            local = o.counts_in_layout(k.to(o.k.device), start.to(o.k.device))  # type: ignore[union-attr]
            parts.append(local.to(dev).reshape(-1))
        else:
            parts.append(torch.zeros(mn.numel() * o.num_bins, dtype=torch.int64, device=dev))
    reduced = group.all_reduce(torch.cat(parts), dist.ReduceOp.SUM)
    offset = len(observers)
    combined: list[RangeObserver] = []
    for i, (o, shape, (mn, mx, _), layout, device) in enumerate(
        zip(observers, shapes, ranges, layouts, devices, strict=True)
    ):
        state = {
            "min": mn,
            "max": mx,
            "num_values": reduced[i],
            "encoding_shape": torch.tensor(shape, dtype=torch.int64),
        }
        if layout is not None:
            n = mn.numel() * o.num_bins
            state.update(
                k=layout[0], start=layout[1], counts=reduced[offset : offset + n].view(-1, o.num_bins)
            )
            offset += n
        state = {name: t.to(device) for name, t in state.items()}
        combined.append(RangeObserver.from_state(state, o.granularity, o.label))
    return combined

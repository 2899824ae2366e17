"""Stateless math of calibration: power-of-two aligned histograms and range search.

Observers (:mod:`mixprec.quant.observers`) collect aligned histograms, which merge exactly across
batches and ranks; ``tf_enhanced`` and ``percentile`` ranges are searched on them here.
"""

from __future__ import annotations

import torch

from mixprec.quant.qmath import MIN_SPAN

# ----------------------------------------------------------------------------- histograms


def _exponent_floor_log2(v: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2(v))`` for positive float64 ``v`` (as int64)."""
    return torch.frexp(v).exponent.long() - 1


def aligned_exponent(
    mn: torch.Tensor, mx: torch.Tensor, num_bins: int, k_min: torch.Tensor | None = None
) -> torch.Tensor:
    """Smallest bin-width exponent ``k`` so that bins ``[i*2**k, (i+1)*2**k)`` covering
    ``[mn, mx]`` number at most ``num_bins`` (per element, float64 in, int64 out).

    ``k`` is also kept >= ``floor(log2(absmax)) - 40`` (bin indices stay far inside int64 and
    float32 products stay exact) and >= -100. Both rules grow monotonically with the range, so
    an incrementally grown histogram ends at the same ``k`` as one built from all data at once.
    """
    absmax = torch.maximum(mn.abs(), mx.abs())
    floor_k = torch.where(absmax > 0, _exponent_floor_log2(absmax.clamp_min(1e-300)) - 40, -100).clamp_min(
        -100
    )
    span = (mx - mn).clamp_min(1e-300)
    k = torch.maximum(_exponent_floor_log2(span / num_bins), floor_k)
    for _ in range(3):  # at most two bumps are ever needed (see module tests)
        fits = aligned_index(mx, k) - aligned_index(mn, k) + 1 <= num_bins
        k = torch.where(fits, k, k + 1)
    if k_min is not None:
        k = torch.maximum(k, k_min)
    return k


def aligned_index(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``floor(v / 2**k)`` as int64; exact (scaling by a power of two is exact in float64)."""
    return torch.floor(torch.ldexp(v.double(), -k)).long()


def rebin(
    counts: torch.Tensor, k: torch.Tensor, start: torch.Tensor, k_new: torch.Tensor, start_new: torch.Tensor
) -> torch.Tensor:
    """Merge aligned bins ``[G, B]`` (exponent ``k``, first index ``start``) into a coarser
    layout ``(k_new >= k, start_new)``: absolute bin ``i`` goes to ``floor(i / 2**(k_new-k))``."""
    num_bins = counts.shape[1]
    absolute = start[:, None] + torch.arange(num_bins, device=counts.device)
    shift = (k_new - k).clamp_max(63)[:, None]  # shifting int64 by >= 64 is not portable
    target = torch.bitwise_right_shift(absolute, shift) - start_new[:, None]
    # empty trailing bins may map outside the new layout; clamping them is harmless
    target = target.clamp_(0, num_bins - 1)
    return torch.zeros_like(counts).scatter_add_(1, target, counts)


def aligned_histogram(
    rows: torch.Tensor, k: torch.Tensor, start: torch.Tensor, num_bins: int
) -> torch.Tensor:
    """Counts ``[G, num_bins]`` of ``rows [G, N]`` in aligned bins: value ``v`` of row ``g`` goes
    to bin ``floor(v / 2**k[g]) - start[g]`` (which must lie in ``[0, num_bins)``).

    float32 rows use float32 math when every ``k`` is in ``[-100, 0]``: scaling by ``2**-k >= 1``
    is then exact and cannot underflow (with ``k > 0`` a tiny negative value could flush to
    ``-0.0``, whose floor is 0 instead of -1), and subtracting ``start`` (a float32-representable
    integer close to the floor) is exact too. Otherwise the math is float64. Syncs once.
    """
    groups = rows.shape[0]
    k_lo, k_hi = torch.stack([k.min(), k.max()]).tolist()
    if rows.dtype == torch.float32 and -100 <= k_lo and k_hi <= 0:
        factor = torch.ldexp(torch.ones_like(k, dtype=torch.float32), -k)[:, None]
        idx = torch.mul(rows, factor).floor_().sub_(start.float()[:, None]).long()
    else:
        idx = torch.ldexp(rows.double(), -k[:, None]).floor_().sub_(start.double()[:, None]).long()
    if groups > 1:
        idx += torch.arange(groups, device=idx.device)[:, None] * num_bins
    return torch.bincount(idx.reshape(-1), minlength=groups * num_bins).view(groups, num_bins)


# ----------------------------------------------------------------------------- range search


def _centers(counts: torch.Tensor, bin_lo: torch.Tensor, bin_width: torch.Tensor) -> torch.Tensor:
    i = torch.arange(counts.shape[-1], device=counts.device, dtype=torch.float64)
    return bin_lo[:, None] + (i + 0.5) * bin_width[:, None]


def _as_batch(counts: torch.Tensor, *vals: torch.Tensor | float | None) -> tuple[torch.Tensor, ...]:
    c = counts.double().reshape(-1, counts.shape[-1])
    out = [c]
    for v in vals:
        out.append(
            None
            if v is None
            else torch.as_tensor(v, dtype=torch.float64, device=c.device).reshape(-1).expand(c.shape[0])
        )  # type: ignore[arg-type]
    return tuple(out)  # type: ignore[return-value]


def _data_bounds(
    c: torch.Tensor, centers: torch.Tensor, width: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    nonzero = c > 0
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=c.device)
    lo = torch.where(nonzero, centers, inf).amin(1) - width / 2
    hi = torch.where(nonzero, centers, -inf).amax(1) + width / 2
    return lo, hi


def search_range_tf_enhanced(
    counts: torch.Tensor,
    bin_lo: torch.Tensor | float,
    bin_width: torch.Tensor | float,
    bitwidth: int,
    symmetric: bool,
    *,
    data_min: torch.Tensor | float | None = None,
    data_max: torch.Tensor | float | None = None,
    unsigned_symmetric: bool = True,
    strict_symmetric: bool = False,
    num_candidates: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Range minimizing the expected squared quantization error over a histogram.

    The noise of a bin centered at ``c`` under a candidate clip range ``[a, b]`` with step ``s``
    is ``s**2 / 12`` (uniform rounding noise) when ``a <= c <= b`` and ``(c - clip(c))**2``
    otherwise. Costs come from prefix sums of ``n``, ``n*c``, ``n*c**2``, so each candidate costs
    O(1) and all candidates of all histograms are evaluated in one batched tensor expression.

    Candidates: symmetric -> ``K`` fractions of the absmax (default 200 for one histogram, 100
    per channel: the gathers dominate the cost of a ResNet-50's ~27k weight channels, and 1% of
    absmax is about one int8 step); asymmetric -> all pairs of ``K+1`` fractions of ``min`` and
    ``max`` (default K=50: 2601 pairs, costed as 2x51 one-sided terms plus one broadcast).

    Args:
        counts: ``[bins]`` or ``[G, bins]`` histogram counts with uniform bins.
        bin_lo: left edge of bin 0 (scalar or ``[G]``).
        bin_width: bin width (scalar or ``[G]``).
        bitwidth, symmetric, unsigned_symmetric, strict_symmetric: the target integer grid, as
            in ``encoding_from_range``.
        data_min, data_max: exact observed range (defaults to the outer edges of non-empty bins).
        num_candidates: ``K`` above.

    Returns:
        ``(mn, mx)`` float64, shaped like ``counts.shape[:-1]``; feed them to ``encoding_from_range``.
    """
    c, lo0, w, dmin, dmax = _as_batch(counts, bin_lo, bin_width, data_min, data_max)
    centers = _centers(c, lo0, w)
    if dmin is None or dmax is None:
        dmin, dmax = _data_bounds(c, centers, w)
    lo, hi = dmin.clamp(max=0.0), dmax.clamp(min=0.0)
    levels, half = 2**bitwidth - 1, 2 ** (bitwidth - 1)
    unsigned = symmetric and unsigned_symmetric and bool((dmin >= 0).all())
    tails = _TailCosts(c, centers, lo0, w)
    if symmetric:
        k = num_candidates or (200 if c.shape[0] == 1 else 100)
        frac = torch.arange(1, k + 1, dtype=torch.float64, device=c.device) / k
        top = hi if unsigned else torch.maximum(-lo, hi)
        b = top[:, None] * frac
        step = b / (levels if unsigned else half - 1)
        a = torch.zeros_like(b) if unsigned else (-b if strict_symmetric else -step * half)
        n_below, below = tails.below(a)
        n_upto, above = tails.above(b)
        step = step.clamp_min(MIN_SPAN / levels)
        cost = (n_upto - n_below).mul_(step.square_()).div_(12).add_(below).add_(above)
        b_best = b.gather(1, cost.argmin(1, keepdim=True))[:, 0]
        a_best = torch.zeros_like(b_best) if unsigned else -b_best
    else:
        # below-min costs depend on a only, above-max costs on b only: evaluate each side on
        # K+1 points and combine all (K+1)**2 pairs by broadcasting
        k = num_candidates or 50
        frac = torch.arange(0, k + 1, dtype=torch.float64, device=c.device) / k
        a, b = lo[:, None] * frac, hi[:, None] * frac
        n_below, below = tails.below(a)
        n_upto, above = tails.above(b)
        step = ((b[:, None, :] - a[:, :, None]) / levels).clamp_min(MIN_SPAN / levels)
        inside = n_upto[:, None, :] - n_below[:, :, None]
        cost = inside.mul_(step.square_()).div_(12).add_(below[:, :, None]).add_(above[:, None, :])
        best = cost.flatten(1).argmin(1, keepdim=True)
        a_best = a.gather(1, best // (k + 1))[:, 0]
        b_best = b.gather(1, best % (k + 1))[:, 0]
    empty = tails.total[:, 0] == 0
    a_best, b_best = torch.where(empty, lo, a_best), torch.where(empty, hi, b_best)
    shape = counts.shape[:-1]
    return a_best.reshape(shape), b_best.reshape(shape)


class _TailCosts:
    """Clipping costs from prefix sums of ``n``, ``n*c``, ``n*c**2`` over bins (float64)."""

    def __init__(self, c: torch.Tensor, centers: torch.Tensor, lo0: torch.Tensor, w: torch.Tensor) -> None:
        nbins = c.shape[1]
        prefix = c.new_zeros(3, c.shape[0], nbins + 1)
        prefix[0, :, 1:] = c
        torch.mul(c, centers, out=prefix[1, :, 1:])
        torch.mul(prefix[1, :, 1:], centers, out=prefix[2, :, 1:])
        self.prefix = prefix.cumsum_(2)
        self.total = prefix[0, :, -1:]
        self.nbins = nbins
        # bin m has center lo0 + (m + 0.5) w: position of value v in "center units"
        self.inv_w = (1.0 / w)[:, None]
        self.origin = (-lo0 / w - 0.5)[:, None]

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        return self.prefix.gather(2, index.clamp_(0, self.nbins).long().expand(3, -1, -1))

    def below(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per candidate lower limit ``a``: count of bins centered below it and their
        ``sum n*(a - c)**2``."""
        n, s1, s2 = self._gather(torch.addcmul(self.origin, a, self.inv_w).ceil_())
        return n, (a * n).sub_(s1, alpha=2).mul_(a).add_(s2)

    def above(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per candidate upper limit ``b``: count of bins centered at or below it, and the
        ``sum n*(c - b)**2`` of the bins above."""
        n, s1, s2 = self._gather(torch.addcmul(self.origin, b, self.inv_w).floor_().add_(1))
        p0, p1, p2 = self.prefix[:, :, -1:]
        h0, h1 = p0 - n, p1 - s1
        return n, (b * h0).sub_(h1, alpha=2).mul_(b).add_(p2 - s2)


def percentile_range(
    counts: torch.Tensor,
    bin_lo: torch.Tensor | float,
    bin_width: torch.Tensor | float,
    percentile: float = 99.99,
    *,
    data_min: torch.Tensor | float | None = None,
    data_max: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Range that drops ``100 - percentile`` percent of the values at each end.

    Lower bound: left edge of the first bin where the cumulative count exceeds
    ``(1 - p/100) * total``; upper: right edge of the first bin where it reaches ``p/100 * total``;
    both clipped to the observed range. ``percentile=100`` gives min-max.

    Returns:
        ``(mn, mx)`` float64, shaped like ``counts.shape[:-1]``.
    """
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    c, lo0, w, dmin, dmax = _as_batch(counts, bin_lo, bin_width, data_min, data_max)
    if dmin is None or dmax is None:
        dmin, dmax = _data_bounds(c, _centers(c, lo0, w), w)
    cum = c.cumsum(1)
    total = cum[:, -1:]
    i_hi = torch.searchsorted(cum, total * (percentile / 100.0)).clamp_max(c.shape[1] - 1)[:, 0]
    i_lo = torch.searchsorted(cum, total * (1.0 - percentile / 100.0), right=True).clamp_max(c.shape[1] - 1)[
        :, 0
    ]
    mn = torch.maximum(lo0 + i_lo * w, dmin).minimum(dmax)
    mx = torch.minimum(lo0 + (i_hi + 1) * w, dmax).maximum(dmin)
    shape = counts.shape[:-1]
    return mn.reshape(shape), mx.reshape(shape)

"""Calibration statistics: running min/max and exactly mergeable aligned histograms."""

from __future__ import annotations

import enum
import math

import torch

from mixprec.core.granularity import Granularity, PerTensor
from mixprec.errors import CalibrationError
from mixprec.quant import qmath as qm
from mixprec.quant import ranges as rg

DEFAULT_NUM_BINS = 2048
"""Bin budget of a per-tensor histogram."""
DEFAULT_NUM_BINS_PER_GROUP = 512
"""Bin budget per channel/block (finer than the search's candidate step)."""


def num_bins_for_tensor(granularity: Granularity, t: torch.Tensor) -> int:
    """Bin budget for the statistics of one known tensor (a parameter).

    Per tensor: ``DEFAULT_NUM_BINS``. Per channel/block: about one bin per 8 values, a power of
    two in ``[64, DEFAULT_NUM_BINS_PER_GROUP]``; more bins than values only costs search time
    (ResNet-50 has ~27k weight channels, most with a few hundred values).
    """
    if isinstance(granularity, PerTensor):
        return DEFAULT_NUM_BINS
    groups = math.prod(qm.encoding_shape(granularity, t.shape))
    per_group = t.numel() // max(1, groups)
    return min(DEFAULT_NUM_BINS_PER_GROUP, max(64, 1 << max(0, (per_group // 8 - 1).bit_length())))


class QuantScheme(enum.Enum):
    """How an encoding's range is chosen from calibration statistics.

    ``TF``: min-max. ``TF_ENHANCED`` (default): the range minimizing expected quantization noise
    over a histogram. ``PERCENTILE``: drop the extreme ``100 - p`` percent at each end.
    ``RANGE_LEARNING_TF`` / ``RANGE_LEARNING_TF_ENHANCED``: calibrated like ``TF`` /
    ``TF_ENHANCED`` (``calibration_scheme``), then the encodings are trainable (``learnable``).

    The reference's member names are aliases of these members, so AIMET scripts run unchanged
    (docs/porting_from_aimet.md): ``QuantScheme.post_training_tf_enhanced is
    QuantScheme.TF_ENHANCED``.
    """

    TF = "tf"
    TF_ENHANCED = "tf_enhanced"
    PERCENTILE = "percentile"
    RANGE_LEARNING_TF = "range_learning_tf"
    RANGE_LEARNING_TF_ENHANCED = "range_learning_tf_enhanced"

    # The reference's names (aliases: same value, same member).
    min_max = "tf"
    post_training_tf = "tf"
    post_training_tf_enhanced = "tf_enhanced"
    post_training_percentile = "percentile"
    training_range_learning_with_tf_init = "range_learning_tf"
    training_range_learning_with_tf_enhanced_init = "range_learning_tf_enhanced"
    # The reference leaves the initialization of this one unnamed; min-max is its plainest reading.
    training_range_learning = "range_learning_tf"

    @property
    def learnable(self) -> bool:
        """True for the range-learning schemes: encodings become trainable after calibration."""
        return self in (QuantScheme.RANGE_LEARNING_TF, QuantScheme.RANGE_LEARNING_TF_ENHANCED)

    @property
    def calibration_scheme(self) -> QuantScheme:
        """The post-training scheme that computes the (initial) encodings: ``TF``,
        ``TF_ENHANCED`` or ``PERCENTILE``."""
        if self is QuantScheme.RANGE_LEARNING_TF:
            return QuantScheme.TF
        if self is QuantScheme.RANGE_LEARNING_TF_ENHANCED:
            return QuantScheme.TF_ENHANCED
        return self

    @property
    def needs_histogram(self) -> bool:
        return self.calibration_scheme is not QuantScheme.TF

    @classmethod
    def parse(cls, value: QuantScheme | str) -> QuantScheme:
        """Accept the enum, a value or member name, case-insensitive (``"tf"``,
        ``"post_training_tf_enhanced"``, ``"QuantScheme.min_max"``).

        Raises:
            ValueError: the message lists the accepted values.
        """
        if isinstance(value, QuantScheme):
            return value
        if isinstance(value, str):
            key = value.strip().lower().removeprefix("quantscheme.")
            by_name = {name.lower(): member for name, member in cls.__members__.items()}
            found = by_name.get(key) or by_name.get(key.removeprefix("post_training_"))
            if found is not None:
                return found
            for scheme in cls:
                if key in (scheme.value, scheme.value.removeprefix("post_training_")):
                    return scheme
        accepted = ", ".join(s.value for s in cls)
        aliases = ", ".join(name for name in cls.__members__ if name.islower())
        raise ValueError(
            f"unknown quant scheme {value!r}; accepted (case-insensitive): {accepted}, "
            f"or the reference's names {aliases}"
        )


class RangeObserver:
    """Collects float statistics over many batches for one quantizer.

    Keeps the running min and max per encoding group (one group per tensor, channel or block),
    and optionally an aligned histogram per group: bins are ``[i*2**k, (i+1)*2**k)`` with integer
    ``k`` and at most ``num_bins`` bins covering the observed range. When data widens the range
    beyond that, ``k`` grows and bins merge pairwise (bin ``i`` -> ``floor(i/2)``). ``k`` is a
    monotone function of the range (``mixprec.quant.qmath.aligned_exponent``), so the final histogram
    depends only on the multiset of values seen: not on batch order or splitting, which makes
    histograms from several processes exactly mergeable (``merge``, ``state_tensors``).

    Args:
        granularity: how values are grouped into encodings.
        histogram: also keep histograms (needed by ``TF_ENHANCED`` and ``PERCENTILE``).
        num_bins: the bin budget ``B`` per group (default 2048 per tensor, 512 per channel/block).
        label: names the quantizer in error messages, e.g. ``"features.0.0 output 0"``.
    """

    def __init__(
        self,
        granularity: Granularity | None = None,
        *,
        histogram: bool = True,
        num_bins: int | None = None,
        label: str = "",
    ) -> None:
        granularity = granularity or PerTensor()
        if num_bins is None:
            num_bins = DEFAULT_NUM_BINS if isinstance(granularity, PerTensor) else DEFAULT_NUM_BINS_PER_GROUP
        if num_bins < 4:
            raise ValueError(f"num_bins must be >= 4, got {num_bins}")
        self.granularity: Granularity = granularity
        self.histogram = histogram
        self.num_bins = num_bins
        self.label = label
        self.encoding_shape: tuple[int, ...] | None = None
        self.num_values = 0  # per group
        self.empty_batches = 0  # batches with no values (a layer that got an empty tensor)
        self.min: torch.Tensor | None = None  # float64 [G]
        self.max: torch.Tensor | None = None
        self.k: torch.Tensor | None = None  # int64 [G]: bin width 2**k
        self.start: torch.Tensor | None = None  # int64 [G]: absolute index of bin 0
        self.counts: torch.Tensor | None = None  # int64 [G, num_bins]

    # ------------------------------------------------------------------ collecting

    def _where(self) -> str:
        return f"quantizer {self.label!r}" if self.label else "quantizer"

    def observe(self, x: torch.Tensor) -> None:
        """Add a batch of values (any float dtype; empty tensors are ignored).

        Raises:
            CalibrationError: ``x`` holds NaN or inf (the message counts them).
            ValueError: the number of channels/blocks differs from earlier batches.
        """
        if x.numel() == 0:
            self.empty_batches += 1
            return
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # exact: every half value is a float32 value
        shape = qm.encoding_shape(self.granularity, x.shape)
        if self.encoding_shape is not None and shape != self.encoding_shape:
            raise ValueError(
                f"{self._where()}: encoding shape {shape} of this batch differs from {self.encoding_shape} seen before"
            )
        rows = qm.rows_by_group(x, self.granularity)
        bmin, bmax = torch.aminmax(rows, dim=1)
        bmin, bmax = bmin.double(), bmax.double()
        if not bool(torch.isfinite(bmin).all() & torch.isfinite(bmax).all()):
            self._raise_non_finite(x)
        if self.min is not None:
            bmin, bmax = torch.minimum(bmin, self.min), torch.maximum(bmax, self.max)  # type: ignore[arg-type]
        if not self.histogram:
            self._accept(shape, rows.shape[1], bmin, bmax)
            return
        k = rg.aligned_exponent(bmin, bmax, self.num_bins, self.k)
        start = rg.aligned_index(bmin, k)
        counts = self.counts
        if counts is not None:
            counts = rg.rebin(counts, self.k, self.start, k, start)  # type: ignore[arg-type]
        new = rg.aligned_histogram(rows, k, start, self.num_bins)
        self.counts = new if counts is None else counts.add_(new)
        self.k, self.start = k, start
        self._accept(shape, rows.shape[1], bmin, bmax)

    def _accept(self, shape: tuple[int, ...], n: int, mn: torch.Tensor, mx: torch.Tensor) -> None:
        self.encoding_shape = shape
        self.num_values += n
        self.min, self.max = mn, mx

    def _raise_non_finite(self, x: torch.Tensor) -> None:
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise CalibrationError(
            f"{self._where()} observed non-finite values during calibration: {n_nan} NaN and "
            f"{n_inf} inf out of {x.numel()} values; check the model and calibration data"
        )

    # ------------------------------------------------------------------ merging / export

    def merge(self, other: RangeObserver) -> None:
        """Fold ``other``'s statistics into this observer, exactly (as if it had seen its data)."""
        if other.num_values == 0:
            self.empty_batches += other.empty_batches
            return
        if self.num_values == 0:
            empty = self.empty_batches
            self._copy_from(other)
            self.empty_batches += empty
            return
        if self.encoding_shape != other.encoding_shape or self.histogram != other.histogram:
            raise ValueError(
                f"cannot merge observers with encoding shapes {self.encoding_shape} / {other.encoding_shape} "
                f"and histogram={self.histogram} / {other.histogram}"
            )
        mn, mx = torch.minimum(self.min, other.min), torch.maximum(self.max, other.max)  # type: ignore[arg-type]
        if self.histogram:
            if self.num_bins != other.num_bins:
                raise ValueError(f"cannot merge histograms of {self.num_bins} and {other.num_bins} bins")
            k = rg.aligned_exponent(mn, mx, self.num_bins, torch.maximum(self.k, other.k))  # type: ignore[arg-type]
            start = rg.aligned_index(mn, k)
            self.counts = self.counts_in_layout(k, start) + other.counts_in_layout(k, start)
            self.k, self.start = k, start
        self.num_values += other.num_values
        self.min, self.max = mn, mx

    def _copy_from(self, other: RangeObserver) -> None:
        for name in ("encoding_shape", "num_values", "histogram", "num_bins", "empty_batches"):
            setattr(self, name, getattr(other, name))
        for name in ("min", "max", "k", "start", "counts"):
            value = getattr(other, name)
            setattr(self, name, None if value is None else value.clone())

    def counts_in_layout(self, k: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """This histogram re-binned to a coarser common layout (``k`` >= own ``k`` per group),
        e.g. the layout ``layout_for_range`` gives for the all-reduced min/max."""
        if self.counts is None:
            raise ValueError("this observer holds no histogram")
        return rg.rebin(self.counts, self.k, self.start, k, start)  # type: ignore[arg-type]

    def layout_for_range(self, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, start)`` of the aligned layout covering ``[mn, mx]`` (float64 ``[G]``)."""
        k = rg.aligned_exponent(mn.double(), mx.double(), self.num_bins)
        return k, rg.aligned_index(mn.double(), k)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Statistics as tensors, for saving or a ``torch.distributed`` combine.

        Combine recipe: all-reduce ``min`` with MIN and ``max`` with MAX (and ``num_values`` with
        SUM); take ``k, start = layout_for_range(min, max)``; all-reduce
        ``counts_in_layout(k, start)`` with SUM. The result is bit-exact with one observer having
        seen all the data.
        """
        if self.num_values == 0:
            raise ValueError(f"{self._where()}: nothing observed yet")
        state = {
            "min": self.min,
            "max": self.max,
            "num_values": torch.tensor(self.num_values, dtype=torch.int64),
            "encoding_shape": torch.tensor(self.encoding_shape, dtype=torch.int64),
        }
        if self.histogram:
            state.update(k=self.k, start=self.start, counts=self.counts)
        return {name: t.clone() for name, t in state.items()}  # type: ignore[union-attr]

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], granularity: Granularity | None = None, label: str = ""
    ) -> RangeObserver:
        """Rebuild an observer from ``state_tensors()`` output (possibly combined across ranks)."""
        hist = "counts" in state
        num_bins = int(state["counts"].shape[1]) if hist else None
        obs = cls(granularity, histogram=hist, num_bins=num_bins, label=label)
        obs.encoding_shape = tuple(int(v) for v in state["encoding_shape"].tolist())
        obs.num_values = int(state["num_values"])
        obs.min, obs.max = state["min"].double().clone(), state["max"].double().clone()
        if hist:
            obs.k, obs.start = state["k"].long().clone(), state["start"].long().clone()
            obs.counts = state["counts"].long().clone()
        return obs

    # ------------------------------------------------------------------ results

    def compute_range(
        self,
        scheme: QuantScheme | str,
        bitwidth: int,
        symmetric: bool,
        *,
        unsigned_symmetric: bool = True,
        strict_symmetric: bool = False,
        percentile: float = 99.99,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated range ``(mn, mx)`` (float64, shaped like the encoding).

        Raises:
            CalibrationError: no data reached this quantizer.
            ValueError: ``scheme`` needs a histogram this observer does not keep.
        """
        scheme = QuantScheme.parse(scheme).calibration_scheme
        if self.num_values == 0 or self.min is None or self.max is None or self.encoding_shape is None:
            raise CalibrationError(
                f"no data reached {self._where()} during calibration; check that the forward "
                "function runs the model on at least one batch that reaches this layer"
            )
        shape = self.encoding_shape
        if scheme is QuantScheme.TF:
            return self.min.reshape(shape), self.max.reshape(shape)
        if not self.histogram or self.counts is None:
            raise ValueError(f"{scheme.value} needs a histogram; create the observer with histogram=True")
        width = torch.ldexp(torch.ones_like(self.min), self.k)  # type: ignore[arg-type]
        bin_lo = self.start.double() * width  # type: ignore[union-attr]
        if scheme is QuantScheme.PERCENTILE:
            mn, mx = rg.percentile_range(
                self.counts, bin_lo, width, percentile, data_min=self.min, data_max=self.max
            )
        else:
            mn, mx = rg.search_range_tf_enhanced(
                self.counts,
                bin_lo,
                width,
                bitwidth,
                symmetric,
                data_min=self.min,
                data_max=self.max,
                unsigned_symmetric=unsigned_symmetric,
                strict_symmetric=strict_symmetric,
            )
        return mn.reshape(shape), mx.reshape(shape)

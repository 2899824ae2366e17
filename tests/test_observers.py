"""RangeObserver: aligned histograms (order independence, exact merge), errors, schemes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec.core.granularity import PerChannel, PerTensor
from mixprec.errors import CalibrationError
from mixprec.quant import qmath as qm
from mixprec.quant.observers import QuantScheme, RangeObserver

from . import quant_reference as ref
from .helpers import assert_close


def data(n: int = 50_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2
    x[:3] = torch.tensor([300.0, -45.5, 1e-3])
    return x


def assert_same_state(a: RangeObserver, b: RangeObserver) -> None:
    sa, sb = a.state_tensors(), b.state_tensors()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def observe_chunks(x: torch.Tensor, sizes: list[int], **kwargs: object) -> RangeObserver:
    obs = RangeObserver(**kwargs)  # type: ignore[arg-type]
    for chunk in x.split(sizes):
        obs.observe(chunk)
    return obs


def random_sizes(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randint(1, n, (7,), generator=g).unique().tolist()
    bounds = [0, *cuts, n]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("num_bins", [16, 2048])
def test_histogram_independent_of_order_and_batching(num_bins: int) -> None:
    x = data()
    whole = observe_chunks(x, [x.numel()], num_bins=num_bins)
    for seed in range(3):
        perm = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))]
        assert_same_state(whole, observe_chunks(perm, random_sizes(x.numel(), seed), num_bins=num_bins))


@pytest.mark.parametrize("first", [0.1, 0.0], ids=["constant", "zeros"])
def test_histogram_growth_from_tiny_first_batch(first: float) -> None:
    # a constant first batch forces a very fine k (-100 for zeros), then everything merges up
    x = torch.cat([torch.full((10,), first), data()])
    assert_same_state(observe_chunks(x, [10, x.numel() - 10]), observe_chunks(x.flip(0), [x.numel()]))


def test_per_channel_histograms_independent_of_batching() -> None:
    x = torch.randn(12, 5, 7, 7) * torch.tensor([0.01, 1.0, 100.0, 3.0, 1e4])[:, None, None]
    whole = RangeObserver(PerChannel(1), num_bins=64)
    whole.observe(x)
    split = RangeObserver(PerChannel(1), num_bins=64)
    for part in x[torch.randperm(12)].split([1, 4, 7]):
        split.observe(part)
    assert_same_state(whole, split)
    mn, mx = whole.compute_range("tf", 8, False)
    assert_close(mn, x.amin((0, 2, 3)).double())
    assert_close(mx, x.amax((0, 2, 3)).double())


def test_merge_equals_observer_over_union() -> None:
    x = data()
    a, b = observe_chunks(x[:1000], [1000]), observe_chunks(x[1000:], [x.numel() - 1000])
    a.merge(b)
    assert_same_state(a, observe_chunks(x, [x.numel()]))
    empty = RangeObserver()
    empty.merge(a)
    assert_same_state(empty, a)
    a.merge(RangeObserver())
    assert_same_state(empty, a)


def test_distributed_combine_recipe_is_exact() -> None:
    """What an all-reduce would do: MIN/MAX the ranges, re-bin to one layout, SUM the counts."""
    x = data()
    ranks = [observe_chunks(part, [part.numel()]) for part in x.split([7, 30_000, 19_993])]
    states = [r.state_tensors() for r in ranks]
    mn = torch.stack([s["min"] for s in states]).amin(0)
    mx = torch.stack([s["max"] for s in states]).amax(0)
    k, start = ranks[0].layout_for_range(mn, mx)
    counts = sum(r.counts_in_layout(k, start) for r in ranks)
    combined = {
        "min": mn,
        "max": mx,
        "num_values": sum(s["num_values"] for s in states),
        "encoding_shape": states[0]["encoding_shape"],
        "k": k,
        "start": start,
        "counts": counts,
    }
    assert_same_state(RangeObserver.from_state(combined), observe_chunks(x, [x.numel()]))


def test_state_roundtrip() -> None:
    obs = observe_chunks(data(), [50_000])
    assert_same_state(RangeObserver.from_state(obs.state_tensors()), obs)
    mm = observe_chunks(data(), [50_000], histogram=False)
    assert "counts" not in mm.state_tensors()
    assert_same_state(RangeObserver.from_state(mm.state_tensors()), mm)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=200),
    st.sampled_from([4, 32, 2048]),
)
def test_histogram_invariants(values: list[float], num_bins: int) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    obs = observe_chunks(x, [len(values)], num_bins=num_bins)
    assert int(obs.counts.sum()) == len(values)
    width = 2.0 ** obs.k.item()
    lo = obs.start.item() * width
    assert lo <= x.min().item() and x.max().item() < lo + num_bins * width
    expected = torch.floor(x.double() / width).long() - obs.start.item()
    assert torch.equal(obs.counts[0], torch.bincount(expected, minlength=num_bins))


def test_half_inputs_are_observed_exactly() -> None:
    x = data(1000).half()
    assert_same_state(observe_chunks(x, [1000]), observe_chunks(x.float(), [1000]))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (float("nan"), r"2 NaN and 0 inf"),
        (float("inf"), r"0 NaN and 2 inf"),
        (-float("inf"), r"0 NaN and 2 inf"),
    ],
    ids=["nan", "inf", "-inf"],
)
@pytest.mark.parametrize("histogram", [True, False], ids=["hist", "minmax"])
def test_non_finite_values_raise_with_label(bad: float, match: str, histogram: bool) -> None:
    obs = RangeObserver(histogram=histogram, label="layer conv1, output 0")
    obs.observe(torch.randn(100))
    x = torch.randn(100)
    x[[3, 7]] = bad
    with pytest.raises(CalibrationError, match=match) as info:
        obs.observe(x)
    assert "layer conv1, output 0" in str(info.value)
    assert obs.num_values == 100  # the bad batch left no trace


def test_no_data_raises() -> None:
    obs = RangeObserver(label="fc output 0")
    obs.observe(torch.empty(0))
    with pytest.raises(CalibrationError, match=r"no data reached quantizer 'fc output 0'"):
        obs.compute_range(QuantScheme.TF, 8, False)


def test_channel_count_change_raises() -> None:
    obs = RangeObserver(PerChannel(1))
    obs.observe(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="differs"):
        obs.observe(torch.randn(2, 5, 4))


def test_histogram_scheme_needs_histogram() -> None:
    obs = observe_chunks(data(), [50_000], histogram=False)
    with pytest.raises(ValueError, match="needs a histogram"):
        obs.compute_range("tf_enhanced", 8, True)


@pytest.mark.parametrize(
    ("text", "scheme"),
    [
        ("tf", QuantScheme.TF),
        ("TF_Enhanced", QuantScheme.TF_ENHANCED),
        (" percentile ", QuantScheme.PERCENTILE),
        ("post_training_tf_enhanced", QuantScheme.TF_ENHANCED),
        (QuantScheme.TF, QuantScheme.TF),
    ],
)
def test_quant_scheme_parse(text: object, scheme: QuantScheme) -> None:
    assert QuantScheme.parse(text) is scheme  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["minmax", "", 3, None])
def test_quant_scheme_parse_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"accepted \(case-insensitive\): tf, tf_enhanced, percentile"):
        QuantScheme.parse(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- schemes end to end


def fq_mse(x: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, b: int, symmetric: bool) -> float:
    scale, offset = qm.encoding_from_range(mn, mx, b, symmetric)
    return (ref.fake_quantize_int(x, scale, offset, b) - x).pow(2).mean().item()


@pytest.mark.parametrize("bitwidth", [4, 8], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_tf_enhanced_narrower_and_better_than_min_max(bitwidth: int, symmetric: bool) -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * 3
    x[:3] = torch.tensor([40.0, -25.0, 60.0])
    obs = observe_chunks(x, [20_000] * 5)
    mn, mx = obs.compute_range(QuantScheme.TF_ENHANCED, bitwidth, symmetric)
    tmn, tmx = obs.compute_range(QuantScheme.TF, bitwidth, symmetric)
    assert (mx - mn) < (tmx - tmn)
    assert fq_mse(x, mn, mx, bitwidth, symmetric) < fq_mse(x, tmn, tmx, bitwidth, symmetric)


def test_percentile_ignores_top_outliers() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(2))
    x[:5] = 1000.0
    obs = observe_chunks(x, [100_000])
    mn, mx = obs.compute_range(QuantScheme.PERCENTILE, 8, False)
    assert mx.item() < 10.0 and mn.item() > -10.0
    assert obs.compute_range(QuantScheme.TF, 8, False)[1].item() == 1000.0


def test_per_channel_tf_enhanced_shapes() -> None:
    w = torch.randn(32, 16, 3, 3)
    obs = RangeObserver(PerChannel(0))
    obs.observe(w)
    mn, mx = obs.compute_range("tf_enhanced", 8, True)
    assert mn.shape == mx.shape == (32,)
    assert torch.all(mx <= w.abs().amax((1, 2, 3)).double() + 1e-9) and torch.all(mn == -mx)


def test_per_tensor_range_is_zero_dim() -> None:
    obs = RangeObserver(PerTensor())
    obs.observe(torch.randn(3, 4))
    assert obs.compute_range("percentile", 8, False)[0].shape == ()

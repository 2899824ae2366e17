"""Numerics of mixprec.quant.qmath against plain reference formulas, plus properties (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mixprec.core.granularity import PerBlock, PerChannel, PerTensor
from mixprec.core.precision import BF16, FP8_E4M3, FP8_E5M2, FP16
from mixprec.quant import qmath as qm
from mixprec.quant import ranges as rg

from . import quant_reference as ref
from .helpers import assert_close

# ---------------------------------------------------------------------------- references

MODES = {
    "asym": dict(symmetric=False, unsigned_symmetric=False, strict_symmetric=False),
    "sym": dict(symmetric=True, unsigned_symmetric=False, strict_symmetric=False),
    "sym_unsigned": dict(symmetric=True, unsigned_symmetric=True, strict_symmetric=False),
    "sym_strict": dict(symmetric=True, unsigned_symmetric=False, strict_symmetric=True),
}


def ref_encoding(mn: np.ndarray, mx: np.ndarray, b: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The convention, written out in float64 with a per-element loop."""
    m = MODES[mode]
    scales, offsets = [], []
    unsigned = m["unsigned_symmetric"] and bool(np.all(mn >= 0))
    for lo, hi in zip(np.minimum(mn, 0).ravel(), np.maximum(mx, 0).ravel(), strict=True):
        if not m["symmetric"]:
            s = np.float32(max(hi - lo, qm.MIN_SPAN) / (2**b - 1))
            o = int(np.clip(np.round(lo / np.float64(s)), -(2**b - 1), 0))
        elif unsigned:
            s, o = np.float32(max(hi, qm.MIN_SPAN) / (2**b - 1)), 0
        else:
            s, o = np.float32(max(-lo, hi, qm.MIN_SPAN) / (2 ** (b - 1) - 1)), -(2 ** (b - 1))
        scales.append(s)
        offsets.append(o)
    shape = np.shape(mn)
    return np.array(scales, np.float32).reshape(shape), np.array(offsets, np.int64).reshape(shape)


def ref_fake_quant(x: np.ndarray, s: np.ndarray, o: np.ndarray, b: int, strict: bool) -> np.ndarray:
    """``clamp(round(x / s), lo, hi) * s`` in float32, ``x / s`` taken as ``x * (1 / s)``."""
    inv = np.float32(1.0) / s.astype(np.float32)
    q = np.round(x.astype(np.float32) * inv)
    lo = (o + (1 if strict else 0)).astype(np.float32)
    return (np.clip(q, lo, (o + 2**b - 1).astype(np.float32)) * s).astype(np.float32)


def group_ranges(x: np.ndarray, gran: object) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(gran, PerTensor):
        return np.array(x.min(), np.float64), np.array(x.max(), np.float64)
    if isinstance(gran, PerChannel):
        axes = tuple(i for i in range(x.ndim) if i != gran.axis % x.ndim)
        return x.min(axis=axes).astype(np.float64), x.max(axis=axes).astype(np.float64)
    out, n = x.shape
    xb = x.reshape(out, n // gran.block_size, gran.block_size)
    return xb.min(axis=2).astype(np.float64), xb.max(axis=2).astype(np.float64)


def expand(t: np.ndarray, x: np.ndarray, gran: object) -> np.ndarray:
    """Broadcast an encoding-shaped array to ``x``'s shape."""
    if isinstance(gran, PerTensor):
        return np.broadcast_to(t, x.shape)
    if isinstance(gran, PerChannel):
        shape = [1] * x.ndim
        shape[gran.axis % x.ndim] = -1
        return np.broadcast_to(t.reshape(shape), x.shape)
    return np.repeat(t, gran.block_size, axis=1)


GRANULARITIES = {
    "per_tensor": ((6, 8, 5), PerTensor()),
    "per_channel_axis0": ((6, 8, 5), PerChannel(0)),
    "per_channel_axis1": ((6, 8, 5), PerChannel(1)),
    "per_channel_axis-1": ((6, 8, 5), PerChannel(-1)),
    "per_block_16": ((6, 64), PerBlock(16)),
}


@pytest.mark.parametrize(
    ("gran_id", "mode"),
    [(g, m) for g in GRANULARITIES for m in MODES if not (g.startswith("per_block") and m == "asym")],
    ids="-".join,  # per-block is symmetric only
)
@pytest.mark.parametrize("bitwidth", [4, 8, 16], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("positive", [False, True], ids=["signed_data", "nonneg_data"])
def test_fake_quant_matches_reference(gran_id: str, mode: str, bitwidth: int, positive: bool) -> None:
    shape, gran = GRANULARITIES[gran_id]
    rng = np.random.default_rng(bitwidth)
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 3.0, size=shape[-1])).astype(np.float32)
    if positive:
        x = np.abs(x)
    mn, mx = group_ranges(x, gran)
    s_ref, o_ref = ref_encoding(mn, mx, bitwidth, mode)
    scale, offset = qm.encoding_from_range(torch.tensor(mn), torch.tensor(mx), bitwidth, **MODES[mode])
    np.testing.assert_array_equal(scale.numpy(), s_ref)
    np.testing.assert_array_equal(offset.numpy(), o_ref)
    strict = mode == "sym_strict"
    got = ref.fake_quantize_int(torch.from_numpy(x), scale, offset, bitwidth, strict, granularity=gran)
    want = ref_fake_quant(x, expand(s_ref, x, gran), expand(o_ref, x, gran), bitwidth, strict)
    np.testing.assert_array_equal(got.numpy(), want)


def test_reciprocal_differs_from_division_only_at_ties() -> None:
    torch.manual_seed(0)  # fixed data: CI must not depend on which rare ties a random draw hits
    x = torch.randn(200_000) * 3
    scale, offset = qm.encoding_from_range(x.min(), x.max(), 8, False)
    got = ref.fake_quantize_int(x, scale, offset, 8).double()
    xd, s = x.double(), scale.double()
    exact = (torch.round(xd / s).clamp(offset, offset + 255)) * s
    differ = (got - exact).abs() > s / 2  # a different code, not float32 rounding of q*s
    assert torch.all((got - exact).abs() <= s * (1 + 1e-6))
    assert torch.all(((xd / s).frac().abs() - 0.5).abs()[differ] < 1e-4)


@pytest.mark.parametrize(
    ("mn", "mx", "mode", "scale", "offset"),
    [
        (-1.0, 3.0, "asym", 4 / 255, -64),
        (0.5, 2.0, "asym", 2 / 255, 0),  # range extended to include 0
        (-2.0, 1.0, "sym", 2 / 127, -128),
        (-2.0, 1.0, "sym_strict", 2 / 127, -128),
        (0.0, 3.0, "sym_unsigned", 3 / 255, 0),
        (-0.1, 3.0, "sym_unsigned", 3 / 127, -128),  # negatives seen: signed grid
        (0.0, 0.0, "asym", qm.MIN_SPAN / 255, 0),  # degenerate range
    ],
    ids=[
        "asym",
        "asym_positive_range",
        "sym",
        "sym_strict",
        "unsigned",
        "unsigned_needs_nonneg",
        "degenerate",
    ],
)
def test_encoding_examples(mn: float, mx: float, mode: str, scale: float, offset: int) -> None:
    s, o = qm.encoding_from_range(mn, mx, 8, **MODES[mode])
    assert s.item() == pytest.approx(scale, rel=1e-6)
    assert o.item() == offset


def test_unsigned_is_decided_for_the_whole_tensor() -> None:
    mn, mx = torch.tensor([0.0, -1.0]), torch.tensor([2.0, 2.0])
    _, offset = qm.encoding_from_range(mn, mx, 8, True, unsigned_symmetric=True)
    assert offset.tolist() == [-128, -128]


def test_per_block_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"size 30 is not divisible by block_size 8"):
        qm.encoding_shape(PerBlock(8), (4, 30))
    with pytest.raises(ValueError, match="axis 0"):
        qm.encoding_shape(PerBlock(8, axis=0), (16, 32))


def test_per_block_conv_weight_blocks_cover_kernel() -> None:
    w = torch.randn(4, 32, 3, 3)
    rows = qm.rows_by_group(w, PerBlock(8))
    assert rows.shape == (4 * 4, 8 * 9)
    assert_close(rows[5], w[1, 8:16].reshape(-1))


# ---------------------------------------------------------------------------- properties

finite32 = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def quant_cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
    x = torch.from_numpy(draw(arrays(np.float32, st.integers(1, 64), elements=finite32)))
    a, b = draw(finite32), draw(finite32)
    bitwidth = draw(st.sampled_from([2, 3, 4, 8, 12, 16]))
    mode = draw(st.sampled_from(list(MODES)))
    scale, offset = qm.encoding_from_range(min(a, b), max(a, b), bitwidth, **MODES[mode])
    return x, scale, offset, bitwidth, mode == "sym_strict"


@settings(max_examples=60, deadline=None)
@given(quant_cases())
def test_fake_quant_is_idempotent(case: tuple) -> None:
    x, scale, offset, b, strict = case
    once = ref.fake_quantize_int(x, scale, offset, b, strict)
    assert torch.equal(ref.fake_quantize_int(once, scale, offset, b, strict), once)


@settings(max_examples=60, deadline=None)
@given(quant_cases())
def test_outputs_on_grid_and_error_bounded_inside(case: tuple) -> None:
    x, scale, offset, b, strict = case
    y = ref.fake_quantize_int(x, scale, offset, b, strict).double()
    s = scale.double()
    codes = y / s
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    lo, hi = offset.item() + (1 if strict else 0), offset.item() + 2**b - 1
    assert codes.round().min() >= lo and codes.round().max() <= hi
    inside = (x.double() >= lo * s) & (x.double() <= hi * s)
    err = (y - x.double()).abs()[inside]
    assert torch.all(err <= s / 2 * (1 + 1e-5) + 1e-30)


@settings(max_examples=100, deadline=None)
@given(finite32, finite32, st.sampled_from([2, 4, 8, 16, 32]), st.sampled_from(list(MODES)))
def test_encoding_contains_zero_and_scale_positive(a: float, b: float, bitwidth: int, mode: str) -> None:
    scale, offset = qm.encoding_from_range(min(a, b), max(a, b), bitwidth, **MODES[mode])
    assert torch.isfinite(scale) and scale > 0
    gmin, gmax = qm.grid_min_max(scale, offset, bitwidth)
    assert gmin <= 0 <= gmax


@settings(max_examples=100, deadline=None)
@given(finite32, finite32, st.sampled_from([4, 16, 2048]))
def test_aligned_exponent_is_minimal(a: float, b: float, num_bins: int) -> None:
    mn, mx = torch.tensor([min(a, b)], dtype=torch.float64), torch.tensor([max(a, b)], dtype=torch.float64)
    k = rg.aligned_exponent(mn, mx, num_bins)
    nbins = rg.aligned_index(mx, k) - rg.aligned_index(mn, k) + 1
    assert nbins.item() <= num_bins
    smaller = rg.aligned_index(mx, k - 1) - rg.aligned_index(mn, k - 1) + 1
    floor_k = max(torch.frexp(torch.maximum(mn.abs(), mx.abs())).exponent.item() - 41, -100)
    assert smaller.item() > num_bins or k.item() - 1 < floor_k


# ---------------------------------------------------------------------------- STE and dtypes


def test_ste_gradient_is_one_inside_zero_outside() -> None:
    scale, offset = torch.tensor(0.1), torch.tensor(-128)  # grid [-12.8, 12.7]
    x = torch.tensor([-20.0, -12.8, 0.33, 12.7, 12.74, 12.76, 30.0], requires_grad=True)
    ref.fake_quantize_int(x, scale, offset, 8).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_no_autograd_node_when_no_grad_needed() -> None:
    x = torch.randn(10, requires_grad=True)
    scale, offset = torch.tensor(0.1), torch.tensor(-128)
    with torch.no_grad():
        assert ref.fake_quantize_int(x, scale, offset, 8).grad_fn is None
    assert ref.fake_quantize_int(x.detach(), scale, offset, 8).grad_fn is None
    assert ref.fake_quantize_int(x, scale, offset, 8).grad_fn is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_int_fake_quant_other_input_dtypes(dtype: torch.dtype) -> None:
    x = torch.randn(4, 6, 10)
    scale, offset = qm.encoding_from_range(x.amin((0, 2)), x.amax((0, 2)), 8, False)
    got = ref.fake_quantize_int(x.to(dtype), scale, offset, 8, granularity=PerChannel(1))
    assert got.dtype == dtype
    want = ref.fake_quantize_int(x.to(dtype).float(), scale, offset, 8, granularity=PerChannel(1)).to(dtype)
    if dtype == torch.float64:
        want = ref.fake_quantize_int(x.double(), scale, offset, 8, granularity=PerChannel(1))
    assert torch.equal(got, want)


@pytest.mark.parametrize("precision", [FP16, BF16], ids=str)
def test_fp16_bf16_match_casts_with_identity_gradient(precision: object) -> None:
    x = (torch.randn(1000) * 100).requires_grad_()
    x.data[0] = 1e6  # overflows fp16
    y = ref.fake_quantize_float(x, precision)  # type: ignore[arg-type]
    assert torch.equal(y, x.detach().to(precision.torch_dtype).float())  # type: ignore[attr-defined]
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("precision", [FP8_E4M3, FP8_E5M2], ids=str)
@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(0)], ids=str)
def test_fp8_values_representable_after_scaling(precision: object, gran: object) -> None:
    x = torch.randn(8, 100) * torch.linspace(0.01, 100, 8)[:, None]
    fmax = qm.float_max(precision)  # type: ignore[arg-type]
    amax = x.abs().amax() if isinstance(gran, PerTensor) else x.abs().amax(1)
    scale = amax / fmax
    y = ref.fake_quantize_float(x, precision, scale, gran)  # type: ignore[arg-type]
    scaled = y / (scale if isinstance(gran, PerTensor) else scale[:, None])
    dtype = precision.torch_dtype  # type: ignore[attr-defined]
    assert_close(scaled.to(dtype).float(), scaled, rtol=1e-6, atol=0)
    assert torch.all(scaled.abs() <= fmax * (1 + 1e-6))
    rtol = 2.0 ** -(precision.mantissa_bits + 1)  # type: ignore[attr-defined]
    assert_close(y, x, rtol=rtol * (1 + 1e-5), atol=float(scale.max()) * 2**-9)


# ---------------------------------------------------------------------------- range search


def uniform_hist(x: torch.Tensor, bins: int = 512) -> tuple[torch.Tensor, float, float]:
    lo, hi = x.min().item(), x.max().item()
    return torch.histc(x, bins, lo, hi), lo, (hi - lo) / bins


def outlier_data(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(100_000, generator=g)
    x[:4] = torch.tensor([25.0, -18.0, 30.0, 40.0])
    return x


def mse(
    x: torch.Tensor, mn: torch.Tensor | float, mx: torch.Tensor | float, b: int, symmetric: bool
) -> float:
    scale, offset = qm.encoding_from_range(mn, mx, b, symmetric)
    return (ref.fake_quantize_int(x, scale, offset, b) - x).pow(2).mean().item()


@pytest.mark.parametrize("bitwidth", [4, 8], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_tf_enhanced_beats_min_max_with_outliers(bitwidth: int, symmetric: bool) -> None:
    x = outlier_data()
    counts, lo, w = uniform_hist(x, 2048)
    mn, mx = rg.search_range_tf_enhanced(
        counts, lo, w, bitwidth, symmetric, data_min=x.min(), data_max=x.max()
    )
    assert mx - mn < (x.max() - x.min()).item()
    assert mse(x, mn, mx, bitwidth, symmetric) < mse(x, x.min(), x.max(), bitwidth, symmetric)


def test_tf_enhanced_batched_equals_rowwise() -> None:
    rows = torch.randn(6, 4000) * torch.logspace(-2, 2, 6)[:, None]
    rows[3, 0] = 500.0
    lo, hi = rows.amin(1), rows.amax(1)
    w = (hi - lo) / 256
    idx = ((rows - lo[:, None]) / w[:, None]).floor().clamp(0, 255).long()
    counts = ref.batched_bincount(idx, 256)
    for symmetric in (True, False):
        mn, mx = rg.search_range_tf_enhanced(
            counts, lo, w, 8, symmetric, data_min=lo, data_max=hi, num_candidates=40
        )
        for r in range(6):
            mn_r, mx_r = rg.search_range_tf_enhanced(
                counts[r], lo[r], w[r], 8, symmetric, data_min=lo[r], data_max=hi[r], num_candidates=40
            )
            assert (mn_r.item(), mx_r.item()) == (mn[r].item(), mx[r].item())


def brute_force_cost(counts: np.ndarray, centers: np.ndarray, a: float, b: float, step: float) -> float:
    """The documented noise model, bin by bin."""
    noise = np.where((centers >= a) & (centers <= b), step**2 / 12, (centers - np.clip(centers, a, b)) ** 2)
    return float((counts * noise).sum())


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bitwidth", [3, 8], ids=lambda b: f"int{b}")
def test_tf_enhanced_minimizes_the_noise_model(mode: str, bitwidth: int) -> None:
    rng = np.random.default_rng(bitwidth)
    counts = rng.integers(0, 50, 40).astype(np.float64)
    counts[[0, 39]] = 3  # tails at both ends
    lo0, w = (0.0, 0.25) if mode == "sym_unsigned" else (-3.1, 0.2)
    centers = lo0 + (np.arange(40) + 0.5) * w
    dmin, dmax = lo0, lo0 + 40 * w
    m, k = MODES[mode], 12
    mn, mx = rg.search_range_tf_enhanced(
        torch.tensor(counts), lo0, w, bitwidth, m["symmetric"], data_min=dmin, data_max=dmax,
        unsigned_symmetric=m["unsigned_symmetric"], strict_symmetric=m["strict_symmetric"], num_candidates=k,
    )  # fmt: skip
    levels, half = 2**bitwidth - 1, 2 ** (bitwidth - 1)
    lo, hi = min(dmin, 0.0), max(dmax, 0.0)
    if mode == "asym":
        cands = [
            (lo * i / k, hi * j / k, (hi * j - lo * i) / k / levels)
            for i in range(k + 1)
            for j in range(k + 1)
        ]
    elif mode == "sym_unsigned":
        cands = [(0.0, hi * j / k, hi * j / k / levels) for j in range(1, k + 1)]
    else:
        top = max(-lo, hi)
        ratio = 1.0 if mode == "sym_strict" else half / (half - 1)
        cands = [(-top * j / k * ratio, top * j / k, top * j / k / (half - 1)) for j in range(1, k + 1)]
    costs = {
        (a, b): brute_force_cost(counts, centers, a, b, max(s, qm.MIN_SPAN / levels)) for a, b, s in cands
    }
    match = [
        cost
        for (a, b), cost in costs.items()
        if b == pytest.approx(mx.item()) and (mode != "asym" or a == pytest.approx(mn.item()))
    ]
    assert len(match) == 1 and match[0] == pytest.approx(min(costs.values()), rel=1e-9)


def test_tf_enhanced_keeps_nonneg_data_unsigned() -> None:
    x = torch.rand(10_000) * 5
    counts, lo, w = uniform_hist(x)
    mn, mx = rg.search_range_tf_enhanced(counts, lo, w, 8, True, data_min=0.0, data_max=x.max())
    assert mn.item() == 0.0 and 4.0 < mx.item() <= 5.0


def test_percentile_ignores_top_outliers() -> None:
    x = outlier_data()
    counts, lo, w = uniform_hist(x, 4096)
    mn, mx = rg.percentile_range(counts, lo, w, 99.9, data_min=x.min(), data_max=x.max())
    assert 2.0 < mx.item() < 4.0 and -4.0 < mn.item() < -2.0
    mn100, mx100 = rg.percentile_range(counts, lo, w, 100.0, data_min=x.min(), data_max=x.max())
    assert (mn100.item(), mx100.item()) == (x.min().item(), x.max().item())
    with pytest.raises(ValueError, match="percentile"):
        rg.percentile_range(counts, lo, w, 30.0)


@pytest.mark.parametrize(
    "lo", [0.0, -128.0, -255.0, -37.0], ids=["unsigned", "signed", "all-negative", "asymmetric"]
)
def test_uint8_kernel_path_is_bit_identical_to_composed_math(lo):
    torch.manual_seed(0)
    qp = qm.QParams(1 / 0.0137, 0.0137, lo, lo + 255)
    x = torch.randn(100_000) * 2 + 0.3
    x[:8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 127.5, -128.5, 300.0]) * 0.0137  # ties and clipping
    fast = qm._fq_uint8_grid(x, qp)
    assert fast is not None
    composed = torch.mul(x, qp.inv_scale).round_().clamp_(qp.lo, qp.hi).mul_(qp.scale)
    assert torch.equal(fast, composed)
    assert qm._fq_uint8_grid(x.double(), qp) is None  # other dtypes take the composed path
    assert qm._fq_uint8_grid(x, qm.QParams(1.0, 1.0, 0.0, 65535.0)) is None  # 16-bit grids too

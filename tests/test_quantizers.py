"""Quantizer modules: calibration protocol, encodings, state, errors, QAT."""

from __future__ import annotations

import copy

import pytest
import torch

from mixprec.core.granularity import PerBlock, PerChannel, PerTensor
from mixprec.core.precision import BF16, FP8_E4M3, FP8_E5M2, FP16, INT8
from mixprec.errors import CalibrationError, EncodingNotComputedError
from mixprec.quant import qmath as qm
from mixprec.quant.quantizers import Encoding, FloatQuantizer, IntQuantizer, QuantizerBase, make_quantizer

from . import quant_reference as ref
from .helpers import assert_close


def calibrated(q: QuantizerBase, *batches: torch.Tensor, scheme: str = "tf") -> QuantizerBase:
    q.begin_calibration(scheme)
    for b in batches:
        assert q(b) is b
    q.end_calibration()
    return q


INT_CASES = {
    "int8_asym_per_tensor": dict(bitwidth=8, symmetric=False),
    "int8_sym_per_tensor": dict(bitwidth=8, symmetric=True),
    "int16_asym_per_tensor": dict(bitwidth=16, symmetric=False),
    "int4_sym_strict": dict(bitwidth=4, symmetric=True, strict_symmetric=True),
    "int8_sym_per_channel_axis1": dict(bitwidth=8, symmetric=True, granularity=PerChannel(1)),
    "int8_asym_per_channel_axis-1": dict(bitwidth=8, symmetric=False, granularity=PerChannel(-1)),
}


@pytest.mark.parametrize("case", list(INT_CASES))
def test_calibrated_forward_matches_functional(case: str) -> None:
    kwargs = INT_CASES[case]
    x = torch.randn(4, 6, 5, 5) * 2
    q = calibrated(IntQuantizer(**kwargs), x[:2], x[2:])  # type: ignore[arg-type]
    enc = q.get_encoding()
    g = kwargs.get("granularity", PerTensor())
    rows = qm.rows_by_group(x, g)  # type: ignore[arg-type]
    scale, offset = qm.encoding_from_range(
        rows.amin(1).reshape(enc.scale.shape),
        rows.amax(1).reshape(enc.scale.shape),
        kwargs["bitwidth"],  # type: ignore[arg-type]
        kwargs["symmetric"],  # type: ignore[arg-type]
        strict_symmetric=kwargs.get("strict_symmetric", False),  # type: ignore[arg-type]
    )
    assert torch.equal(enc.scale, scale) and torch.equal(enc.offset, offset)
    strict = bool(kwargs.get("strict_symmetric", False))
    want = ref.fake_quantize_int(x, scale, offset, kwargs["bitwidth"], strict, g)  # type: ignore[arg-type]
    assert torch.equal(q(x), want)


@pytest.mark.parametrize("shape", [(6,), (3, 6), (2, 6, 4, 4, 2)], ids=["rank1", "rank2", "rank5"])
def test_per_channel_broadcasts_for_any_rank(shape: tuple[int, ...]) -> None:
    axis = shape.index(6) - len(shape)  # negative axis
    x = torch.randn(shape)
    q = IntQuantizer(8, True, PerChannel(axis))
    q.calibrate_tensor(x, "tf")
    assert q.scale.shape == (6,)
    want = ref.fake_quantize_int(
        x.movedim(axis, 0),
        q.scale.view(6, *[1] * (len(shape) - 1)),
        q.offset.view(6, *[1] * (len(shape) - 1)),
        8,
    )
    assert torch.equal(q(x), want.movedim(0, axis))


def test_per_channel_size_mismatch_names_label() -> None:
    q = IntQuantizer(8, True, PerChannel(0), label="fc weight")
    q.calibrate_tensor(torch.randn(4, 3))
    with pytest.raises(ValueError, match="fc weight.*shape \\(5,\\)"):
        q(torch.randn(5, 3))


def test_per_block_weight() -> None:
    w = torch.randn(8, 64)
    q = IntQuantizer(4, True, PerBlock(16))
    q.calibrate_tensor(w, "tf")
    assert q.scale.shape == (8, 4)
    blocks = w.view(8, 4, 16)
    amax = blocks.abs().amax(2)
    assert_close(q.scale, amax / 7)
    want = (torch.round(blocks / q.scale[..., None]).clamp(-8, 7) * q.scale[..., None]).view(8, 64)
    assert_close(q(w), want, rtol=0, atol=1e-6)


def test_per_block_errors() -> None:
    with pytest.raises(ValueError, match="symmetric only"):
        IntQuantizer(4, False, PerBlock(16))
    q = IntQuantizer(4, True, PerBlock(16))
    with pytest.raises(ValueError, match="size 40 is not divisible by block_size 16"):
        q.calibrate_tensor(torch.randn(8, 40))


def test_unsigned_symmetric_on_nonneg_data() -> None:
    x = torch.rand(1000) * 6
    q = calibrated(IntQuantizer(8, True), x)
    enc = q.get_encoding()
    assert enc.offset.item() == 0 and enc.min.item() == 0.0
    assert enc.scale.item() == pytest.approx(x.max().item() / 255)
    signed = calibrated(IntQuantizer(8, True, unsigned_symmetric=False), x)
    assert signed.get_encoding().offset.item() == -128


def test_strict_symmetric_drops_lowest_code() -> None:
    x = torch.linspace(-2, 1, 100)
    q = calibrated(IntQuantizer(8, True, strict_symmetric=True), x)
    scale = q.scale.item()
    assert q(x).min().item() == pytest.approx(-127 * scale)
    loose = calibrated(IntQuantizer(8, True), x)
    assert loose(torch.tensor([-5.0])).item() == pytest.approx(-128 * scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_computed_in_float32(dtype: torch.dtype) -> None:
    x = torch.randn(4, 8)
    q = calibrated(IntQuantizer(8, False), x)
    y = q(x.to(dtype))
    assert y.dtype == dtype
    assert torch.equal(y, q(x.to(dtype).float()).to(dtype))


def test_non_float_inputs_pass_through() -> None:
    q = IntQuantizer(8)
    idx = torch.arange(5)
    assert q(idx) is idx


# ---------------------------------------------------------------------------- protocol and errors


def test_uninitialized_forward_names_label() -> None:
    q = IntQuantizer(8, label="features.0.0 output 0")
    assert not q.is_initialized()
    with pytest.raises(EncodingNotComputedError, match=r"'features.0.0 output 0'.*sim.compute_encodings"):
        q(torch.randn(3))


def test_end_calibration_without_data() -> None:
    q = IntQuantizer(8, label="head output 0")
    q.begin_calibration("tf_enhanced")
    with pytest.raises(CalibrationError, match=r"no data reached quantizer 'head output 0'"):
        q.end_calibration()
    assert not q.is_calibrating and not q.is_initialized()


def test_nan_during_calibration() -> None:
    q = IntQuantizer(8, label="layer4 output 0")
    q.begin_calibration("tf_enhanced")
    with pytest.raises(CalibrationError, match=r"'layer4 output 0'.*1 NaN"):
        q(torch.tensor([1.0, float("nan")]))


def test_abort_and_calibrate_tensor_leave_observing_mode() -> None:
    q = calibrated(IntQuantizer(8), torch.randn(100))
    before = q.get_encoding()
    q.begin_calibration("tf")
    q(torch.randn(10) * 100)
    q.abort_calibration()
    assert not q.is_calibrating and torch.equal(q.get_encoding().scale, before.scale)
    q.begin_calibration("tf", collect=False)
    x = torch.randn(10) * 1e3
    assert q(x) is x and q.observer is None
    with pytest.raises(RuntimeError, match="collect=False"):
        q.end_calibration()
    q.begin_calibration("tf", collect=False)
    q.calibrate_tensor(torch.randn(10))
    assert not q.is_calibrating
    with pytest.raises(RuntimeError, match="without begin_calibration"):
        q.end_calibration()


@pytest.mark.parametrize("scheme", ["tf", "tf_enhanced", "percentile"])
def test_schemes_produce_encodings(scheme: str) -> None:
    q = calibrated(IntQuantizer(8, True, PerChannel(0)), torch.randn(16, 100), scheme=scheme)
    assert q.scale.shape == (16,) and bool((q.scale > 0).all())


def test_set_range_and_encoding_roundtrip() -> None:
    q = IntQuantizer(8, False, PerChannel(0))
    q.set_range(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 0.5]))
    enc = q.get_encoding()
    q2 = IntQuantizer(8, False, PerChannel(0))
    q2.set_encoding(enc)
    x = torch.randn(2, 50)
    assert torch.equal(q(x), q2(x))
    assert_close(enc.min, enc.offset * enc.scale)
    assert_close(enc.max, (enc.offset + 255) * enc.scale)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(precision=FP16), "encoding is fp16"),
        (dict(granularity=PerTensor()), "per_tensor"),
        (dict(symmetric=True), "symmetric=True"),
        (dict(scale=torch.tensor([0.1, -0.1])), "finite and > 0"),
        (dict(scale=torch.tensor(0.1)), "does not fit"),
        (dict(offset=torch.tensor([0.5, 0.0])), "integers"),
        (dict(offset=torch.tensor([3, 0])), "integers"),
        (dict(offset=torch.tensor([0, 0, 0])), "shape of scale"),
    ],
    ids=[
        "precision",
        "granularity",
        "symmetry",
        "negative_scale",
        "scale_rank",
        "fractional_offset",
        "positive_offset",
        "offset_shape",
    ],
)
def test_set_encoding_validates(change: dict, match: str) -> None:
    q = IntQuantizer(8, False, PerChannel(0))
    good = dict(
        precision=INT8,
        granularity=PerChannel(0),
        symmetric=False,
        scale=torch.tensor([0.1, 0.2]),
        offset=torch.tensor([-10, 0]),
    )
    with pytest.raises(ValueError, match=match):
        q.set_encoding(Encoding(**{**good, **change}))  # type: ignore[arg-type]
    assert not q.is_initialized()


def test_set_range_validates() -> None:
    q = IntQuantizer(8, False, PerChannel(0))
    with pytest.raises(ValueError, match="rank 1"):
        q.set_range(0.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        q.set_range(torch.tensor([0.0]), torch.tensor([float("nan")]))


def test_reset_encoding() -> None:
    q = calibrated(IntQuantizer(8), torch.randn(10))
    q.reset_encoding()
    assert not q.is_initialized()
    with pytest.raises(EncodingNotComputedError):
        q.get_encoding()


def test_state_dict_into_fresh_quantizer_and_copies() -> None:
    x = torch.randn(8, 30)
    q = IntQuantizer(6, True, PerChannel(0))
    q.calibrate_tensor(x, "tf_enhanced")
    fresh = IntQuantizer(6, True, PerChannel(0))
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_initialized() and torch.equal(fresh(x), q(x))
    assert torch.equal(copy.deepcopy(q)(x), q(x))
    doubled = copy.deepcopy(q).double()  # cached values follow buffer conversions
    assert torch.equal(doubled(x.double()).float(), q(x))
    fresh.load_state_dict(IntQuantizer(6, True, PerChannel(0)).state_dict())
    assert not fresh.is_initialized()


def test_state_dict_with_bad_scale_is_rejected() -> None:
    q = IntQuantizer(8)
    with pytest.raises(RuntimeError, match="finite and > 0"):
        q.load_state_dict({"scale": torch.tensor(-1.0), "offset": torch.tensor(0)})
    assert not q.is_initialized()


def test_extra_repr() -> None:
    q = IntQuantizer(8, True, PerChannel(0), label="conv1 weight")
    text = repr(q)
    assert "int8" in text and "per_channel(axis=0)" in text and "symmetric" in text
    assert "initialized=False" in text and "conv1 weight" in text


# ---------------------------------------------------------------------------- QAT


def test_ste_gradients_through_module() -> None:
    q = IntQuantizer(8, True)
    q.set_range(-1.0, 1.0)
    x = torch.tensor([-3.0, -0.5, 0.2, 0.99, 2.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_qat_step_changes_weight() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4)
    q = IntQuantizer(4, True, PerChannel(0))
    q.calibrate_tensor(layer.weight.detach(), "tf_enhanced")
    before = layer.weight.detach().clone()
    x, target = torch.randn(32, 16), torch.randn(32, 4)
    loss = torch.nn.functional.mse_loss(torch.nn.functional.linear(x, q(layer.weight), layer.bias), target)
    loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():  # one plain SGD step (torch.optim's first import costs seconds)
        layer.weight -= 0.1 * layer.weight.grad
    assert not torch.equal(layer.weight.detach(), before)


# ---------------------------------------------------------------------------- floats and factory


@pytest.mark.parametrize("precision", [FP16, BF16], ids=str)
def test_half_float_quantizers_need_no_encoding(precision: object) -> None:
    q = FloatQuantizer(precision)  # type: ignore[arg-type]
    assert not q.needs_encoding and q.is_initialized()
    x = torch.randn(100) * 1000
    assert torch.equal(q(x), x.to(precision.torch_dtype).float())  # type: ignore[attr-defined]
    calibrated(q, x)
    assert q.get_encoding().scale is None


@pytest.mark.parametrize("precision", [FP8_E4M3, FP8_E5M2], ids=str)
@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(0)], ids=str)
def test_fp8_quantizer(precision: object, gran: object) -> None:
    x = torch.randn(4, 64) * torch.tensor([[0.1], [1.0], [10.0], [100.0]])
    q = FloatQuantizer(precision, gran, label="fc output 0")  # type: ignore[arg-type]
    with pytest.raises(EncodingNotComputedError, match="fc output 0"):
        q(x)
    calibrated(q, x, scheme="tf_enhanced")
    y = q(x)
    fmax = qm.float_max(precision)  # type: ignore[arg-type]
    scale = q.scale if isinstance(gran, PerTensor) else q.scale[:, None]
    scaled = y / scale
    dtype = precision.torch_dtype  # type: ignore[attr-defined]
    assert_close(scaled.to(dtype).float(), scaled, rtol=1e-6, atol=0)
    assert torch.allclose(y.abs().amax(), x.abs().amax(), rtol=0.13)
    enc = q.get_encoding()
    assert_close(enc.max, q.scale * fmax)
    other = FloatQuantizer(precision, gran)  # type: ignore[arg-type]
    other.set_encoding(enc)
    assert torch.equal(other(x), y)


def test_make_quantizer() -> None:
    q = make_quantizer("int8", symmetric=True, granularity=PerChannel(0), label="w")
    assert isinstance(q, IntQuantizer) and q.symmetric and q.label == "w"
    assert q.granularity == PerChannel(0) and q.precision == INT8
    f = make_quantizer("bf16", symmetric=False)
    assert isinstance(f, FloatQuantizer) and f.is_initialized() and f.symmetric
    assert make_quantizer("fp8", symmetric=True).needs_encoding
    with pytest.raises(ValueError, match="fp32 means no quantizer"):
        make_quantizer("fp32", symmetric=True)
    with pytest.raises(ValueError, match="bitwidth must be one of"):
        IntQuantizer(17)
    with pytest.raises(ValueError, match="FloatQuantizer needs"):
        FloatQuantizer("int8")

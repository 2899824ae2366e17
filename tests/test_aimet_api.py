"""The reference's API on mixprec objects, piece by piece (the whole scripts are in
tests/test_aimet_scripts.py): QuantScheme names, the constructor's order, quantizer getters and
setters, sim methods (load/export options and checkpoints: tests/test_aimet_io.py).
docs/porting_from_aimet.md is the map."""

from __future__ import annotations

import pytest
import torch

from mixprec import (
    FloatQuantizer,
    IntQuantizer,
    MixedPrecisionConfigurator,
    QuantizationDataType,
    QuantizationSimModel,
    QuantizerSettingError,
    QuantScheme,
    RequestError,
    UnsupportedArgumentError,
)
from tests.helpers import calibrated_small_cnn, precision_rows, small_cnn_sim
from tests.models import SmallCNN

# ---------------------------------------------------------------------------- QuantScheme


@pytest.mark.parametrize(
    ("name", "member", "learnable"),
    [
        ("min_max", QuantScheme.TF, False),
        ("post_training_tf", QuantScheme.TF, False),
        ("post_training_tf_enhanced", QuantScheme.TF_ENHANCED, False),
        ("post_training_percentile", QuantScheme.PERCENTILE, False),
        ("training_range_learning_with_tf_init", QuantScheme.RANGE_LEARNING_TF, True),
        ("training_range_learning_with_tf_enhanced_init", QuantScheme.RANGE_LEARNING_TF_ENHANCED, True),
        ("training_range_learning", QuantScheme.RANGE_LEARNING_TF, True),
    ],
)
def test_reference_scheme_names(name, member, learnable):
    assert getattr(QuantScheme, name) is member
    assert QuantScheme.parse(name) is member and QuantScheme.parse(f"QuantScheme.{name}") is member
    assert member.learnable is learnable
    assert member.calibration_scheme in (QuantScheme.TF, QuantScheme.TF_ENHANCED, QuantScheme.PERCENTILE)


def test_range_learning_scheme_calibrates_like_its_initialization():
    tf, _ = calibrated_small_cnn(quant_scheme=QuantScheme.post_training_tf)
    learn, _ = calibrated_small_cnn(quant_scheme=QuantScheme.training_range_learning_with_tf_init)
    for (name, a), (_, b) in zip(tf.named_quantizers(), learn.named_quantizers(), strict=True):
        assert torch.equal(a.get_scale(), b.get_scale()), name


# ---------------------------------------------------------------------------- constructor


def test_positional_order_is_the_references():
    model = SmallCNN().eval()
    x = model.example_input()
    sim = QuantizationSimModel(
        model, x, QuantScheme.min_max, 16, 4, False, "per_channel", QuantizationDataType.int
    )
    assert (sim.activation_precision.name, sim.param_precision.name) == ("int16", "int4")
    assert sim.quant_scheme is QuantScheme.TF and sim.model is not model
    same = QuantizationSimModel(
        model=model, dummy_input=x, default_data_type="int", config_file="per_channel", in_place=False
    )
    assert same.config == sim.config
    assert QuantizationSimModel(model, x, None).quant_scheme is QuantScheme.TF_ENHANCED


def test_reference_only_constructor_arguments():
    model = SmallCNN().eval()
    x = model.example_input()
    QuantizationSimModel(model, x, rounding_mode="nearest")
    with pytest.raises(UnsupportedArgumentError, match="rounding_mode='stochastic'.*nearest only"):
        QuantizationSimModel(model, x, rounding_mode="stochastic")
    with pytest.raises(TypeError, match="unexpected keyword argument 'use_cuda'; accepted: model"):
        QuantizationSimModel(model, x, use_cuda=True)  # a typed error that is still a TypeError


def test_two_argument_callback_without_args_gets_none():
    sim, x = small_cnn_sim()
    seen = []
    sim.compute_encodings(lambda model, args: seen.append(args) or model(x))
    assert seen == [None] and all(q.is_initialized() for _, q in sim.named_quantizers())


# ---------------------------------------------------------------------------- quantizers


def test_is_initialized_is_callable_and_a_bool():
    sim, x = small_cnn_sim()
    q = sim.model.stem.output_quantizers[0]
    assert q.is_initialized() is False and not q.is_initialized
    assert q.get_scale() is None and q.get_offset() is None and q.get_encodings() is None
    sim.compute_encodings(lambda m: m(x))
    assert q.is_initialized() is True and q.is_initialized


def test_getters_follow_the_references_offset_convention():
    sim, _ = calibrated_small_cnn()
    weight = sim.model.stem.param_quantizers["weight"]  # signed symmetric
    act = sim.model.stem.output_quantizers[0]  # asymmetric
    assert weight.signed and weight.symmetric and weight.get_offset().item() == 0
    assert weight.get_min().item() == pytest.approx(-128 * weight.get_scale().item())
    assert not act.signed and not act.symmetric
    enc = act.get_encodings()
    assert act.get_offset().item() == enc.offset.item() <= 0
    assert act.get_max().item() == pytest.approx(enc.max.item())
    assert weight.get_scale(torch.float64).dtype == torch.float64


def test_bitwidth_changes_precision_everywhere_shown():
    sim, x = calibrated_small_cnn()
    q = sim.model.fc.param_quantizers["weight"]
    scale8 = q.get_scale().item()
    q.bitwidth = 4
    assert q.precision.name == "int4" and q.is_initialized()  # the calibrated range is kept
    assert q.get_scale().item() == pytest.approx(scale8 * 127 / 7, rel=1e-5)
    assert precision_rows(sim)["fc"]["params"]["weight"] == "int4"
    assert dict(sim.named_quantizers())["fc.param_quantizers.weight"].precision.name == "int4"
    report = MixedPrecisionConfigurator(sim).apply()
    assert next(r for r in report.to_dict()["layers"] if r["name"] == "fc")["params"]["weight"] == "int4"
    assert q(sim.model.fc.weight.detach()).unique().numel() <= 16


def test_bitwidth_change_is_not_hidden_by_the_cached_quantized_weight():
    sim, x = calibrated_small_cnn()
    q = sim.model.fc.param_quantizers["weight"]
    with torch.no_grad():  # inference caches q(weight) across forwards (sim/runtime.py)
        y8 = sim.model(x)
        q.bitwidth = 4
        y4 = sim.model(x)
        q.__dict__.pop("_mixprec_param_cache", None)
        assert torch.equal(y4, sim.model(x)) and not torch.equal(y4, y8)


def test_data_type_changes_the_quantizer_type_in_place():
    sim, x = calibrated_small_cnn()
    q = sim.model.stem.output_quantizers[0]
    q.bitwidth = 16
    q.data_type = QuantizationDataType.float
    assert isinstance(q, FloatQuantizer) and q.precision.name == "fp16"
    assert sim.model.stem.output_quantizers[0] is q and precision_rows(sim)["stem"]["outputs"] == ["fp16"]
    torch.testing.assert_close(sim.model(x), sim.model(x))
    q.data_type = int
    assert isinstance(q, IntQuantizer) and q.precision.name == "int16" and not q.symmetric
    assert not q.is_initialized()  # fp16 had no range to keep: calibrate again
    q.precision = "fp8"
    assert q.data_type is QuantizationDataType.float and q.bitwidth == 8


@pytest.mark.parametrize(
    ("attr", "value", "match"),
    [
        ("bitwidth", 17, "bitwidth 17 does not exist for int quantizers; accepted: 2, 3"),
        ("bitwidth", "8", "bitwidth must be an int"),
        ("data_type", "double", "data type must be"),
        ("precision", "fp32", "fp32 means no quantizer; remove it instead"),
        ("signed", False, None),
    ],
)
def test_bad_quantizer_settings_leave_the_quantizer_alone(attr, value, match):
    sim, x = calibrated_small_cnn()
    q = sim.model.stem.param_quantizers["weight"]
    before = q.get_encodings()
    if match is None:  # a symmetric quantizer may become unsigned-capable: weights have negatives
        setattr(q, attr, value)
        assert q.signed and torch.equal(q.get_scale(), before.scale)
        return
    with pytest.raises(QuantizerSettingError, match=match):
        setattr(q, attr, value)
    assert q.precision.name == "int8" and torch.equal(q.get_scale(), before.scale)


def test_disabling_a_quantizer_says_how():
    sim, _ = small_cnn_sim()
    q = sim.model.fc.output_quantizers[0]
    q.enabled = True
    with pytest.raises(QuantizerSettingError, match=r"enabled=False: remove the quantizer instead"):
        q.enabled = False
    sim.model.fc.output_quantizers[0] = None  # the reference's 2.x way
    assert precision_rows(sim)["fc"]["outputs"] == [None]


def test_symmetric_setter_rederives_the_encoding():
    sim, _ = calibrated_small_cnn()
    q = sim.model.stem.output_quantizers[0]
    q.symmetric = True
    assert q.symmetric and q.is_initialized() and q.get_offset().item() == 0
    with pytest.raises(QuantizerSettingError, match="asymmetric grids are unsigned"):
        sim.model.fc.output_quantizers[0].signed = True


def test_frozen_encoding_survives_compute_encodings():
    sim, x = calibrated_small_cnn()
    q = sim.model.stem.output_quantizers[0]
    q.allow_overwrite(False)
    before = q.get_scale()
    sim.compute_encodings(lambda m: m(x * 10))
    assert torch.equal(q.get_scale(), before) and not q.is_overwrite_allowed()
    assert sim.model.fc.output_quantizers[0].get_scale().item() != 0


# ---------------------------------------------------------------------------- sim methods


def test_named_quantizers_and_qmodules_resolve_under_sim_model():
    sim, _ = small_cnn_sim()
    names = dict(sim.named_quantizers())
    assert len(names) == len(list(sim.quantizers()))
    for name, q in names.items():
        assert sim.model.get_submodule(name) is q
    qmodules = dict(sim.named_qmodules())
    assert "mixprec_functional.flatten" in qmodules and qmodules["fc"] is sim.model.fc
    assert list(sim.qmodules()) == list(qmodules.values())


def test_exclude_layers_refuses_modules_of_other_models():
    sim, _ = small_cnn_sim()
    with pytest.raises(RequestError, match="not a module .* of sim.model"):
        sim.exclude_layers_from_quantization([torch.nn.Linear(2, 2)])
    sim.exclude_layers_from_quantization(["block2"])
    assert all(row["outputs"] in ([None], [])
               for name, row in precision_rows(sim).items() if name.startswith("block2"))  # fmt: skip


def test_set_percentile_value_validates_and_reaches_new_quantizers():
    sim, x = small_cnn_sim(quant_scheme="percentile")
    with pytest.raises(QuantizerSettingError, match=r"percentile must be in \(50, 100\]"):
        sim.set_percentile_value(20)
    sim.set_percentile_value(99.5)
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(sim.model.fc, "int16")
    mp.apply()
    assert sim.model.fc.output_quantizers[0]._percentile == 99.5


def test_get_supported_kernels():
    sim, _ = small_cnn_sim(config_file="edge_strict")
    kernels = sim.get_supported_kernels()
    assert {
        "activation": {"bitwidth": 16, "dtype": "int"},
        "param": {"bitwidth": 8, "dtype": "int"},
    } in kernels["defaults"]
    assert small_cnn_sim()[0].get_supported_kernels() == {}

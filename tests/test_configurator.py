"""The rules of docs/rules.md (requests and resolution), one test each, on tiny models."""

import io
import re

import pytest
import torch
from torch import nn

import mixprec
from mixprec import MixedPrecisionConfigurator, QuantizationSimModel
from mixprec.errors import PrecisionConflictError, RequestError, UnsupportedKernelError

from .helpers import calibrate, make
from .models import build
from .snapshots import full_snapshot as snapshot


def row(sim, name):
    return next(r for r in sim.precision_table() if r["name"] == name)


# requests: targets --------------------------------------------------------------------------------


def test_leaf_request_sets_the_producer_of_its_input():
    sim, mp, _ = make("small_cnn")
    mp.set_precision(sim.model.fc, activation="int16", param={"weight": "int16"})
    mp.apply(log_file=None)
    fc = row(sim, "fc")
    assert fc["effective_inputs"] == ["int16"]
    assert fc["params"]["weight"] == "int16"
    assert row(sim, "pool")["outputs"] == ["int16"]


def test_non_leaf_request_covers_every_layer_inside():
    sim, mp, _ = make("small_cnn")
    mp.set_precision(sim.model.block1, activation="int16")
    report = mp.apply(log_file=None)
    for name in ["block1.0", "block1.1", "block1.2"]:
        assert row(sim, name)["effective_inputs"] == ["int16"], name
    assert row(sim, "stem")["outputs"] == ["int16"]
    # rule 4: the block emits int16 at its last layer, so block2 reads int16 and computes int16
    assert row(sim, "block1.2")["outputs"] == ["int16"]
    assert row(sim, "block2.0")["effective_inputs"] == ["int16"]
    assert row(sim, "block2.2")["outputs"] == ["int8"]
    assert {r["layer"] for r in report.after_preprocessing} == {"block1.0", "block1.1", "block1.2"}


def test_type_request_covers_every_instance():
    sim, mp, _ = make("small_cnn")
    mp.set_precision(nn.Conv2d, activation="int16", param={"weight": "int16"})
    mp.apply(log_file=None)
    for name in ["stem", "block1.0", "block2.0"]:
        assert row(sim, name)["effective_inputs"] == ["int16"]
        assert row(sim, name)["params"]["weight"] == "int16"
    assert row(sim, "fc")["effective_inputs"] == ["int8"]


@pytest.mark.parametrize(
    "target, expected",
    [
        ("block2.0", {"block2.0"}),
        ("block*.0", {"block1.0", "block2.0"}),
        (r"re:block\d\.(0|2)", {"block1.0", "block1.2", "block2.0", "block2.2"}),
    ],
    ids=["exact-name", "glob", "regex"],
)
def test_string_targets(target, expected):
    sim, mp, _ = make("small_cnn")
    mp.set_precision(target, activation="int16")
    report = mp.preview()
    assert {r["layer"] for r in report.before_preprocessing} == expected


def test_function_target_selects_every_call_site():
    sim, mp, _ = make("functional")
    mp.set_precision(torch.add, activation="int16")
    report = mp.apply(log_file=None)
    assert set(report.requests[0]["layers"]) == {"add", "add_1"}
    assert row(sim, "add")["effective_inputs"] == ["int16", "int16"]


def test_class_matching_nothing_is_recorded_and_reported():
    sim, mp, _ = make("small_cnn")
    mp.set_precision(nn.AvgPool2d, activation="int16")
    report = mp.apply(log_file=None)
    assert report.unmatched and report.unmatched[0]["target"] == "torch.nn.modules.pooling.AvgPool2d"
    assert not report.changes


# rule 1: latest wins ------------------------------------------------------------------------


def test_non_leaf_then_leaf_inside_gives_leaf_its_own_precision():
    sim, mp, _ = make("linear_stack")
    mp.set_precision(sim.model.block, activation="int16")
    mp.set_precision(sim.model.block[1], activation="int8")
    report = mp.apply(log_file=None, strict=True)
    # block.1 reads and emits int8: block.2 reads block.1's output, one tensor, at int8 too. The
    # block's request for it yields without error (it reached block.2 through a non-leaf module).
    assert [row(sim, f"block.{i}")["effective_inputs"] for i in range(3)] == [["int16"], ["int8"], ["int8"]]
    assert [row(sim, f"block.{i}")["outputs"] for i in range(3)] == [["int8"], ["int8"], ["int16"]]
    assert [(c["winner"], c["loser"], c["loser_layer"], c["loser_direct"]) for c in report.conflicts] == [
        (1, 0, "block.0", False),
        (1, 0, "block.2", False),
    ]


def test_leaf_then_non_leaf_lets_the_later_non_leaf_win_and_reports_the_shadowed_request():
    sim, mp, _ = make("linear_stack")
    mp.set_precision(sim.model.block[1], activation="int8")
    mp.set_precision(sim.model.block, activation="int16")
    report = mp.apply(log_file=None, strict=True)
    assert [row(sim, f"block.{i}")["effective_inputs"] for i in range(3)] == [["int16"]] * 3
    assert [s["id"] for s in report.shadowed] == [0]


def test_non_leaf_then_fused_leaf_inside_holds_under_strict():
    sim, mp, _ = make("small_cnn")
    mp.set_precision(sim.model.block1, activation="int16")
    mp.set_precision(sim.model.block1[2], activation="int8")  # the ReLU, fused with conv+bn
    report = mp.apply(log_file=None, strict=True)
    assert row(sim, "block1.2")["effective_inputs"] == ["int8"]
    assert any(c["loser"] == 0 and not c["loser_direct"] for c in report.conflicts)


# rule 2: producers, data movement, supergroup heads ----------------------------------------------


def test_request_realized_through_reshape_permute_flatten():
    sim, mp, _ = make("reshape_chain")
    mp.set_precision(sim.model.fc2, activation="int16")
    mp.apply(log_file=None)
    assert row(sim, "fc1")["outputs"] == ["int16"]
    assert row(sim, "fc2")["effective_inputs"] == ["int16"]


def test_supergroup_head_passes_the_request_upstream():
    sim, mp, _ = make("small_cnn")
    mp.set_precision(sim.model.block1[2], activation="int16")
    report = mp.apply(log_file=None)
    assert row(sim, "stem")["outputs"] == ["int16"]
    change = next(c for c in report.changes if c["layer"] == "stem")
    assert change["why"].startswith("propagated upstream from layer block1.")


def test_add_relu_supergroup_realizes_both_add_inputs():
    sim, mp, _ = make("add_relu")
    mp.set_precision(sim.model.relu, activation="int16")
    mp.apply(log_file=None)
    assert row(sim, "fa")["outputs"] == ["int16"]
    assert row(sim, "fb")["outputs"] == ["int16"]


# rule 3: one precision per tensor --------------------------------------------------------------------


def test_three_readers_strict_raises_naming_tensor_layers_and_requests():
    sim, mp, _ = make("three_readers")
    mp.set_precision(sim.model.a, activation="int16")
    mp.set_precision(sim.model.b, activation="int8")
    mp.set_precision(sim.model.c, activation="fp16")
    before = snapshot(sim)
    with pytest.raises(PrecisionConflictError) as err:
        mp.apply(log_file=None, strict=True)
    message = str(err.value)
    assert "stem output 0" in message and "layer a" in message and "layer c" in message
    assert "request 0" in message and "request 2" in message
    assert re.search(r"test_configurator\.py:\d+", message)
    assert snapshot(sim) == before


def test_three_readers_non_strict_latest_wins_and_report_lists_losers():
    sim, mp, _ = make("three_readers")
    mp.set_precision(sim.model.a, activation="int16")
    mp.set_precision(sim.model.b, activation="int8")
    mp.set_precision(sim.model.c, activation="fp16")
    with pytest.warns(UserWarning, match="conflict"):
        report = mp.apply(log_file=None, strict=False)
    for name in "abc":
        assert row(sim, name)["effective_inputs"] == ["fp16"]
    assert sorted(c["loser"] for c in report.conflicts) == [0, 1]


def test_shared_tensor_reader_is_drawn_in_by_the_request():
    sim, mp, _ = make("three_readers")
    mp.set_precision(sim.model.a, activation="int16")
    report = mp.apply(log_file=None)
    assert row(sim, "b")["effective_inputs"] == ["int16"]
    drawn = {r["layer"]: r["reason"] for r in report.after_propagation}
    assert drawn["b"] == "shared tensor" and drawn["c"] == "shared tensor"


def test_indirect_loser_yields_without_error_under_strict():
    sim, mp, _ = make("three_readers")
    mp.set_precision(nn.Conv2d, activation="int16")
    mp.set_precision(sim.model.b, activation="int8")
    report = mp.apply(log_file=None, strict=True)
    assert row(sim, "a")["effective_inputs"] == ["int8"]
    assert report.conflicts and all(not c["loser_direct"] for c in report.conflicts)


def test_agreeing_requests_never_conflict():
    sim, mp, _ = make("three_readers")
    mp.set_precision(sim.model.a, activation="int16")
    mp.set_precision(sim.model.b, activation="int16")
    report = mp.apply(log_file=None, strict=True)
    assert not report.conflicts


def test_own_params_kept_when_a_neighbour_wins_the_shared_input():
    sim, mp, _ = make("three_readers")
    mp.set_precision(sim.model.a, activation="int16", param={"weight": "int16"})
    mp.set_precision(sim.model.b, activation="int8")
    with pytest.warns(UserWarning, match="conflict"):
        mp.apply(log_file=None, strict=False)
    assert row(sim, "a")["params"]["weight"] == "int16"


# model inputs and outputs -------------------------------------------------------------------------


def test_multi_input_list_with_none_changes_only_that_input():
    sim, mp, _ = make("multi_io")
    mp.set_model_input_precision([None, "int16"])
    mp.apply(log_file=None)
    assert row(sim, "fx")["effective_inputs"] == ["int8"]
    assert row(sim, "fy")["effective_inputs"] == ["int16"]


def test_multi_output_list_sets_only_the_middle_output():
    sim, mp, _ = make("multi_io")
    mp.set_model_output_precision([None, "int16", None])
    mp.apply(log_file=None)
    assert row(sim, "head")["outputs"] == ["int16"]
    assert row(sim, "fx")["outputs"] == ["int8"]


def test_model_output_behind_view_reaches_the_producer():
    sim, mp, _ = make("output_behind_view")
    mp.set_model_output_precision("int16")
    mp.apply(log_file=None)
    assert row(sim, "fc")["outputs"] == ["int16"]


@pytest.mark.parametrize(
    "bad", [["int16"], [None, "int16", None], {"z": "int16"}], ids=["short", "long", "unknown-key"]
)
def test_model_io_shape_mismatch_raises_at_call_time(bad):
    sim, mp, _ = make("multi_io")
    with pytest.raises(RequestError, match="model input"):
        mp.set_model_input_precision(bad)
    assert not mp.requests


# rule 4: outputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "int4", "bf16", "fp8"], ids=str)
def test_float_and_narrow_precisions(precision):
    sim, mp, example = make("reshape_chain")
    mp.set_precision(sim.model.fc2, activation=precision, param={"weight": precision})
    mp.apply(log_file=None)
    expected = mixprec.Precision.parse(precision).name
    assert row(sim, "fc2")["effective_inputs"] == [expected]
    assert row(sim, "fc2")["params"]["weight"] == expected
    calibrate(sim, example)
    assert torch.isfinite(sim.model(example)).all()


def test_fp32_removes_the_quantizer():
    sim, mp, _ = make("reshape_chain")
    mp.set_precision(sim.model.fc2, activation="fp32", param={"weight": "fp32"})
    mp.apply(log_file=None)
    assert row(sim, "fc2")["effective_inputs"] == [None]
    assert row(sim, "fc2")["params"]["weight"] is None


def test_explicit_bias_request_creates_a_quantizer():
    sim, mp, _ = make("reshape_chain")
    assert row(sim, "fc2")["params"]["bias"] is None
    mp.set_precision(sim.model.fc2, activation=None, param={"bias": "int32"})
    mp.apply(log_file=None)
    assert row(sim, "fc2")["params"]["bias"] == "int32"


# rule 5: backend kernels -------------------------------------------------------------------------------


def test_backend_accepts_supported_kernel():
    sim, mp, _ = make("reshape_chain", config_file="edge_strict")
    mp.set_precision(sim.model.fc2, activation="int16", param={"weight": "int8"})
    report = mp.apply(log_file=None, strict=True)
    assert not report.kernel_findings


def test_backend_rejects_unsupported_kernel_and_changes_nothing():
    sim, mp, _ = make("reshape_chain", config_file="edge_strict")
    mp.set_precision(sim.model.fc2, activation="int4", param={"weight": "int4"})
    before = snapshot(sim)
    with pytest.raises(UnsupportedKernelError, match=r"fc2 \(Gemm\): activation int4, weight int4"):
        mp.apply(log_file=None, strict=True)
    assert snapshot(sim) == before
    with pytest.warns(UserWarning, match="no kernel"):
        report = mp.apply(log_file=None, strict=False)
    assert report.kernel_findings[0]["layer"] == "fc2"


# rule 6: all or nothing, clearing, building on the result -------------------------------------------------


def test_successful_apply_clears_requests_and_next_apply_builds_on_it():
    sim, mp, _ = make("linear_stack")
    mp.set_precision(sim.model.block[0], activation="int16")
    mp.apply(log_file=None)
    assert not mp.requests
    mp.set_precision(sim.model.head, activation="int4")
    report = mp.apply(log_file=None)
    assert row(sim, "block.0")["effective_inputs"] == ["int16"]
    assert row(sim, "head")["effective_inputs"] == ["int4"]
    # request ids keep counting across applies, so logs of successive applies never reuse one
    assert report.changes and all(c["request"] == 1 for c in report.changes)


def test_preview_changes_nothing_and_matches_apply():
    sim, mp, _ = make("small_cnn")
    mp.set_precision(sim.model.block1, activation="int16")
    before = snapshot(sim)
    preview = mp.preview().to_dict()
    assert snapshot(sim) == before
    applied = mp.apply(log_file=None).to_dict()
    preview.pop("applied"), applied.pop("applied")
    assert preview == applied


# rule 7: changing precision keeps settings and needs calibration ---------------------------------------------


def test_changed_quantizer_keeps_granularity_and_needs_calibration():
    sim, mp, example = make("small_cnn", config_file="per_channel")
    calibrate(sim, example)
    mp.set_precision(sim.model.stem, activation="int16", param={"weight": "int16"})
    mp.apply(log_file=None)
    q = sim.model.stem.param_quantizers["weight"]
    assert isinstance(q.granularity, mixprec.PerChannel) and q.symmetric
    assert not q.is_initialized()
    with pytest.raises(
        mixprec.EncodingNotComputedError, match=r"model input input\[0\]. \(int16\) has no encoding"
    ):
        sim.model(example)
    calibrate(sim, example)
    sim.model(example)


# requests: errors at call time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda sim, mp: mp.set_precision(sim.model.fc, activation="int17"),
            "unknown precision 'int17'.*accepted.*int16",
        ),
        (lambda sim, mp: mp.set_precision(nn.Linear(2, 2), activation="int16"), "not part of sim.model"),
        (
            lambda sim, mp: mp.set_precision(sim.model.fc, activation="int16", param={"wieght": "int8"}),
            "param 'wieght'.*available.*weight",
        ),
        (lambda sim, mp: mp.set_precision("blok1", activation="int16"), "matches no quantized layer.*block1"),
        (
            lambda sim, mp: mp.set_precision("nothing.*", activation="int16"),
            r"glob\) matches no quantized layer",
        ),
        (
            lambda sim, mp: mp.set_precision(sim.model.fc, activation=["int16", "int8"]),
            "2 entries but layer 'fc' has 1 input",
        ),
        (lambda sim, mp: mp.set_precision(42, activation="int16"), "is not accepted"),
    ],
    ids=[
        "bad-precision",
        "foreign-module",
        "param-typo",
        "name-typo",
        "glob-nothing",
        "list-length",
        "bad-target",
    ],
)
def test_bad_requests_raise_at_call_time_and_record_nothing(call, match):
    sim, mp, _ = make("small_cnn")
    with pytest.raises(RequestError, match=match):
        call(sim, mp)
    assert not mp.requests


def test_float_model_module_error_points_to_sim_copy():
    model, example = build("small_cnn")
    sim = QuantizationSimModel(model, dummy_input=example)
    mp = MixedPrecisionConfigurator(sim)
    with pytest.raises(RequestError, match=r"float model's module 'block1'"):
        mp.set_precision(model.block1, activation="int16")


# report --------------------------------------------------------------------------------------------------


def test_report_text_has_three_phases_and_changes_to_a_stream():
    sim, mp, _ = make("small_cnn")
    mp.set_precision(sim.model.block1, activation="int16")
    stream = io.StringIO()
    report = mp.apply(log_file=stream)
    text = stream.getvalue()
    for title in ["before preprocessing", "after preprocessing", "after propagation", "Quantizers changed"]:
        assert title in text
    assert set(report.to_dict()) == set(mixprec.report.model.REPORT_KEYS)


def test_tied_weight_request_sets_both_layers_and_report_says_so():
    sim, mp, _ = make("tied_embedding")
    mp.set_precision(sim.model.head, activation=None, param={"weight": "int16"})
    report = mp.apply(log_file=None)
    assert row(sim, "embed")["params"]["weight"] == "int16"
    assert row(sim, "head")["params"]["weight"] == "int16"
    change = next(c for c in report.changes if c["slot"] == "param weight")
    assert set(change["shared_by"]) == {"embed", "head"}


def test_tied_weight_conflict_strict_raises():
    sim, mp, _ = make("tied_embedding")
    mp.set_precision(sim.model.embed, activation=None, param={"weight": "int16"})
    mp.set_precision(sim.model.head, activation=None, param={"weight": "int4"})
    with pytest.raises(PrecisionConflictError, match="embed.weight"):
        mp.apply(log_file=None, strict=True)


# the seed's whole flow on torchvision models ----------------------------------------------------


def test_seed_flow_on_mobilenet_v2():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    x = torch.randn(1, 3, 96, 96)
    sim = QuantizationSimModel(
        model, dummy_input=x, default_param_bw=8, default_output_bw=8, config_file=None
    )
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(sim.model.features[1].conv[0][0], activation="int16", param={"weight": "int16"})  # leaf
    mp.set_precision(sim.model.features[3].conv[1], activation="int16", param={"weight": "int16"})  # non-leaf
    mp.set_precision(nn.AvgPool2d, activation="int16")  # type, none in this model
    mp.set_model_input_precision(activation="int16")
    mp.set_model_output_precision(activation="int16")
    report = mp.apply(log_file=io.StringIO())
    sim.compute_encodings(lambda m, _: m(x), None)
    assert torch.isfinite(sim.model(x)).all()
    table = {r["name"]: r for r in sim.precision_table()}
    assert table["features.1.conv.0.0"]["effective_inputs"] == ["int16"]
    assert table["features.1.conv.0.0"]["params"]["weight"] == "int16"
    for name in ["features.3.conv.1.0", "features.3.conv.1.1", "features.3.conv.1.2"]:
        assert table[name]["effective_inputs"] == ["int16"], name
    assert table["features.3.conv.1.0"]["params"]["weight"] == "int16"
    assert table["features.0.0"]["effective_inputs"] == ["int16"]  # model input
    assert table["classifier.1"]["outputs"] == ["int16"]  # model output
    assert [u["target"] for u in report.unmatched] == ["torch.nn.modules.pooling.AvgPool2d"]


def test_type_wide_conv_request_on_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    sim = QuantizationSimModel(model, dummy_input=x)
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(nn.Conv2d, activation="int16", param={"weight": "int16"})
    mp.apply(log_file=None)
    sim.compute_encodings(lambda m, _: m(x), None)
    assert torch.isfinite(sim.model(x)).all()
    convs = [r for r in sim.precision_table() if r["type"] == "Conv2d"]
    assert len(convs) == 20
    for r in convs:
        assert r["effective_inputs"] == ["int16"] and r["params"]["weight"] == "int16", r["name"]

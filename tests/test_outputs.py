"""Rule 4 (a requested layer emits its precision) and the report's precision changes (docs/rules.md)."""

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from mixprec import MixedPrecisionConfigurator, QuantizationSimModel
from mixprec.demo import build as build_demo
from mixprec.demo import seed_requests
from mixprec.errors import PrecisionConflictError

from .helpers import make
from .models import tiny_gpt2, tiny_llama


def row(sim, name):
    return next(r for r in sim.precision_table() if r["name"] == name)


def changes(report):
    return {c["layer"]: (c["inputs"], c["outputs"]) for c in report.precision_changes}


def test_lone_int16_layer_in_an_int8_chain_emits_int16():
    sim, mp, _ = make("linear_stack")
    mp.set_precision(sim.model.block[1], activation="int16")
    report = mp.apply(log_file=None)
    assert row(sim, "block.1")["outputs"] == ["int16"]
    assert row(sim, "block.2")["effective_inputs"] == ["int16"]
    assert row(sim, "block.2")["outputs"] == ["int8"]  # its reader is not drawn in: it keeps its output
    # block.0 requantizes to int16 for block.1; block.2 reads int16 and emits int8
    assert changes(report) == {"block.0": (["int8"], ["int16"]), "block.2": (["int16"], ["int8"])}
    assert report.precision_change_count == 2 == report.to_dict()["precision_change_count"]
    emitted = next(c for c in report.changes if c["quantizer"] == "block.1 output 0")
    assert (emitted["reason"], emitted["why"]) == ("emitted", "requested: output")


def test_int8_layer_in_an_int16_model_emits_int8():
    sim, mp, _ = make("reshape_chain", default_output_bw=16)
    mp.set_precision(sim.model.fc1, activation="int8")
    mp.apply(log_file=None)
    assert row(sim, "fc1")["outputs"] == ["int8"]
    assert row(sim, "fc2")["effective_inputs"] == ["int8"]  # through reshape, permute and flatten


def test_fused_layer_emits_at_the_end_of_its_group():
    sim, mp, _ = make("small_cnn")
    mp.set_precision(sim.model.block1[0], activation="int16")  # the conv of Conv+BN+ReLU
    report = mp.apply(log_file=None)
    assert row(sim, "block1.2")["outputs"] == ["int16"]
    assert row(sim, "block2.0")["effective_inputs"] == ["int16"]
    why = next(c["why"] for c in report.changes if c["quantizer"] == "block1.2 output 0")
    assert why == "requested: output of layer block1.0 (end of its fused group)"
    conv = next(r for r in report.requested_layers if r["layer"] == "block1.0")
    assert (conv["reads"], conv["computes"], conv["emits"], conv["why"]) == (
        ["int16"],
        "int16",
        ["int16"],
        [],
    )


@pytest.mark.parametrize(
    "target, emitting",
    [
        (nn.Conv2d, ["stem", "block1.2", "block2.2"]),  # by type: each conv's group end
        ("block*.0", ["block1.2", "block2.2"]),  # a glob
        (r"re:block2\.2", ["block2.2"]),  # a regex
        ("fc", ["fc"]),  # an exact name
    ],
    ids=["type", "glob", "regex", "name"],
)
def test_every_kind_of_target_emits(target, emitting):
    sim, mp, _ = make("small_cnn")
    mp.set_precision(target, activation="int16")
    mp.apply(log_file=None)
    for name in emitting:
        assert row(sim, name)["outputs"] == ["int16"], name


def test_function_target_emits_and_its_reader_reads_it():
    sim, mp, _ = make("functional")
    mp.set_precision(torch.matmul, activation="int16")
    report = mp.apply(log_file=None)
    assert row(sim, "matmul")["outputs"] == ["int16"]
    assert row(sim, "softmax")["effective_inputs"] == ["int16"]
    assert "softmax" in changes(report)  # reads int16, emits int8


def test_per_input_list_output_follows_its_first_entry():
    sim, mp, _ = make("add_relu")
    mp.set_precision("add", activation=["int16", "int8"])  # add is fused with the ReLU after it
    report = mp.apply(log_file=None)
    assert row(sim, "add")["effective_inputs"] == ["int16", "int8"]
    assert row(sim, "relu")["outputs"] == ["int16"]
    assert changes(report)["add"] == (["int16", "int8"], ["int16"])


def test_adjacent_leaf_requests_that_disagree_conflict_and_the_row_says_why():
    sim, mp, _ = make("linear_stack")
    mp.set_precision(sim.model.block[0], activation="int16")
    mp.set_precision(sim.model.block[1], activation="int8")
    with pytest.raises(
        PrecisionConflictError, match=r"block\.0 output 0: request 0 .* wants int16 .* request 1"
    ):
        mp.apply(log_file=None, strict=True)
    with pytest.warns(UserWarning) as caught:
        report = mp.apply(log_file=None, strict=False)
    # the warning and the log are built from the same lines
    assert report.conflict_lines()[0] in str(caught[0].message)
    first = next(r for r in report.requested_layers if r["layer"] == "block.0")
    assert first["emits"] == ["int8"]
    assert first["why"] == [
        "emits int8, not int16: request 1 set block.0 output 0 to int8 (the later request wins)"
    ]
    assert report.conflict_lines()[0] in report.to_text()


@pytest.mark.slow
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_lm_head_at_fp16_gives_fp16_logits(factory):
    model, inputs = factory()
    sim = QuantizationSimModel(model, dummy_input=inputs)
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(sim.model.lm_head, activation="fp16")  # no set_model_output_precision needed
    mp.apply(log_file=None)
    assert row(sim, "lm_head")["outputs"] == ["fp16"]
    sim.compute_encodings(lambda m, _: m(**inputs), None)
    logits = sim.model(**inputs).logits
    assert torch.equal(logits, logits.half().float())  # every value is an fp16 value
    assert logits.unique().numel() > 1000  # at int8 these logits take 201 (llama) and 163 (gpt2) values


def test_batchnorm_params_left_unquantized_print_as_a_dash():
    model, x = build_demo()
    mp = MixedPrecisionConfigurator(QuantizationSimModel(model, dummy_input=x))
    seed_requests(mp)
    log = io.StringIO()
    report = mp.apply(log_file=log)
    text = log.getvalue()
    assert "weight: None" not in text and "bias: None" not in text
    assert "| layer2.0.1   | 1          | [int16] | [int16] | weight: -, bias: -     |" in text
    assert (
        f"Precision changes (a convert or a mixed-precision kernel at deployment): {report.precision_change_count}"
        in text
    )


def test_every_report_key_is_documented():
    from mixprec.report.model import REPORT_KEYS, MixedPrecisionReport

    doc = MixedPrecisionReport.to_dict.__doc__
    rules = (Path(__file__).resolve().parents[1] / "docs" / "rules.md").read_text()
    for key in REPORT_KEYS:
        assert f"``{key}``" in doc, key
        assert f"`{key}`" in rules, key


def test_demo_help_says_what_it_does():
    from typer.testing import CliRunner

    from mixprec.cli import app

    result = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Six requests" in text and "five" not in text and "seed" not in text
    for words in (
        "every Linear at fp16",
        "the model input at int16",
        "the model output at fp16",
        "matching nothing",
    ):
        assert words in text, words

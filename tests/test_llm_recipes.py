"""The language-model recipes of docs/llm_recipes.md, on tiny transformers models (random weights)."""

import pytest
import torch
import torch.nn.functional as F

import mixprec
from mixprec import MixedPrecisionConfigurator, ParamSpec, PerBlock, QuantizationSimModel, forward_batches

from .helpers import sqnr_db
from .models import tiny_gpt2, tiny_llama


def build(factory=tiny_llama, **kwargs):
    model, inputs = factory(**kwargs)
    sim = QuantizationSimModel(model, dummy_input=inputs, config_file="per_channel")
    return model, inputs, sim, MixedPrecisionConfigurator(sim)


def finish(model, inputs, sim, report, bound):
    token_batches = [
        {
            "input_ids": torch.randint(0, 128, (2, 8)),
            "attention_mask": torch.ones(2, 8, dtype=torch.long),
            "use_cache": False,
        }
        for _ in range(3)
    ] + [inputs]
    sim.compute_encodings(forward_batches(token_batches, progress=False), None)
    with torch.no_grad():
        assert sqnr_db(model(**inputs).logits, sim.model(**inputs).logits) >= bound
    return report


def changed(report):
    return {(c["layer"], c["slot"]): c["new"] for c in report.changes}


def test_recipe_lm_head_fp16():
    model, inputs, sim, mp = build()
    mp.set_precision(sim.model.lm_head, activation="fp16", param={"weight": "fp16"})
    report = finish(model, inputs, sim, mp.apply(log_file=None), 25)
    assert changed(report)[("lm_head", "param weight")] == "fp16"
    assert changed(report)[("model.norm", "output 0")] == "fp16"  # lm_head reads the final norm at fp16


def test_recipe_softmax_and_attention_matmuls_int16():
    model, inputs, sim, mp = build(attention="eager")
    mp.set_precision(F.softmax, activation="int16", within="model.layers.*.self_attn.*")
    mp.set_precision(torch.matmul, activation="int16", within="model.layers.*.self_attn.*")
    report = finish(model, inputs, sim, mp.apply(log_file=None), 25)
    layers = {name for r in report.requests for name in r["layers"]}
    assert {"model.layers.0.self_attn.softmax", "model.layers.1.self_attn.softmax"} <= layers
    assert {"model.layers.0.self_attn.matmul", "model.layers.0.self_attn.matmul_1"} <= layers
    table = {r["name"]: r for r in sim.precision_table()}
    assert table["model.layers.1.self_attn.softmax"]["effective_inputs"] == ["int16"]
    assert table["model.layers.1.self_attn.matmul_1"]["effective_inputs"] == ["int16", "int16"]


def test_recipe_w4_block64_a16_mlps_w8a8_elsewhere():
    model, inputs, sim, mp = build()
    mp.set_precision(
        "model.layers.*.mlp.*_proj", activation="int16", param={"weight": ParamSpec("int4", PerBlock(64))}
    )
    report = finish(model, inputs, sim, mp.apply(log_file=None), 20)
    down = sim.model.model.layers[1].mlp.down_proj.param_quantizers["weight"]
    assert down.precision.name == "int4" and down.granularity == PerBlock(64)
    assert down.get_encoding().scale.shape == (64, 2)  # 64 output rows x (128 inputs / 64)
    q_proj = sim.model.model.layers[0].self_attn.q_proj.param_quantizers["weight"]
    assert q_proj.precision.name == "int8"
    assert any(c["granularity"] == "per_block(block_size=64, axis=1)" for c in report.changes)


def test_recipe_first_and_last_two_decoder_layers_int16():
    model, inputs, sim, mp = build(layers=5)
    decoder = sim.model.model.layers
    for layer in [decoder[0], decoder[1], decoder[-2], decoder[-1]]:
        mp.set_precision(layer, activation="int16", param={"weight": "int16"})
    finish(model, inputs, sim, mp.apply(log_file=None), 25)
    table = {r["name"]: r for r in sim.precision_table()}
    assert table["model.layers.0.self_attn.q_proj"]["params"]["weight"] == "int16"
    assert table["model.layers.4.mlp.down_proj"]["params"]["weight"] == "int16"
    assert table["model.layers.2.mlp.down_proj"]["params"]["weight"] == "int8"


def test_gpt2_tied_embedding_reports_one_precision():
    model, inputs, sim, mp = build(factory=tiny_gpt2)
    assert (
        sim.model.lm_head.param_quantizers["weight"] is sim.model.transformer.wte.param_quantizers["weight"]
    )
    mp.set_precision(sim.model.lm_head, activation=None, param={"weight": "int16"})
    report = mp.apply(log_file=None)
    change = next(c for c in report.changes if c["slot"] == "param weight")
    assert set(change["shared_by"]) == {"transformer.wte", "lm_head"}
    table = {r["name"]: r for r in sim.precision_table()}
    assert table["transformer.wte"]["params"]["weight"] == table["lm_head"]["params"]["weight"] == "int16"


def test_block_size_must_divide_the_input_dimension():
    _, _, sim, mp = build()
    with pytest.raises(mixprec.RequestError, match="not a multiple of block_size 48"):
        mp.set_precision(
            "model.layers.0.mlp.down_proj",
            activation=None,
            param={"weight": {"precision": "int4", "block_size": 48}},
        )


def test_per_block_on_transposed_conv1d_weight_is_a_clear_error():
    _, _, sim, mp = build(factory=tiny_gpt2)
    with pytest.raises(mixprec.RequestError, match="cannot be quantized per block.*Conv1D"):
        mp.set_precision(
            "transformer.h.0.mlp.c_fc",
            activation=None,
            param={"weight": {"precision": "int4", "block_size": 32}},
        )

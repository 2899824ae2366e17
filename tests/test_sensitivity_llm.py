"""Sensitivity on a transformers model: per decoder layer and per Linear, block-wise int4 weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixprec

from .models import tiny_llama

pytest.importorskip("transformers")

BLOCK = 16


def _setup(planted_layer: int = 1, only: str | None = None):
    """Tiny Llama with one outlier in every int4 block of one decoder layer's Linears (or just ``only``):
    an int4 grid spanning an outlier 20x the rest rounds the rest of its block to 0."""
    model, example = tiny_llama(layers=3)
    with torch.no_grad():
        for name, linear in model.model.layers[planted_layer].named_modules():
            if isinstance(linear, nn.Linear) and (only is None or name == only):
                linear.weight[:, ::BLOCK] *= 20.0
    gen = torch.Generator().manual_seed(5)
    batches = [
        {"input_ids": torch.randint(0, 128, (2, 8), generator=gen), "attention_mask": torch.ones(2, 8, dtype=torch.long),
         "use_cache": False}
        for _ in range(2)
    ]  # fmt: skip
    sim = mixprec.QuantizationSimModel(model, dummy_input=example)
    return sim, batches


BLOCKWISE = {"weight": {"precision": "int4", "block_size": BLOCK}}


@pytest.mark.slow
def test_per_decoder_layer_the_planted_layer_ranks_first() -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    sim, batches = _setup()
    rep = mixprec.analyze_sensitivity(
        sim, batches, targets=LlamaDecoderLayer, param=BLOCKWISE, layers=nn.Linear
    )
    assert [r.layer for r in rep.rows][0] == "model.layers.1"
    assert len(rep.rows) == 3 and rep.rows[0].delta < rep.rows[1].delta - 2.0
    assert rep.rows[0].local_sqnr_db < min(r.local_sqnr_db for r in rep.rows[1:]) - 5.0
    assert rep.rows[0].quantizers_changed == 7  # q, k, v, o, gate, up, down
    assert "PerBlock" in rep.rows[0].tried or "per_block" in rep.rows[0].tried.lower()
    profile = rep.suggest(max_kept=1)
    kept = [r.target for r in profile.requests if dict(r.param)["weight"].precision.name != "int4"]
    assert len(kept) == 7 and all(t.startswith("model.layers.1.") for t in kept)


@pytest.mark.slow
def test_per_linear_the_planted_linear_ranks_first_and_replay_is_exact() -> None:
    sim, batches = _setup(planted_layer=2, only="mlp.gate_proj")
    layer = sim.model.model.layers[2]
    with torch.no_grad():  # the outliers read features the norm zeroes: the signal is all in the rest
        layer.post_attention_layernorm.weight[::BLOCK] = 0.0
        layer.mlp.gate_proj.weight[:, ::BLOCK] *= 5.0
        layer.mlp.down_proj.weight *= 10.0  # and the MLP branch outweighs the residual stream
    decoder_linears = r"re:model\.layers\..*_proj"  # lm_head, next to the output, is sensitive anyway
    fast = mixprec.analyze_sensitivity(sim, batches, targets=decoder_linears, param=BLOCKWISE)
    full = mixprec.analyze_sensitivity(sim, batches, targets=decoder_linears, param=BLOCKWISE, fast=False)
    assert len(fast.rows) == 21 and fast.rows[0].layer == "model.layers.2.mlp.gate_proj"
    assert fast.rows[0].delta < fast.rows[1].delta - 2.0
    assert fast.rows[0].local_sqnr_db < 3.0  # its own output is lost
    assert [(r.layer, r.metric) for r in fast.rows] == [(r.layer, r.metric) for r in full.rows]
    assert fast.counts["replayed"] > 0 and fast.counts["fallbacks"] == 0

"""Language models as people run them: any dummy input, cache on/off, padding, labels, generate()."""

import warnings

import pytest
import torch

from mixprec import MixedPrecisionConfigurator, QuantizationSimModel

from .models import tiny_bart, tiny_gpt2, tiny_llama, tiny_qwen2, tiny_whisper

FACTORIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bart": tiny_bart}


def sqnr_db(reference, test):
    return (10 * torch.log10(reference.pow(2).mean() / (reference - test).pow(2).mean())).item()


def ids(batch, seq, seed):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def padded(batch, seq, left, seed):
    x = ids(batch, seq, seed)
    mask = torch.ones_like(x)
    if batch > 1:
        if left:
            mask[0, : seq // 3] = 0
        else:
            mask[0, seq - seq // 3 :] = 0
    return x, mask


def workload(model, encoder_decoder):
    """Every kind of forward this file checks: cache on/off, padding both sides, labels, generate."""
    for batch, seq in ((1, 7), (3, 16), (2, 40)):
        for left in (False, True):
            x, mask = padded(batch, seq, left, seed=batch * seq)
            extra = {"decoder_input_ids": x[:, :5]} if encoder_decoder else {}
            model(x, attention_mask=mask, **extra)
            model(x, attention_mask=mask, use_cache=False, **extra)
            model(x, attention_mask=mask, labels=x, use_cache=False)
        for use_cache in (True, False):
            model.generate(
                x[:, :6], attention_mask=mask[:, :6], max_new_tokens=3, do_sample=False, use_cache=use_cache
            )


def dummy_of(kind, encoder_decoder):
    x = ids(2, 8, seed=1)
    extra = {"decoder_input_ids": x[:, :4]} if encoder_decoder else {}
    if kind == "tensor":
        return x if not encoder_decoder else {"input_ids": x, **extra}
    if kind == "tuple":
        return (x,) if not encoder_decoder else {"input_ids": x, "labels": x[:, :4]}
    if kind == "dict_cache_off":
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "use_cache": False, **extra}
    from transformers import BatchEncoding

    return BatchEncoding({"input_ids": x, "attention_mask": torch.ones_like(x), **extra})


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, dummy",
    [("llama", "tensor"), ("llama", "dict_cache_off"), ("qwen2", "batch_encoding"), ("gpt2", "tuple"),
     ("bart", "dict_cache_off")],
)  # fmt: skip
def test_forwards_people_run_are_quantized(name, dummy):
    model, _ = FACTORIES[name]()
    encoder_decoder = name == "bart"
    sim = QuantizationSimModel(model, dummy_input=dummy_of(dummy, encoder_decoder), config_file="per_channel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on generate's defaults
        sim.compute_encodings(lambda m, _: workload(m, encoder_decoder), None)
        quantizers = [q for _, q in sim.quantizers()]
        assert quantizers and all(q.is_initialized() for q in quantizers)
        table = {row["name"] for row in sim.precision_table()}
        assert any(".kv_cache.key" in n for n in table) and any(".kv_cache.value" in n for n in table)
        with torch.no_grad():
            # every path runs quantized: no error, and outputs are not the float model's
            workload(sim.model, encoder_decoder)
            x, mask = padded(3, 16, True, seed=7)
            extra = {"decoder_input_ids": x[:, :5]} if encoder_decoder else {}
            for use_cache in (True, False):
                out = sim.model(x, attention_mask=mask, use_cache=use_cache, **extra).logits
                ref = model(x, attention_mask=mask, use_cache=use_cache, **extra).logits
                kept = mask.bool() if not encoder_decoder else slice(None)  # padded queries are noise
                assert not torch.equal(out, ref) and sqnr_db(ref[kept], out[kept]) > 15
            loss = sim.model(x, attention_mask=mask, labels=x).loss
            assert torch.isfinite(loss)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_kv_cache_recipe(precision):
    model, _ = tiny_llama()
    prompt = ids(2, 6, seed=3)
    sim = QuantizationSimModel(model, dummy_input=prompt, default_output_bw=16, config_file="per_channel")
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision("model.layers.*.self_attn.kv_cache.*", activation=precision)
    mp.apply()
    rows = {row["name"]: row for row in sim.precision_table()}
    expected = "fp8_e4m3" if precision == "fp8" else "int8"
    for layer in (0, 1):
        for role in ("key", "value"):
            assert rows[f"model.layers.{layer}.self_attn.kv_cache.{role}"]["outputs"] == [expected]
        # sdpa is decomposed in the sim: Q·K^T reads the cached keys, weights·V the cached values
        assert rows[f"model.layers.{layer}.self_attn.matmul"]["effective_inputs"][1] == expected
        assert rows[f"model.layers.{layer}.self_attn.matmul_1"]["effective_inputs"][1] == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim.compute_encodings(lambda m, _: m.generate(prompt, max_new_tokens=4, do_sample=False), None)
        out = sim.model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 10)


def kv_quantizer(sim, layer, role):
    cache = sim.graph.layer(f"model.layers.{layer}.self_attn.kv_cache.{role}")
    return sim._layer_quantizers[cache.index].output_quantizers[0]


@pytest.mark.parametrize("first", ["dynamic", "static"])
def test_static_cache_writes_are_the_kv_cache_layers(first):
    """``cache_implementation="static"`` stores keys with ``index_copy_``, not ``cat``: its writes are
    the same ``kv_cache`` layers, so a KV-cache request reaches them whichever cache ran first."""
    from transformers import StaticCache

    model, _ = tiny_llama()
    prompt = ids(2, 6, seed=3)
    dummy = prompt if first == "dynamic" else {"input_ids": prompt, "use_cache": False}
    sim = QuantizationSimModel(model, dummy_input=dummy, default_output_bw=16, config_file="per_channel")

    def generate(m, cache):
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        return m.generate(prompt, max_new_tokens=4, do_sample=False, **extra)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim.compute_encodings(
            lambda m, _: generate(m, first), None
        )  # creates the cache layers if built without
        mp = MixedPrecisionConfigurator(sim)
        mp.set_precision("model.layers.*.self_attn.kv_cache.*", activation="int8")
        mp.apply()
        sim.compute_encodings(lambda m, _: generate(m, first), None)
        for layer in (0, 1):
            for role in ("key", "value"):
                # a grid of their own: the keys' producer (rotary add_1) is at int8 too (rule 2)
                kv_quantizer(sim, layer, role).set_range(-0.25, 0.25)
        layers = [layer.name for layer in sim.graph.layers]
        with torch.no_grad():
            tokens = {cache: generate(sim.model, cache) for cache in ("dynamic", "static")}
            static = StaticCache(config=model.config, max_cache_len=12)
            sim.model(prompt, past_key_values=static, use_cache=True)
    assert [layer.name for layer in sim.graph.layers] == layers  # the other cache made no new layer
    assert sum(".kv_cache." in name for name in layers) == 4
    assert torch.equal(tokens["dynamic"], tokens["static"])
    for layer in (0, 1):
        for role, stored in (("key", static.layers[layer].keys), ("value", static.layers[layer].values)):
            q = kv_quantizer(sim, layer, role)
            assert str(q.precision) == "int8"
            # what the static cache holds is on the KV cache's grid, clipped to its range
            assert stored[:, :, :6].abs().sum() > 0 and torch.equal(q(stored), stored)
            assert stored.abs().max() <= 0.26


def test_encoder_run_on_its_own_by_generate_is_quantized():
    """``generate()`` of an encoder-decoder calls ``model.get_encoder()`` directly, outside
    ``sim.model``'s forward: its functional calls (attention matmuls, softmax, residual adds) are
    still the sim's sites, calibrated by a generate-only callback and quantized as in a forward."""
    model, _ = tiny_bart()
    x = ids(2, 6, seed=3)
    sim = QuantizationSimModel(model, dummy_input={"input_ids": x, "decoder_input_ids": x[:, :2]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim.compute_encodings(lambda m, _: m.generate(x, max_new_tokens=3, do_sample=False), None)
    encoder_quantizers = [q for _, q in sim.quantizers() if q.label.startswith("model.encoder.")]
    assert any(".self_attn.softmax " in q.label for q in encoder_quantizers)
    assert all(q.is_initialized() for q in encoder_quantizers)
    with torch.no_grad():
        inside = sim.model(input_ids=x, decoder_input_ids=x[:, :2]).encoder_last_hidden_state
        alone = sim.model.get_encoder()(input_ids=x).last_hidden_state
        reference = model.get_encoder()(input_ids=x).last_hidden_state
    assert torch.equal(alone, inside) and not torch.equal(alone, reference)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_recomputes_the_quantized_forward(reentrant):
    """QAT with ``gradient_checkpointing_enable()``: transformers recomputes each decoder layer's
    ``forward`` in the backward pass, outside any module call; the recomputation is quantized as
    the forward was, so loss and gradients equal those without checkpointing, bit for bit."""
    model, _ = tiny_llama()
    x = ids(2, 8, seed=1)
    sim = QuantizationSimModel(model, dummy_input={"input_ids": x, "use_cache": False})
    sim.compute_encodings(lambda m, _: m(input_ids=x, use_cache=False), None)
    sim.model.train()

    def loss_and_grads():
        sim.model.zero_grad()
        loss = sim.model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in sim.model.parameters() if p.grad is not None]

    plain_loss, plain_grads = loss_and_grads()
    sim.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    loss, grads = loss_and_grads()
    assert torch.equal(loss, plain_loss) and len(grads) == len(plain_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))
    assert sim.runtime.state() is None and torch._C._len_torch_function_stack() == 0


def test_float_model_input_of_an_encoder_decoder_is_quantized_where_generate_passes_it():
    """Whisper's ``generate()`` runs the encoder on ``input_features`` by itself, then the model on
    ``encoder_outputs`` and the tokens: the features take their model input quantizer (in the
    encoder's own call), the token ids and encoder outputs take none of it."""
    model = tiny_whisper()
    features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)) * 3
    start = torch.tensor([[1, 5, 7], [1, 9, 4]])
    sim = QuantizationSimModel(model, dummy_input={"input_features": features, "decoder_input_ids": start})
    sim.compute_encodings(lambda m, _: m(input_features=features, decoder_input_ids=start), None)
    seen = []
    [q] = [q for q in sim.runtime.input_quantizers if q is not None]
    q.register_forward_pre_hook(lambda q, args: seen.append(args[0]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = sim.model(input_features=features, decoder_input_ids=start)
        alone = sim.model.get_encoder()(input_features=features).last_hidden_state
        split = sim.model(encoder_outputs=(alone,), decoder_input_ids=start).logits
        seen.clear()
        sim.model.generate(input_features=features, max_new_tokens=3, do_sample=False)
    assert torch.equal(alone, full.encoder_last_hidden_state) and torch.equal(split, full.logits)
    assert len(seen) == 1 and torch.equal(seen[0], features)  # once, the features (not token ids)


def test_float_argument_the_dummy_did_not_have_is_named_in_a_warning(caplog):
    """Built from token ids, a Llama given ``inputs_embeds`` (by a call or by ``generate()``) runs
    them unquantized, as no model input quantizer is keyed by that name: the log says so, once."""
    model, _ = tiny_llama()
    x = ids(2, 7, seed=5)
    sim = QuantizationSimModel(model, dummy_input=x)
    sim.compute_encodings(lambda m, _: m(x), None)
    embeds = sim.model.get_input_embeddings()(x)
    logger = "mixprec.sim.model_inputs"
    with torch.no_grad(), caplog.at_level("WARNING", logger=logger):
        sim.model(x)
        sim.model(x, attention_mask=torch.ones_like(x), use_cache=False)
        assert not [r for r in caplog.records if r.name == logger]
        sim.model(inputs_embeds=embeds)
        sim.model.generate(inputs_embeds=embeds, max_new_tokens=2, do_sample=False)
    told = [r.getMessage() for r in caplog.records if r.name == logger]
    assert len(told) == 1 and "'inputs_embeds'" in told[0] and "unquantized" in told[0]


def test_sdpa_attention_is_controllable_like_eager_attention():
    import torch.nn.functional as F

    from mixprec import forward_batches

    x = ids(2, 16, seed=99)
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding
    results = {}
    for attention in ("eager", "sdpa"):
        model, inputs = tiny_llama(attention=attention)
        sim = QuantizationSimModel(model, dummy_input=inputs, config_file="per_channel")
        mp = MixedPrecisionConfigurator(sim)
        mp.set_precision(F.softmax, activation="int16", within="model.layers.*.self_attn.*")
        mp.set_precision(torch.matmul, activation="int16", within="model.layers.*.self_attn.*")
        report = mp.apply(strict=True)
        assert any(
            "self_attn.softmax" in c["layer"] or "self_attn.matmul" in c["layer"] for c in report.changes
        )
        batches = [{"input_ids": ids(2, 16, seed=i), "use_cache": False} for i in range(3)]
        sim.compute_encodings(forward_batches(batches, progress=False), None)
        with torch.no_grad():
            ref = model(x, attention_mask=mask, use_cache=False).logits[mask.bool()]
            out = sim.model(x, attention_mask=mask, use_cache=False).logits[mask.bool()]
        results[attention] = (sqnr_db(ref, out), {r["name"] for r in sim.precision_table()})
    # same layers but the eager mask add, whose int8 output cannot hold both the scores and -3e38
    assert results["eager"][1] - results["sdpa"][1] == {f"model.layers.{i}.self_attn.add_2" for i in (0, 1)}
    assert results["sdpa"][0] >= results["eager"][0] - 0.5
    assert "model.layers.0.self_attn.softmax" in results["sdpa"][1]


def test_request_matching_nothing_warns_naming_it():
    model, inputs = tiny_gpt2()
    sim = QuantizationSimModel(model, dummy_input=inputs)
    with pytest.warns(UserWarning, match=r"set_precision\(torch.*bmm.* matches no quantized layer"):
        MixedPrecisionConfigurator(sim).set_precision(torch.bmm, activation="int16")


def more_decoders():
    """Tiny configs of other decoder families, each with its own attention and cache code."""
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    sized = dict(common, intermediate_size=128, max_position_embeddings=128)
    return {
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, **sized)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=2, head_dim=16, **sized)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **sized)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**sized)),
        "opt": lambda: tf.OPTForCausalLM(
            tf.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128, **common)
        ),
        "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(**common)),
    }


@pytest.mark.parametrize("name", ["mistral", "gemma", "phi3", "gpt_neox", "opt", "falcon"])
def test_other_decoder_families_run_quantized_with_a_kv_cache_recipe(name, tmp_path):
    from transformers import BatchEncoding

    torch.manual_seed(0)
    model = more_decoders()[name]().eval()
    x = ids(2, 7, seed=2)
    sim = QuantizationSimModel(
        model, dummy_input=BatchEncoding({"input_ids": x, "attention_mask": torch.ones_like(x)}),
        config_file="per_channel",
    )  # fmt: skip
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision("*.kv_cache.*", activation="int16")
    report = mp.apply(log_file=None)
    cache_rows = [r for r in sim.precision_table() if ".kv_cache." in r["name"]]
    assert len(cache_rows) == 4 and all(r["outputs"] == ["int16"] for r in cache_rows)
    assert report.to_dict()["unmatched"] == []

    def calibrate(m, _):
        for left in (False, True):
            x, mask = padded(3, 16, left, seed=5)
            m(x, attention_mask=mask)
            m(x, attention_mask=mask, labels=x, use_cache=False)
        m.generate(x[:1, :6], max_new_tokens=3, do_sample=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim.compute_encodings(calibrate, None)
        x, mask = padded(3, 40, True, seed=9)
        with torch.no_grad():
            for use_cache in (True, False):
                out = sim.model.generate(x[1:2, :9], max_new_tokens=4, do_sample=False, use_cache=use_cache)
                assert out.shape == (1, 13)
            logits = sim.model(x, attention_mask=mask).logits
            ref = model(x, attention_mask=mask).logits
            kept = mask.bool()
            assert not torch.equal(logits, ref) and sqnr_db(ref[kept], logits[kept]) > 15
            assert torch.isfinite(sim.model(x, attention_mask=mask, labels=x).loss)
            torch.save(sim.model, tmp_path / "sim.pt")
            loaded = torch.load(tmp_path / "sim.pt", weights_only=False)
            assert torch.equal(loaded(x, attention_mask=mask).logits, logits)

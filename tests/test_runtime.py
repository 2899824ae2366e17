"""The quantized forward at run time: new paths, loops, threads, isolation, saving, weight edits."""

import copy
import io
import threading

import pytest
import torch
from torch import nn

from mixprec import EncodingNotComputedError, MixedPrecisionConfigurator, QuantizationSimModel

from .helpers import with_block_sim
from .models import build


def calibrated(name, *batches, **kwargs):
    model, x = build(name)
    sim = QuantizationSimModel(model, dummy_input=x, **kwargs)
    batches = batches or (x,)
    sim.compute_encodings(lambda m, _: [m(b) for b in batches], None)
    return model, x, sim


def rows(sim):
    return {r["name"]: r for r in sim.precision_table()}


def test_module_on_a_path_not_taken_at_build_gets_quantizers():
    model, x, sim = calibrated("branchy")
    assert "b" not in rows(sim)
    neg = -x
    with pytest.raises(
        EncodingNotComputedError, match=r"layer 'b' first ran in this forward.*b input 0|layer 'b'"
    ):
        sim.model(neg)
    assert rows(sim)["b"]["params"]["weight"] == "int8"
    with pytest.warns(UserWarning, match=r"no data reached .*a output 0"):
        sim.compute_encodings(lambda m, _: m(neg), None)
    assert rows(sim)["sigmoid"]["outputs"] == ["int8"]
    out = sim.model(neg)
    with torch.no_grad():
        assert not torch.equal(out, model(neg))
        assert (out - model(neg)).abs().max() < 0.1
    # the recorded branch still runs, with its old encodings
    sim.model(x)


class FunctionBranch(nn.Module):
    """Runs ``fn`` on the linear's output only for inputs of small mean (off the dummy's path)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.a = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.head(self.fn(h) if x.mean() < 0.5 else h)


@pytest.mark.parametrize(
    ("fn", "layer"),
    [(torch.sin, "sin"), (torch.erf, "erf"), (nn.functional.hardswish, "hardswish"),
     (nn.functional.leaky_relu, "leaky_relu"), (torch.Tensor.abs, "abs")],
    ids=["sin", "erf", "hardswish", "leaky_relu", "abs"],
)  # fmt: skip
def test_function_on_a_path_not_taken_at_build_gets_quantizers(fn, layer):
    """Not only functions with an op type in the config: any compute function first met on a new
    path becomes a layer (never a silent float)."""
    torch.manual_seed(0)
    model = FunctionBranch(fn).eval()
    x = torch.rand(2, 6) + 1
    small = x * 0.1  # inside the calibrated input range, on the other path
    sim = QuantizationSimModel(model, dummy_input=x)
    sim.compute_encodings(lambda m, _: m(x), None)
    assert layer not in rows(sim)
    with pytest.raises(EncodingNotComputedError, match=f"layer '{layer}' first ran in this forward"):
        sim.model(small)
    assert rows(sim)[layer]["outputs"] == ["int8"]
    sim.compute_encodings(lambda m, _: [m(x), m(small)], None)
    seen = {}
    handle = sim.model.head.register_forward_pre_hook(lambda m, args: seen.update(h=args[0]))
    with torch.no_grad():
        sim.model(small)
    handle.remove()
    q = sim._layer_quantizers[sim.graph.layer(layer).index].output_quantizers[0]
    assert torch.equal(q(seen["h"]), seen["h"])  # the head reads the function's output on its grid


def test_new_layer_is_targetable_and_recalibrated():
    model, x, sim = calibrated("branchy", torch.randn(2, 6).abs(), -torch.randn(2, 6).abs())
    assert {"a", "b", "sigmoid"} <= set(rows(sim))
    config = MixedPrecisionConfigurator(sim)
    config.set_precision(sim.model.b, activation="int16", param={"weight": "int4"})
    config.apply()
    assert rows(sim)["b"]["params"]["weight"] == "int4" and rows(sim)["a"]["params"]["weight"] == "int8"
    neg = -torch.randn(2, 6).abs()
    sim.compute_encodings(lambda m, _: m(neg), None)
    assert sim.model.b.param_quantizers["weight"].get_encoding().bitwidth == 4
    sim.model(neg)


def test_every_loop_iteration_is_a_layer_and_more_iterations_grow():
    model, x, sim = calibrated("looped")
    names = set(rows(sim))
    assert {"fc", "fc#1", "fc#2", "add", "add_1", "add_2", "tanh_2"} <= names and "fc#3" not in names
    with pytest.raises(EncodingNotComputedError, match="fc#3"):
        sim.model(x, n=5)
    sim.compute_encodings(lambda m, _: m(x, n=5), None)
    assert {"fc#3", "fc#4", "add_4", "tanh_4"} <= set(rows(sim))
    fc = sim.model.fc.mixprec_sites
    assert len(fc) == 5 and fc[4].output_quantizers[0].is_initialized()
    sim.model(x, n=5)


def test_concurrent_forwards_equal_serial_results():
    _, x, sim = calibrated("functional")
    inputs = [torch.randn(*x.shape) for _ in range(24)]
    with torch.no_grad():
        serial = [sim.model(t) for t in inputs]
    results = [None] * len(inputs)
    errors = []

    def work(offset):
        try:
            with torch.no_grad():
                for i in range(offset, len(inputs), 3):
                    results[i] = sim.model(inputs[i])
        except Exception as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(a, b) for a, b in zip(serial, results, strict=True))


def test_models_run_inside_the_sim_forward_are_untouched():
    model, x, sim = calibrated("functional")
    other_model, _ = build("functional")  # same class, float
    _, _, other_sim = calibrated("functional", default_output_bw=4)
    seen = {}

    def hook(module, args, output):
        seen["float"] = other_model(x)
        seen["sim"] = other_sim.model(x)

    with torch.no_grad():
        alone_float, alone_sim, alone_self = other_model(x), other_sim.model(x), sim.model(x)
        handle = sim.model.q.register_forward_hook(hook)
        inside = sim.model(x)
        handle.remove()
    assert torch.equal(seen["float"], alone_float)
    assert torch.equal(seen["sim"], alone_sim)
    assert torch.equal(inside, alone_self)
    assert not set(rows(sim)) - set(rows(copy.deepcopy(sim)))  # no layers were added by the hook


def test_torch_save_load_deepcopy_and_state_dict_round_trips():
    model, x, sim = calibrated("small_cnn")
    with torch.no_grad():
        expected = sim.model(x)
    buffer = io.BytesIO()
    torch.save(sim.model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(sim)
    fresh = QuantizationSimModel(model, dummy_input=x)
    fresh.model.load_state_dict(sim.model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        assert torch.equal(copied.model(x), expected)
        assert torch.equal(fresh.model(x), expected)
    assert isinstance(loaded.stem, nn.Conv2d) and type(loaded.stem) is nn.Conv2d


def test_deepcopied_sim_grows_on_new_paths():
    _, x, sim = calibrated("branchy")
    copied = copy.deepcopy(sim)
    with pytest.raises(EncodingNotComputedError, match="layer 'b'"):
        copied.model(-x)
    assert "b" in rows(copied) and "b" not in rows(sim)


@pytest.mark.parametrize("edit", ["data_assign", "copy_", "load_state_dict", "optimizer"])
def test_weight_edits_show_in_the_next_forward(edit):
    _, x, sim = calibrated("reshape_chain")
    fc = sim.model.fc1
    with torch.no_grad():
        before = sim.model(x)
        sim.model(x)  # the cached fake-quantized weight is in use now
        new = fc.weight.detach() * 0.5
        if edit == "data_assign":
            fc.weight.data = new.clone()
        elif edit == "copy_":
            fc.weight.copy_(new)
        elif edit == "load_state_dict":
            state = sim.model.state_dict()
            state["fc1.weight"] = new.clone()
            sim.model.load_state_dict(state)
    if edit == "optimizer":
        optimizer = torch.optim.SGD([fc.weight], lr=1.0)
        fc.weight.grad = fc.weight.detach() * 0.5
        optimizer.step()
    with torch.no_grad():
        after = sim.model(x)
        sim.cache_quantized_weights = False
        uncached = sim.model(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, uncached)


def test_call_sites_do_not_depend_on_source_files():
    source = (
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return torch.relu(self.fc(x)) + x\n"
    )
    names = []
    for filename in ("<one>", "mixprec/internal.py"):
        scope = {}
        exec(compile(source, filename, "exec"), scope)
        torch.manual_seed(0)
        sim = QuantizationSimModel(scope["M"](), dummy_input=torch.randn(2, 4))
        names.append(list(rows(sim)))
    assert names[0] == names[1] == ["fc", "relu", "add"]


def test_mapping_dummy_input_is_keyword_inputs():
    from transformers import BatchEncoding

    model, x = build("reshape_chain")
    sim = QuantizationSimModel(model, dummy_input=BatchEncoding({"x": x}))
    assert [io.path for io in sim.graph.inputs] == ["x"]


def test_compiled_sim_traces_one_graph_and_matches_eager():
    _, x, sim = calibrated("functional")
    torch._dynamo.reset()
    with torch.no_grad():
        eager = sim.model(x)
        explained = torch._dynamo.explain(sim.model)(x)
        compiled = torch.compile(sim.model, fullgraph=True, backend="aot_eager")(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert torch.allclose(compiled, eager, atol=1e-6)


class TransientActivation(nn.Module):
    """Creates its activation module in the forward (as transformers' ``ACT2FN[...]`` does): a
    module of no sim, whose functional call comes before another call of the same function."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.fc(x).chunk(2, dim=-1)
        return nn.SiLU()(a) * torch.nn.functional.silu(gate)


def test_calls_inside_activations_created_in_the_forward_line_up_with_their_sites():
    # Mamba: capture saw the transient activation's silu as call 0 and the gate's as call 1; the
    # runtime used to skip the former, so the gate took call 0's quantizer and call 1 never ran.
    x = torch.randn(3, 6)
    sim = QuantizationSimModel(TransientActivation().eval(), dummy_input=x)
    sim.compute_encodings(lambda m, _: m(x), None)
    names = [layer.name for layer in sim.graph.layers]
    assert "silu" in names and "silu_1" in names
    assert all(q.is_initialized() for _, q in sim.quantizers())
    silu_a = dict((sim.describe(p), q) for p, q in sim.quantizers())["silu output 0"]
    with torch.no_grad():
        a = sim.model.fc(x).chunk(2, dim=-1)[0]
    assert silu_a.get_encoding().max.item() == pytest.approx(
        torch.nn.functional.silu(a).max().item(), rel=0.02
    )


def test_submodule_called_on_its_own_runs_its_functional_calls_quantized():
    """What generate() does with an encoder: a non-leaf submodule of the sim called directly."""
    model, x, sim = with_block_sim()
    inside = {}
    handle = sim.model.block.register_forward_hook(lambda m, args, out: inside.update(x=args[0], out=out))
    with torch.no_grad():
        sim.model(x)
        handle.remove()
        # its input as given (inside, the model input's quantizer had made it)
        alone = sim.model.block(inside["x"])
        assert torch.equal(alone, inside["out"]) and not torch.equal(alone, model.block(inside["x"]))
        with pytest.raises(RuntimeError):
            sim.model.block(torch.randn(4, 5))  # raises inside the forward it opened
        assert torch._C._len_torch_function_stack() == 0 and sim.runtime.state() is None
        assert torch.equal(sim.model.block(inside["x"]), alone)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(
        self, image: torch.Tensor, extra: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.a(image) + self.b(extra)
        return out if ids is None else out + ids.unsqueeze(-1)


def test_model_inputs_take_their_quantizer_by_argument_name():
    """Positional or keyword, in any order, with or without other arguments: each model input is
    quantized by its own quantizer, and an integer argument by none."""
    torch.manual_seed(0)
    model = TwoInputs().eval()
    image, extra = torch.rand(2, 6) * 8, torch.rand(2, 6) * 0.1  # very different ranges
    ids = torch.tensor([3, 1])
    sim = QuantizationSimModel(model, dummy_input={"image": image, "extra": extra, "ids": ids})
    sim.compute_encodings(lambda m, _: m(image, extra, ids), None)
    seen = []
    for q in sim.runtime.input_quantizers:
        if q is not None:
            q.register_forward_pre_hook(lambda q, args: seen.append((q.label, args[0])))
    with torch.no_grad():
        reference = sim.model(image, extra, ids)
        assert torch.equal(sim.model(ids=ids, extra=extra, image=image), reference)
        assert torch.equal(sim.model(image, ids=ids, extra=extra), reference)
        seen.clear()
        sim.model(extra=extra, image=image)
    assert sorted((label, t.data_ptr()) for label, t in seen) == sorted(
        [("model input extra", extra.data_ptr()), ("model input image", image.data_ptr())]
    )


def test_submodule_called_on_its_own_quantizes_only_model_inputs_read_inside_it():
    """resnet18's blocks name their argument ``x`` as the model does; only a module that reads the
    model's image inside it (the model itself) applies the image's quantizer to its argument."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    image = torch.randn(2, 3, 32, 32)
    sim = QuantizationSimModel(model, dummy_input=image)
    sim.compute_encodings(lambda m, _: m(image), None)
    seen = []
    [q] = [q for q in sim.runtime.input_quantizers if q is not None]
    q.register_forward_pre_hook(lambda q, args: seen.append(args[0]))
    features = torch.randn(2, 64, 8, 8) * 50  # far outside the image's range
    with torch.no_grad():
        sim.model.layer1[0](features)
        assert seen == []
        _, x, block_sim = with_block_sim()  # WithBlock's block reads the model input x itself
        [block_q] = [q for q in block_sim.runtime.input_quantizers if q is not None]
        block_q.register_forward_pre_hook(lambda q, args: seen.append(args[0]))
        block_sim.model.block(x)
    assert len(seen) == 1 and seen[0] is x

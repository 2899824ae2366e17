"""QuantizationSimModel on tiny models, torchvision and transformers models (random weights)."""

import copy

import pytest
import torch
from torch import nn

import mixprec
from mixprec import EncodingNotComputedError, QuantizationSimModel

from .helpers import calibrate, sqnr_db
from .models import build, tiny_gpt2, tiny_llama


def rows(sim):
    return {r["name"]: r for r in sim.precision_table()}


def test_float_model_is_never_modified():
    model, x = build("small_cnn")
    before = copy.deepcopy(model.state_dict())
    sim = QuantizationSimModel(model, dummy_input=x)
    calibrate(sim, x)
    assert type(model.stem) is nn.Conv2d and not hasattr(model.stem, "mixprec_sites")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sim.model is not model


def test_in_place_quantizes_the_given_model():
    model, x = build("small_cnn")
    sim = QuantizationSimModel(model, dummy_input=x, in_place=True)
    assert (
        sim.model is model and isinstance(model.stem, nn.Conv2d) and hasattr(model.stem, "param_quantizers")
    )


def test_functional_layers_are_quantized_without_preparation():
    model, x = build("functional")
    sim = QuantizationSimModel(model, dummy_input=x)
    table = rows(sim)
    for name in ["matmul", "softmax", "relu", "add_1", "mean", "cat"]:
        assert table[name]["outputs"] == ["int8"], name
    assert table["add"]["outputs"] == [None]  # Add+Relu supergroup: the relu quantizes
    calibrate(sim, x)
    with torch.no_grad():
        y_float, y_sim = model(x), sim.model(x)
    assert not torch.equal(y_float, y_sim)
    assert sqnr_db(y_float, y_sim) > 20
    # the functional quantizers actually ran: a cat output lies on its quantizer's grid
    cat_q = sim.model.mixprec_functional["cat"].output_quantizers[0]
    enc = cat_q.get_encoding()
    steps = y_sim / enc.scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)


def test_precision_table_rows_and_supergroups():
    model, x = build("small_cnn")
    sim = QuantizationSimModel(model, dummy_input=x)
    table = rows(sim)
    assert set(table["block1.0"]) == {"name", "type", "params", "inputs", "outputs", "effective_inputs"}
    # Conv+BN+ReLU: the conv and the folded BN have no output quantizer; the ReLU closes the group
    assert table["block1.0"]["outputs"] == [None]
    assert table["block1.1"]["outputs"] == [None] and table["block1.1"]["params"] == {
        "weight": None,
        "bias": None,
    }
    assert table["block1.2"]["outputs"] == ["int8"]
    assert table["block1.0"]["params"] == {"weight": "int8", "bias": None}
    assert table["stem"]["effective_inputs"] == ["int8"]  # the model-input quantizer
    assert table["block1.2"]["type"] == "ReLU"
    assert "flatten" not in table  # data movement owns no quantizer


def test_forward_before_calibration_names_the_quantizer():
    model, x = build("reshape_chain")
    sim = QuantizationSimModel(model, dummy_input=x)
    with pytest.raises(EncodingNotComputedError, match=r"model input input\[0\].*compute_encodings"):
        sim.model(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"default_output_bw": 1}, "default_output_bw=1"), ({"default_param_bw": 12, "default_data_type": "float"}, "float bitwidth"),
     ({"quant_scheme": "minmax"}, "tf_enhanced"), ({"default_data_type": "double"}, "default_data_type")],
    ids=["bw-1", "float-12", "scheme", "data-type"],
)  # fmt: skip
def test_bad_constructor_arguments(kwargs, match):
    model, x = build("reshape_chain")
    with pytest.raises(ValueError, match=match):
        QuantizationSimModel(model, dummy_input=x, **kwargs)


def test_float_data_type_gives_fp16_quantizers():
    model, x = build("reshape_chain")
    sim = QuantizationSimModel(
        model, dummy_input=x, default_output_bw=16, default_param_bw=16, default_data_type=float
    )
    assert rows(sim)["fc1"]["outputs"] == ["fp16"] and rows(sim)["fc1"]["params"]["weight"] == "fp16"
    sim.model(x)  # fp16 needs no calibration


def test_module_called_twice_gets_quantizers_per_call_site():
    model, x = build("reused_relu")
    sim = QuantizationSimModel(model, dummy_input=x)
    table = rows(sim)
    assert table["relu"]["outputs"] == ["int8"] and table["relu#1"]["outputs"] == ["int8"]
    sites = sim.model.relu.mixprec_sites
    assert len(sites) == 2 and sites[0].output_quantizers[0] is not sites[1].output_quantizers[0]
    calibrate(sim, x)
    assert not torch.equal(
        sites[0].output_quantizers[0].get_encoding().scale, sites[1].output_quantizers[0].get_encoding().scale
    )


def test_branch_not_taken_at_build_is_quantized_when_it_runs():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return torch.add(y, 1) if x.shape[0] == 2 else torch.mul(y, 2)

    model = Branchy().eval()
    sim = QuantizationSimModel(
        model,
        dummy_input=torch.randn(2, 4),
        default_output_bw=16,
        default_param_bw=16,
        default_data_type="float",
    )
    assert "mul" not in rows(sim)
    x = torch.randn(3, 4)
    out = sim.model(x)  # fp16 needs no encodings: the new layer quantizes at once
    assert rows(sim)["mul"]["outputs"] == ["fp16"]
    assert torch.equal(out, out.half().float()) and not torch.equal(out, model(x))


def test_qat_step_changes_weights_through_quantizers():
    model, x = build("small_cnn")
    sim = QuantizationSimModel(model, dummy_input=x, config_file="per_channel")
    calibrate(sim, x)
    # BatchNorm stays in eval mode: batch statistics would move activations out of the calibrated
    # ranges, where the straight-through estimator (rightly) passes no gradient.
    before = sim.model.stem.weight.detach().clone()
    optimizer = torch.optim.SGD(sim.model.parameters(), lr=0.1)
    loss = sim.model(x).pow(2).mean()
    loss.backward()
    assert sim.model.stem.weight.grad is not None and sim.model.stem.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(before, sim.model.stem.weight)


def test_tied_weight_has_one_quantizer():
    model, ids = build("tied_embedding")
    sim = QuantizationSimModel(model, dummy_input=ids)
    assert sim.model.embed.param_quantizers["weight"] is sim.model.head.param_quantizers["weight"]
    assert not rows(sim)["embed"]["effective_inputs"][0]  # integer ids: no quantizer


@pytest.fixture(scope="module")
def resnet18_batch():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval(), torch.randn(4, 3, 128, 128)


@pytest.mark.parametrize(
    "bw, data_type, check",
    [(8, "int", ("sqnr", 28.0)), (16, "int", ("sqnr", 70.0)), (16, "float", ("rel", 1e-2))],
    ids=["int8", "int16", "fp16"],
)
def test_resnet18_numerics(resnet18_batch, bw, data_type, check):
    model, x = resnet18_batch
    sim = QuantizationSimModel(
        model, dummy_input=x[:1], default_output_bw=bw, default_param_bw=bw, default_data_type=data_type
    )
    calibrate(sim, x)
    with torch.no_grad():
        y_float, y_sim = model(x), sim.model(x)
    kind, bound = check
    if kind == "sqnr":
        assert sqnr_db(y_float, y_sim) >= bound
    else:
        assert ((y_float - y_sim).norm() / y_float.norm()).item() < bound


def test_resnet_reused_relu_rows(resnet18_batch):
    model, x = resnet18_batch
    sim = QuantizationSimModel(model, dummy_input=x[:1])
    names = [r["name"] for r in sim.precision_table()]
    assert "layer1.0.relu" in names and "layer1.0.relu#1" in names
    assert "layer1.0.add" in names  # out += identity, a functional layer


@pytest.mark.parametrize("name", ["mobilenet_v2", pytest.param("vit_b_16", marks=pytest.mark.slow)])
def test_torchvision_models_build_calibrate_and_run(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    if name == "vit_b_16":
        nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initializes the head
    size = 224 if name == "vit_b_16" else 96
    x = torch.randn(1, 3, size, size)
    sim = QuantizationSimModel(model, dummy_input=x, default_output_bw=16, default_param_bw=16)
    calibrate(sim, x)
    with torch.no_grad():
        y_float, y_sim = model(x), sim.model(x)
    assert sqnr_db(y_float, y_sim) > 40
    if name == "mobilenet_v2":
        layer = sim.model.features[1].conv[0][0]
        assert isinstance(layer, nn.Conv2d) and layer.param_quantizers["weight"].precision.name == "int16"
    else:
        assert any(r["type"] == "MultiheadAttention" for r in sim.precision_table())


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_transformers_logits_track_float(factory):
    model, inputs = factory()
    with torch.no_grad():
        y_float = model(**inputs).logits
    for bw, bound in [(8, 25.0), (16, 65.0)]:
        sim = QuantizationSimModel(model, dummy_input=inputs, default_output_bw=bw, default_param_bw=bw)
        sim.compute_encodings(lambda m, _: m(**inputs), None)
        with torch.no_grad():
            y_sim = sim.model(**inputs).logits
        assert sqnr_db(y_float, y_sim) >= bound, bw
    if factory is tiny_llama:
        q_proj = sim.model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, nn.Linear) and q_proj.param_quantizers["weight"].precision.name == "int16"


def test_sim_repr_and_exports():
    model, x = build("reshape_chain")
    sim = QuantizationSimModel(model, dummy_input=x)
    assert "QuantizationSimModel(ReshapeChain" in repr(sim)
    for name in mixprec.__all__:
        assert hasattr(mixprec, name)


def test_sim_and_planned_state_satisfy_the_state_protocols():
    # Collaborators below the sim are typed against these protocols, not the sim class.
    from mixprec.plan.resolve import resolve

    model, x = build("small_cnn")
    sim = QuantizationSimModel(model, dummy_input=x)
    assert isinstance(sim, mixprec.PrecisionState) and isinstance(sim, mixprec.PrecisionView)
    mp = mixprec.MixedPrecisionConfigurator(sim)
    mp.set_precision(sim.model.fc, activation="int16")
    _, planned = resolve(sim, sim.config, list(mp.requests))
    assert isinstance(planned, mixprec.PrecisionView) and not isinstance(planned, mixprec.PrecisionState)
    place = next(p for p in sim.places() if p.kind is mixprec.PlaceKind.PARAM and p.slot == "weight")
    assert sim.quantizer_at(place) is not None and sim.describe(place).endswith("weight")


def test_sequential_root_keeps_its_forward_length_and_indexing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4)
    sim = QuantizationSimModel(model, dummy_input=x)
    calibrate(sim, x)
    assert sim.model(x).shape == (3, 2)
    assert len(sim.model) == 3 and isinstance(sim.model[-1], nn.Linear)
    assert sim.model[-1].param_quantizers["weight"] is not None


@pytest.mark.slow  # a fresh interpreter importing torch
def test_core_runs_without_optional_dependencies():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ['onnx', 'onnxruntime', 'onnxscript', 'yaml', 'typer', 'rich', 'torchvision', 'transformers']:\n"
        "    sys.modules[name] = None\n"
        "import torch, mixprec\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()\n"
        "x = torch.randn(2, 4)\n"
        "sim = mixprec.QuantizationSimModel(m, dummy_input=x)\n"
        "sim.compute_encodings(mixprec.forward_batches([x], progress=False), None)\n"
        "shape = tuple(sim.model(x).shape)\n"
        "mp = mixprec.MixedPrecisionConfigurator(sim)\n"
        "mp.set_precision(sim.model[0], 'int16')\n"
        "print(len(mp.apply(log_file=None).changes), shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # the model input quantizer (Linear reads int16) and the ReLU's output (the Linear+ReLU group emits int16)
    assert out.stdout.split() == ["2", "(2,", "4)"]

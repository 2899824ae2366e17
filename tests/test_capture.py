import pytest
import torch
from torch import nn

from mixprec.capture.graph import LayerKind
from mixprec.capture.recorder import capture, split_dummy_input
from mixprec.errors import CaptureError

from .models import build, tiny_gpt2, tiny_llama


def _capture(model, example):
    args, kwargs = split_dummy_input(example)
    return capture(model, args, kwargs).graph


def _producer(graph, tensor_id):
    """The layer that wrote ``tensor_id`` (None for a model input or a constant)."""
    node = graph.tensors[tensor_id]
    return None if node.producer is None else graph.layers[node.producer[0]]


def test_functional_calls_become_layers_with_ordered_inputs():
    model, x = build("functional")
    graph = _capture(model, x)
    by_name = {layer.name: layer for layer in graph.layers}
    for name in ["q", "k", "matmul", "softmax", "add", "relu", "add_1", "mean", "cat", "transpose"]:
        assert name in by_name, name
    matmul = by_name["matmul"]
    assert matmul.kind is LayerKind.FUNCTION and matmul.op_type == "MatMul"
    # matmul reads q directly and k through a transpose (data movement)
    assert _producer(graph, matmul.inputs[0]).name == "q"
    assert _producer(graph, matmul.inputs[1]).name == "transpose"
    assert by_name["transpose"].data_movement
    assert graph.layers[graph.tensors[graph.source(matmul.inputs[1])].producer[0]].name == "k"
    # x + (operator) is recorded as add_1 with the model input as its second input
    assert graph.tensors[by_name["add_1"].inputs[1]].model_input == 0


def test_module_called_twice_is_two_layers_with_stable_names():
    model, x = build("reused_relu")
    graph = _capture(model, x)
    relus = [layer for layer in graph.layers if layer.module_name == "relu"]
    assert [layer.name for layer in relus] == ["relu", "relu#1"]
    assert [layer.call_index for layer in relus] == [0, 1]


def test_multi_io_paths_and_nested_outputs():
    model, (x, y) = build("multi_io")
    graph = _capture(model, (x, y))
    assert [io.path for io in graph.inputs] == ["input[0]", "input[1]"]
    assert [io.path for io in graph.outputs] == ["output[0]", "output[1]", "output[2]"]


def test_keyword_inputs_are_model_inputs():
    model, x = build("reshape_chain")
    graph = _capture(model, {"x": x})
    assert [io.path for io in graph.inputs] == ["x"]


def test_tied_weight_is_one_param_key():
    model, ids = build("tied_embedding")
    graph = _capture(model, ids)
    embed = graph.layer("embed")
    head = graph.layer("head")
    assert embed.params["weight"].key == head.params["weight"].key
    assert not graph.inputs[0].is_float


def test_untraceable_model_error_names_the_failure():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).view(7, 7)  # wrong shape: fails after fc

    with pytest.raises(CaptureError, match=r"after layer 'fc'.*RuntimeError"):
        _capture(Broken(), torch.randn(2, 4))


def test_bad_dummy_input_type():
    with pytest.raises(TypeError, match="dummy_input must be a tensor"):
        split_dummy_input(3.0)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_transformers_decoder_is_captured_with_call_site_names(factory):
    model, inputs = factory()
    graph = _capture(model, inputs)
    names = {layer.name for layer in graph.layers}
    if factory is tiny_llama:
        assert "model.layers.0.self_attn.q_proj" in names
        assert "model.layers.1.self_attn.softmax" in names  # sdpa is decomposed (docs/capture.md)
        assert "model.layers.0.mlp.mul" in names
    else:
        assert "transformer.h.0.attn.c_attn" in names
        assert "lm_head" in names
    assert [io.path for io in graph.outputs] == ["output.logits"]


def test_model_without_submodules_is_made_of_functional_layers():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.relu(x @ self.w) + x

    graph = _capture(Flat(), torch.randn(2, 4))
    assert [layer.name for layer in graph.layers] == ["matmul", "relu", "add"]
    assert list(graph.layer("matmul").params) == ["w"]


def test_bare_linear_model_is_one_functional_layer_with_its_params():
    graph = _capture(nn.Linear(4, 3), torch.randn(2, 4))
    assert [(layer.name, layer.op_type) for layer in graph.layers] == [("linear", "Gemm")]
    assert set(graph.layer("linear").params) == {"weight", "bias"}

"""Quantization-aware training with the sim: frozen encodings, and learnable ones (range learning)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from mixprec import IntQuantizer, PerBlock, PerChannel, QuantizationSimModel, load_checkpoint, save_checkpoint
from mixprec.quant.learnable import LearnableIntQuantizer, encoding_parameters
from mixprec.quant.observers import QuantScheme

from .helpers import write_encodings
from .models import build

LEARN_TF = "training_range_learning_with_tf_init"
LEARN_TF_ENHANCED = "training_range_learning_with_tf_enhanced_init"


def regression_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """LinearStack, a batch, and the float model's outputs as targets (distillation)."""
    model, _ = build("linear_stack")
    torch.manual_seed(seed)
    x = torch.randn(64, 6)
    with torch.no_grad():
        target = model(x)
    return model, x, target


def make_sim(model: nn.Module, x: torch.Tensor, scheme: str, bw: int = 4) -> QuantizationSimModel:
    sim = QuantizationSimModel(
        model, dummy_input=x, quant_scheme=scheme, default_output_bw=bw, default_param_bw=bw
    )
    sim.compute_encodings(lambda m, _: m(x), None)
    return sim


def encodings(sim: QuantizationSimModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for place, q in sim.quantizers():
        enc = q.get_encoding()
        out[sim.describe(place)] = (enc.scale, enc.offset)
    return out


def train(
    sim: QuantizationSimModel, x: torch.Tensor, target: torch.Tensor, steps: int, lr: float
) -> list[float]:
    optimizer = torch.optim.Adam(sim.model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(sim.model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    ("scheme", "init"),
    [(LEARN_TF, "tf"), (LEARN_TF_ENHANCED, "tf_enhanced")],
    ids=["tf-init", "tf-enhanced-init"],
)
def test_range_learning_initializes_like_its_scheme_and_computes_the_same(scheme: str, init: str) -> None:
    model, x, _ = regression_data()
    learn, frozen = make_sim(model, x, scheme), make_sim(model, x, init)
    assert learn.quant_scheme.calibration_scheme is QuantScheme(init)
    assert learn.range_learning and not frozen.range_learning
    for (name, (s1, o1)), (_, (s2, o2)) in zip(
        encodings(learn).items(), encodings(frozen).items(), strict=True
    ):
        assert torch.equal(s1, s2) and torch.equal(o1, o2), name
    with torch.no_grad():
        assert torch.equal(learn.model(x), frozen.model(x))
    assert torch.equal(learn.model(x), frozen.model(x))  # the training path computes the same values


def test_range_learning_encodings_are_parameters_of_the_model() -> None:
    model, x, _ = regression_data()
    sim = QuantizationSimModel(model, dummy_input=x, quant_scheme=LEARN_TF)
    quantizers = [q for _, q in sim.quantizers()]
    assert quantizers and all(isinstance(q, LearnableIntQuantizer) for q in quantizers)
    before = {id(p) for p in encoding_parameters(sim.model)}
    sim.compute_encodings(lambda m, _: m(x), None)
    params = list(encoding_parameters(sim.model))
    assert {id(p) for p in params} == before  # filled in place: an optimizer built earlier still holds them
    assert all(isinstance(p, nn.Parameter) and p.numel() > 0 for p in params)
    model_params = {id(p) for p in sim.model.parameters()}
    assert all(id(q.scale) in model_params and q.scale.requires_grad for q in quantizers)
    # asymmetric activations learn their offset; symmetric weights keep the fixed one
    assert any(q.offset.requires_grad for q in quantizers) and not all(
        q.offset.requires_grad for q in quantizers
    )


def mapping_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """LinearStack and targets of another linear map: the weights must move far from where they were
    calibrated."""
    model, x, _ = regression_data()
    torch.manual_seed(1)
    return model, x, x @ torch.randn(6, 2)


def test_qat_with_learnable_encodings_lowers_the_loss_and_moves_encodings() -> None:
    model, x, target = mapping_data()
    sim = make_sim(model, x, LEARN_TF)
    start = encodings(sim)
    losses = train(sim, x, target, steps=30, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses
    moved = [name for name, (s, o) in encodings(sim).items() if not torch.equal(s, start[name][0])]
    assert len(moved) == len(start), f"unchanged: {set(start) - set(moved)}"
    for _, q in sim.quantizers():  # what export writes: integer offsets on the grid the forward used
        enc = q.get_encoding()
        assert enc.offset.dtype == torch.int64 and bool((enc.scale > 0).all())
    # the ranges follow the weights; frozen ones clip them as they grow (same data, same steps)
    frozen = make_sim(model, x, "tf")
    assert losses[-1] < train(frozen, x, target, steps=30, lr=1e-2)[-1]


def test_learning_only_the_encodings_lowers_the_quantization_error() -> None:
    model, x, target = regression_data()  # the float model's outputs: the loss is quantization error
    sim = make_sim(model, x, LEARN_TF)
    learnable = {id(p) for p in encoding_parameters(sim.model)}
    for p in sim.model.parameters():
        p.requires_grad_(id(p) in learnable)
    losses = train(sim, x, target, steps=40, lr=1e-3)
    assert losses[-1] < 0.9 * losses[0], losses


def test_qat_with_frozen_encodings_trains_weights_only() -> None:
    model, x, target = mapping_data()
    sim = make_sim(model, x, "tf")
    start = encodings(sim)
    assert not list(encoding_parameters(sim.model))
    weight = sim.model.head.weight.detach().clone()
    losses = train(sim, x, target, steps=30, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(weight, sim.model.head.weight)
    assert all(
        torch.equal(s, start[n][0]) and torch.equal(o, start[n][1]) for n, (s, o) in encodings(sim).items()
    )


def test_frozen_learnable_encodings_do_not_move() -> None:
    model, x, target = regression_data()
    sim = make_sim(model, x, LEARN_TF_ENHANCED)
    for p in encoding_parameters(sim.model):
        p.requires_grad_(False)
    start = encodings(sim)
    train(sim, x, target, steps=3, lr=5e-3)
    assert all(torch.equal(s, start[n][0]) for n, (s, _) in encodings(sim).items())


def test_gradients_are_lsq_with_a_straight_through_round() -> None:
    q = LearnableIntQuantizer(4, symmetric=False)
    q.set_range(-1.0, 2.0)
    s, o = q.scale.detach().clone(), q.offset.detach().clone()
    x = torch.linspace(-3, 4, 57, dtype=torch.float32, requires_grad=True)
    q(x).sum().backward()
    codes = torch.round(x.detach() / s)
    lo, hi = o, o + 15
    inside = (codes >= lo) & (codes <= hi)
    want_scale = torch.where(inside, codes - x.detach() / s, torch.where(codes < lo, lo, hi)).sum()
    assert torch.allclose(q.scale.grad, want_scale, rtol=1e-4, atol=1e-4)
    assert torch.allclose(q.offset.grad, s * (~inside).sum())
    assert torch.equal(x.grad, inside.float())


def test_learnable_encodings_survive_casts_state_dict_and_a_fresh_forward() -> None:
    model, x, target = regression_data()
    sim = make_sim(model, x, LEARN_TF)
    with torch.no_grad():
        sim.model(x)  # caches quantized weights while nothing trains
    train(sim, x, target, steps=2, lr=1e-2)
    with torch.no_grad():
        y = sim.model(x)
    state = copy.deepcopy(sim.model.state_dict())
    other = make_sim(model, x, LEARN_TF)
    other.model.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other.model(x), y)  # the cache saw the optimizer's updates
    enc = encodings(sim)
    sim.model.half().float()
    assert all(torch.equal(s, enc[n][0]) for n, (s, _) in encodings(sim).items())


def test_reference_enum_members_build_learnable_sims() -> None:
    model, x, _ = regression_data()
    for scheme in (QuantScheme.training_range_learning_with_tf_init, "QuantScheme.training_range_learning"):
        sim = make_sim(model, x, scheme)
        assert sim.range_learning and list(encoding_parameters(sim.model))
    assert not make_sim(model, x, QuantScheme.post_training_tf_enhanced).range_learning


def test_float_precisions_stay_frozen_under_range_learning() -> None:
    model, x, _ = regression_data()
    sim = QuantizationSimModel(model, dummy_input=x, quant_scheme=LEARN_TF, default_output_bw=16,
                               default_param_bw=16, default_data_type="float")  # fmt: skip
    assert not any(isinstance(q, IntQuantizer) for _, q in sim.quantizers())
    assert not list(encoding_parameters(sim.model))


GRIDS = {
    "per-tensor-asymmetric": dict(symmetric=False),
    "per-tensor-strict-symmetric": dict(symmetric=True, strict_symmetric=True),
    "per-channel": dict(symmetric=True, granularity=PerChannel(0)),
    "per-block": dict(symmetric=True, granularity=PerBlock(4, axis=1)),
}


@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
def test_learnable_quantizer_computes_what_the_frozen_one_does(grid: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 8) * 3
    frozen, learn = IntQuantizer(4, **GRIDS[grid]), LearnableIntQuantizer(4, **GRIDS[grid])
    frozen.calibrate_tensor(w, "tf")
    learn.calibrate_tensor(w, "tf")
    assert torch.equal(frozen.get_encoding().scale, learn.get_encoding().scale)
    x = (torch.randn(6, 8) * 4).requires_grad_(True)
    with torch.no_grad():
        assert torch.equal(learn(x), frozen(x))
    out = learn(x)
    assert torch.equal(out, frozen(x))
    out.sum().backward()
    assert learn.scale.grad is not None and learn.scale.grad.shape == learn.scale.shape


def test_learned_encodings_go_out_through_the_encodings_file(tmp_path: Path) -> None:
    model, x, target = mapping_data()
    sim = make_sim(model, x, LEARN_TF_ENHANCED)
    train(sim, x, target, steps=5, lr=1e-2)
    write_encodings(sim, tmp_path / "learned.encodings")
    frozen = QuantizationSimModel(model, dummy_input=x, default_output_bw=4, default_param_bw=4)
    frozen.model.load_state_dict(
        {k: v for k, v in sim.model.state_dict().items() if "quantizer" not in k}, strict=False
    )  # the trained weights, without the (float) learnable offsets
    frozen.load_encodings(tmp_path / "learned.encodings")
    with torch.no_grad():
        assert torch.equal(frozen.model(x), sim.model(x))


def test_inference_follows_in_place_changes_of_learned_encodings() -> None:
    q, frozen = LearnableIntQuantizer(8), IntQuantizer(8)
    q.set_range(-1.0, 1.0)
    x = torch.randn(64)
    with torch.no_grad():
        q(x)  # prepares the inference parameters
        q.scale.mul_(2)  # as an optimizer step does
        q.offset.sub_(3)
        frozen.set_encoding(q.get_encoding())
        assert torch.equal(q(x), frozen(x))


def test_symmetric_offsets_stay_fixed_even_when_marked_trainable() -> None:
    model, x, target = mapping_data()
    sim = make_sim(model, x, LEARN_TF)
    sim.model.requires_grad_(True)  # also the offsets created with requires_grad=False
    symmetric = [q for _, q in sim.quantizers() if q.symmetric]
    assert symmetric
    offsets = [q.offset.detach().clone() for q in symmetric]
    train(sim, x, target, steps=3, lr=1e-2)
    assert all(torch.equal(q.offset, o) for q, o in zip(symmetric, offsets, strict=True))


def test_range_learning_resumes_from_a_checkpoint(tmp_path: Path) -> None:
    model, x, target = mapping_data()
    sim = make_sim(model, x, QuantScheme.training_range_learning_with_tf_init)
    train(sim, x, target, steps=3, lr=1e-2)
    save_checkpoint(sim, tmp_path / "qat.pth")
    loaded = load_checkpoint(tmp_path / "qat.pth")
    with torch.no_grad():
        assert torch.equal(loaded.model(x), sim.model(x))
    assert loaded.range_learning and len(list(encoding_parameters(loaded.model))) == len(
        list(encoding_parameters(sim.model))
    )
    start = encodings(loaded)
    losses = train(loaded, x, target, steps=3, lr=1e-2)  # training goes on where it stopped
    assert losses[-1] < losses[0]
    assert any(not torch.equal(s, start[n][0]) for n, (s, _) in encodings(loaded).items())


def test_load_encodings_requires_grad_freezes_and_thaws_learned_encodings(tmp_path: Path) -> None:
    model, x, _ = regression_data()
    sim = make_sim(model, x, LEARN_TF)
    write_encodings(sim, tmp_path / "e.encodings")
    sim.load_encodings(tmp_path / "e.encodings", requires_grad=False)
    assert not any(p.requires_grad for p in encoding_parameters(sim.model))
    sim.load_encodings(tmp_path / "e.encodings", requires_grad=True)
    assert all(q.scale.requires_grad for _, q in sim.quantizers())

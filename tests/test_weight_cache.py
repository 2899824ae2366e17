"""The cache of fake-quantized weights: edits through ``param.data`` show in the next forward.

``param.data`` is a tensor with a version counter of its own, so in-place edits through it leave
``param._version`` unchanged; the cache notices them by a content fingerprint
(``mixprec.sim.weight_cache``). Each edit is checked against a fresh sim holding the same weights
and encodings.
"""

import copy

import pytest
import torch
from torch import nn

from mixprec import QuantizationSimModel


class WideMLP(nn.Module):
    """A 512x512 Linear (large enough to be cached on every quantizer path) and a small head; no
    activation between them, so any change of ``fc``'s weights reaches the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(512, 512)
        self.head = nn.Linear(512, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x))


def _calibrated(config: str):
    torch.manual_seed(0)
    model = WideMLP().eval()
    x = torch.randn(4, 512)
    sim = QuantizationSimModel(model, dummy_input=x, config_file=config)
    sim.compute_encodings(lambda m, _: m(x), None)
    return model, x, sim


def _edit(weight: nn.Parameter, kind: str) -> None:
    data = weight.data
    if kind == "mul_":
        data.mul_(2)
    elif kind == "copy_":
        data.copy_(torch.randn_like(data) * 0.05)
    elif kind == "clamp_":
        data.clamp_(-0.01, 0.01)
    elif kind == "setitem":
        data[0, 0] = 5.0
    elif kind == "permute_rows":
        data.copy_(data[torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(1))])
    elif kind == "swap_two":
        flat = data.view(-1)  # the largest and the smallest value trade places
        i, j = int(flat.argmax()), int(flat.argmin())
        flat[[i, j]] = flat[[j, i]]
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("config", ["default", "per_channel"])
@pytest.mark.parametrize("kind", ["mul_", "copy_", "clamp_", "setitem", "permute_rows", "swap_two"])
@pytest.mark.parametrize("layer", ["fc", "head"])
def test_edits_through_data_show_in_the_next_forward(config, kind, layer):
    model, x, sim = _calibrated(config)
    weight = getattr(sim.model, layer).weight
    with torch.no_grad():
        before = sim.model(x)
        assert torch.equal(sim.model(x), before)  # the cached fake-quantized weight is in use now
        version = weight._version
        _edit(weight, kind)
        assert weight._version == version  # why a version check alone serves stale weights
        after = sim.model(x)
        fresh = QuantizationSimModel(copy.deepcopy(model), dummy_input=x, config_file=config)
        fresh.model.load_state_dict(sim.model.state_dict())  # the edited weights, the same encodings
        expected = fresh.model(x)
    assert not torch.equal(expected, before)
    assert torch.equal(after, expected)


def test_unchanged_weights_are_not_fake_quantized_again():
    from mixprec.sim import weight_cache

    _, x, sim = _calibrated("default")
    weight = sim.model.fc.weight
    assert weight.numel() >= weight_cache.MIN_CACHED
    q = sim.model.fc.param_quantizers["weight"]
    calls = []
    original = q.forward
    q.forward = lambda t: calls.append(t) or original(t)
    with torch.no_grad():
        sim.model(x)
        first = len(calls)
        sim.model(x)
        assert len(calls) == first  # served from the cache
        weight.data.mul_(0.5)
        sim.model(x)
        assert len(calls) == first + 1  # the edit was seen
    assert first == 1


def test_fingerprint_sees_single_values_swaps_and_permutations():
    from mixprec.sim.weight_cache import fingerprint

    torch.manual_seed(0)
    for shape in [(3, 3, 3), (64, 64), (512, 512), (1001, 7)]:
        w = torch.randn(shape)
        base = fingerprint(w)
        same = fingerprint(w.clone())
        assert base[0] == same[0] and torch.equal(base[1], same[1])
        flat = w.reshape(-1)
        for i in (0, flat.numel() // 2, flat.numel() - 1):
            bumped = flat.clone()
            bumped[i] = torch.nextafter(bumped[i], torch.tensor(float("inf")))  # one ulp
            assert fingerprint(bumped)[0] != base[0]
        n = flat.numel()
        for i, j in ((0, 1), (0, n - 1), (5, (5 + 64) % n), (2, n // 2)):
            swapped = flat.clone()
            swapped[[i, j]] = swapped[[j, i]]
            fp = fingerprint(swapped)
            assert fp[0] == base[0] and not torch.equal(fp[1], base[1])  # the sum alone misses a swap
        rows = w.reshape(shape[0], -1)
        permuted = fingerprint(rows[torch.randperm(shape[0])])
        assert not torch.equal(permuted[1], base[1])

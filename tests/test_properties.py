"""Property-based tests of manual mixed precision (docs/rules.md) over random models and requests.

Each example builds a random model (tests/strategies.py), a sim with a random config, calibrates
it, then records random request sequences and applies them (one or two rounds). After every
``apply`` the properties below must hold; on every raise the sim must be exactly as before.
Profiles: ``ci`` (default, derandomized) and ``long`` (``--hypothesis-profile=long``), see
tests/conftest.py and docs/testing.md.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixprec import MixedPrecisionConfigurator, QuantizationSimModel
from mixprec.errors import (
    CalibrationError,
    MixprecError,
    PrecisionConflictError,
    RequestError,
    UnsupportedKernelError,
)

from .helpers import calibrate, run
from .property_checks import (
    check_changes_listed,
    check_drawn_in_layers,
    check_latest_request_holds,
    check_one_precision_per_tensor,
    check_plan_matches_sim,
    check_readers_of_changed_tensors_drawn_in,
    check_requested_layers_emit,
    check_requested_rows_say_why,
    precisions,
)
from .snapshots import full_snapshot
from .strategies import CONFIGS, RequestSpec, expected_layers, model_specs, request_sequences, sim_config


def apply_and_check(
    sim: QuantizationSimModel, mp: MixedPrecisionConfigurator, issued: list, strict: bool, inputs: tuple
) -> None:
    requests = mp.requests
    snap = full_snapshot(sim)
    before = precisions(sim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            preview: Any = mp.preview(strict=strict).to_dict()
        except MixprecError as exc:
            preview = exc
    assert full_snapshot(sim) == snap, "preview changed the sim"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = mp.apply(log_file=None, strict=strict)
        except MixprecError as exc:
            assert isinstance(exc, (PrecisionConflictError, UnsupportedKernelError)) and strict, repr(exc)
            assert full_snapshot(sim) == snap, "a failed apply changed the sim"
            assert mp.requests == requests, "a failed apply must keep the requests"
            assert isinstance(preview, type(exc)) and str(preview) == str(exc), "preview and apply disagree"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lenient = mp.preview(strict=False)
            if isinstance(exc, PrecisionConflictError):
                assert any(c["loser_direct"] for c in lenient.conflicts)
            else:
                assert lenient.kernel_findings and not any(c["loser_direct"] for c in lenient.conflicts)
            apply_and_check(sim, mp, issued, False, inputs)
            return
    assert not isinstance(preview, Exception), f"preview raised {preview!r} but apply succeeded"
    data = report.to_dict()
    preview.pop("applied"), data.pop("applied")
    assert preview == data, "preview and apply produced different reports"
    assert not mp.requests, "a successful apply clears the requests"
    messages = " ".join(str(w.message) for w in caught)
    direct_losers = [c for c in data["conflicts"] if c["loser_direct"]]
    if strict:
        assert not direct_losers and not data["kernel_findings"]
    else:
        assert not direct_losers or "conflict" in messages
        assert not data["kernel_findings"] or "no kernel" in messages
    for c in direct_losers:
        loser = next(spec for rid, spec in issued if rid == c["loser"])
        assert loser.direct, f"request {loser} names no layer directly but was reported as a direct loser"

    check_changes_listed(sim, before, data)
    check_one_precision_per_tensor(sim)
    check_latest_request_holds(sim, data, issued)
    check_drawn_in_layers(sim, data)
    check_plan_matches_sim(sim, data)
    check_readers_of_changed_tensors_drawn_in(sim, before, data)
    check_requested_layers_emit(sim, data, issued)
    check_requested_rows_say_why(data)

    calibrate(sim, inputs)
    for leaf in torch.utils._pytree.tree_leaves(run(sim.model, inputs)):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            assert torch.isfinite(leaf).all(), "the sim's output is not finite"


# -- the tests -------------------------------------------------------------------------------------------


@pytest.mark.slow  # about a minute of random models on 2 cores (see docs/testing.md)
@pytest.mark.timeout(3600)  # the "long" profile runs for minutes
@given(
    spec=model_specs(),
    config=st.sampled_from(CONFIGS),
    output_bw=st.sampled_from((8, 16)),
    data=st.data(),
)
def test_random_requests_resolve_consistently(spec, config, output_bw, data) -> None:
    inputs = spec.example_input()
    sim = QuantizationSimModel(
        spec.build(), dummy_input=inputs, default_output_bw=output_bw, config_file=sim_config(config)
    )
    calibrate(sim, inputs)
    mp = MixedPrecisionConfigurator(sim)
    for _ in range(data.draw(st.integers(1, 2), label="rounds")):
        issued: list[tuple[int, RequestSpec]] = []
        for request in data.draw(request_sequences(sim), label="requests"):
            recorded = mp.requests
            snap = full_snapshot(sim)
            try:
                request.issue(mp)
            except RequestError:
                assert mp.requests == recorded and full_snapshot(sim) == snap
                continue
            new = mp.requests[-1]
            if request.kind not in ("input", "output"):
                assert new.layers == expected_layers(sim, request), f"{request} matched {new.layers}"
            issued.append((new.id, request))
        strict = data.draw(st.booleans(), label="strict")
        apply_and_check(sim, mp, issued, strict, inputs)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@given(
    spec=model_specs(max_ops=5),
    bad=st.sampled_from(("nan", "inf", "-inf")),
    inputs_quantized=st.booleans(),
    data=st.data(),
)
def test_non_finite_calibration_data_never_gives_non_finite_encodings(
    spec, bad, inputs_quantized, data
) -> None:
    inputs = spec.example_input()
    config = {"model_input": {"is_input_quantized": inputs_quantized}}
    sim = QuantizationSimModel(spec.build(), dummy_input=inputs, config_file=config)
    calibrate(sim, inputs)
    snap = full_snapshot(sim)
    which = data.draw(st.integers(0, spec.n_inputs - 1), label="input")
    poisoned = dict(inputs) if isinstance(inputs, dict) else list(inputs)
    key = spec.input_names()[which] if isinstance(inputs, dict) else which
    poisoned[key] = poisoned[key].clone()
    poisoned[key][0, 0, 0, 0] = float(bad)
    poisoned = poisoned if isinstance(poisoned, dict) else tuple(poisoned)
    try:
        calibrate(sim, poisoned)
    except CalibrationError as exc:
        # the first quantizer that saw the value is named: the model input's, else a layer's. -inf is
        # an additive-mask value (docs/masks.md): quantizers pass it through, so a later layer names it.
        input_names_it = inputs_quantized and bad != "-inf"
        where = r"model input .+" if input_names_it else r"[^']+ (output|input) \d+"
        assert re.match(rf"quantizer '{where}' observed non-finite values during calibration", str(exc)), str(
            exc
        )
        assert str(exc).endswith("no encoding was changed")
        assert full_snapshot(sim) == snap
    else:
        # the value vanished on its way (relu(-inf) = 0, an unused input, a mask value passed
        # through): encodings are finite
        assert not inputs_quantized or bad == "-inf"
        for _, q in sim.quantizers():
            if q.needs_encoding:
                enc = q.get_encoding()
                assert all(torch.isfinite(t).all() for t in (enc.scale, enc.min, enc.max) if t is not None)
    out = run(sim.model, inputs)
    assert all(torch.isfinite(t).all() for t in torch.utils._pytree.tree_leaves(out) if t.is_floating_point())


# -- regressions: minimal cases the property suite found -------------------------------------------------------


class TwoBranches(torch.nn.Module):
    """a(x) + b(x), and c reading a(x) too."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.a(x)
        return t + self.b(x), self.c(t)


class SoftmaxOut(torch.nn.Module):
    """softmax(fc(x)) is a model output and is read by head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.softmax(self.fc(x), dim=-1)
        return self.head(p), p


def effective(sim: QuantizationSimModel, layer: str) -> list[str | None]:
    return next(r["effective_inputs"] for r in sim.precision_table() if r["name"] == layer)


def test_fp32_at_an_own_input_quantizer_also_removes_the_one_upstream() -> None:
    sim = QuantizationSimModel(
        TwoBranches(), dummy_input=torch.randn(2, 4), config_file=sim_config("input_quantized")
    )
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision("add", activation="fp32")
    mp.apply(log_file=None)
    assert effective(sim, "add") == [None, None]
    assert effective(sim, "c") == [None]  # a's output is one tensor: c reads it at fp32 too


def test_request_through_an_unquantized_embedding_output_quantizes_that_output() -> None:
    from .models import build

    model, ids = build("tied_embedding")
    sim = QuantizationSimModel(model, dummy_input=ids, config_file="per_channel")  # Gather output unquantized
    assert effective(sim, "mix") == [None]
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(sim.model.mix, activation="int16")
    mp.apply(log_file=None)
    assert effective(sim, "mix") == ["int16"]
    assert next(r for r in sim.precision_table() if r["name"] == "embed")["outputs"] == ["int16"]


def test_model_output_request_on_a_fused_tensor_conflicts_with_its_reader() -> None:
    config = sim_config("softmax_unquantized")
    sim = QuantizationSimModel(SoftmaxOut(), dummy_input=torch.randn(2, 4), config_file=config)
    mp = MixedPrecisionConfigurator(sim)
    mp.set_model_output_precision([None, "int4"])
    mp.set_precision(sim.model.head, activation="int8")
    with pytest.raises(
        PrecisionConflictError,
        match=r"softmax output 0: request 0 .* wants int4 .* later request 1 .* sets int8",
    ):
        mp.preview(strict=True)
    with pytest.warns(UserWarning, match="conflict"):
        report = mp.apply(log_file=None, strict=False)
    assert effective(sim, "head") == ["int8"]
    assert [(c["winner"], c["loser"]) for c in report.conflicts] == [(1, 0)]


def test_later_model_output_request_wins_over_an_indirect_reader_request() -> None:
    sim = QuantizationSimModel(
        SoftmaxOut(), dummy_input=torch.randn(2, 4), config_file=sim_config("softmax_unquantized")
    )
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(torch.nn.Linear, activation="int8")
    mp.set_model_output_precision([None, "int4"])
    report = mp.apply(log_file=None, strict=True)
    assert effective(sim, "head") == ["int4"]
    assert any(c["loser"] == 0 and c["winner"] == 1 and not c["loser_direct"] for c in report.conflicts)

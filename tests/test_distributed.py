"""compute_encodings under torch.distributed: 2 gloo ranks on CPU, each with half of the data.

One pair of worker processes (this file run as a script) runs every scenario in order and saves
what it saw; rank 0 then leaves the process group and calibrates the same sims on all the data
(the single-process reference). The tests compare the saved results. Every comparison of
encodings is bit for bit (``torch.equal``): min/max combine exactly, and histograms are aligned
to one layout and summed, which equals one observer having seen the union of the data.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

# Two ranks are spawned for the whole module (about 45 s on 2 cores): slow tests.
pytestmark = pytest.mark.slow

WORLD = 2
TIMEOUT_S = 120
SCHEMES = ["tf", "tf_enhanced", "percentile"]
BATCHES = 4

Encodings = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


# ----------------------------------------------------------------------------- worker (rank side)


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    # growing scales, so each rank's shard has a different range than the union
    return [torch.randn(2, 3, 8, 8, generator=gen) * (1 + i) for i in range(BATCHES)]


def _make_sim(scheme: str, mixed: bool) -> Any:
    import mixprec

    try:
        from .models import build
    except ImportError:  # run as a script: tests/ is on sys.path
        from models import build  # type: ignore[no-redef]

    model, example = build("small_cnn")
    sim = mixprec.QuantizationSimModel(model, dummy_input=example, quant_scheme=scheme)
    if mixed:
        # calibrate int8 first, then switch some places to int16 and calibrate again
        sim.compute_encodings(_forward(_batches()), None)
        mp = mixprec.MixedPrecisionConfigurator(sim)
        mp.set_precision(sim.model.block1, activation="int16")
        mp.set_precision(sim.model.fc, activation="int16", param={"weight": "int16"})
        mp.apply(log_file=None)
    return sim


def _forward(batches: list[torch.Tensor], model_override: Any = None) -> Callable[[Any, Any], None]:
    def run(model: Any, _: Any) -> None:
        for batch in batches:
            (model_override or model)(batch)

    return run


def _encodings(sim: Any) -> Encodings:
    out: Encodings = {}
    for _, q in sim.quantizers():
        if q.needs_encoding and q.is_initialized():
            enc = q.get_encoding()
            out[f"{q.label} {q.precision}"] = (enc.scale, enc.offset)
    return out


def _failure(sim: Any, run: Callable[[Any, Any], None]) -> dict[str, Any]:
    """Calibrate expecting a CalibrationError; report it and whether encodings were kept."""
    import mixprec

    before = _encodings(sim)
    try:
        sim.compute_encodings(run, None)
    except mixprec.CalibrationError as exc:
        cause = type(exc.__cause__).__name__ if exc.__cause__ else None
        return {"message": str(exc), "cause": cause, "kept": _same(before, _encodings(sim))}
    return {"message": None, "cause": None, "kept": _same(before, _encodings(sim))}


def _same(a: Encodings, b: Encodings) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k][0], b[k][0]) and (a[k][1] is None or torch.equal(a[k][1], b[k][1])) for k in a
    )


def _observer_protocol(rank: int) -> dict[str, Any]:
    """The combine on raw observers: per-channel histograms, and a quantizer only rank 0 feeds."""
    from mixprec import PerChannel
    from mixprec.quant.observers import RangeObserver
    from mixprec.sim import distributed as D

    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(4, 5, 7, generator=gen) * (i + 1) - i for i in range(4)]
    kinds = [
        dict(histogram=True),
        dict(granularity=PerChannel(axis=1), histogram=True),
        dict(histogram=False),
    ]
    mine = [D._DeferringObserver(label=f"obs{i}", **kw) for i, kw in enumerate(kinds)]
    for i, x in enumerate(data):
        if i % WORLD == rank:
            mine[0].observe(x)
            mine[1].observe(x)
            if rank == 0:
                mine[2].observe(x)  # empty on rank 1: shapes come from the MAX exchange
    group = D._Group.current()
    table = D._exchange_status(group, mine, None)
    shapes = D._agree_on_shapes(group, mine, table)
    ranges = D._reduce_ranges(group, mine, shapes, [])
    combined = D._sum_counts(group, mine, shapes, ranges, [torch.device("cpu")] * len(mine))
    reference = [RangeObserver(label=f"obs{i}", **kw) for i, kw in enumerate(kinds)]
    for i, x in enumerate(data):
        reference[0].observe(x)
        reference[1].observe(x)
        if i % WORLD == 0:
            reference[2].observe(x)
    return {
        "combined": [o.state_tensors() for o in combined],
        "reference": [o.state_tensors() for o in reference],
    }


def worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: every scenario in a fixed order (every rank runs the same collectives)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    shard = _batches()[rank::WORLD]
    res: dict[str, Any] = {}
    sims: dict[str, Any] = {}
    for mixed in (False, True):
        for scheme in SCHEMES:
            name = f"{'mixed' if mixed else 'int8'}-{scheme}"
            sims[name] = sim = _make_sim(scheme, mixed)
            sim.compute_encodings(_forward(shard), None)
            res[name] = _encodings(sim)

    ddp_sim = _make_sim("tf_enhanced", False)
    ddp = DistributedDataParallel(ddp_sim.model)  # wrapped before; forward broadcasts buffers
    ddp_sim.compute_encodings(_forward(shard, model_override=ddp), None)
    res["ddp-int8-tf_enhanced"] = _encodings(ddp_sim)

    sim = sims["int8-tf_enhanced"]
    uneven = _batches()[:3] if rank == 0 else _batches()[3:]  # shards of different lengths
    sim.compute_encodings(_forward(uneven), None)
    res["uneven-int8-tf_enhanced"] = _encodings(sim)
    bad = [b.clone() for b in shard]
    if rank == 1:
        bad[1][0, 1, 2, 3] = float("nan")
    res["nan"] = _failure(sim, _forward(bad))
    res["no_data"] = _failure(sim, _forward(shard if rank == 0 else []))

    def raising(model: Any, _: Any) -> None:
        model(shard[0])
        if rank == 0:
            raise ValueError("bad batch")
        model(shard[1])

    res["callback_raises"] = _failure(sim, raising)
    weight = sim.model.fc.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 10.0 * rank  # rank-dependent weights, as a forgotten broadcast would leave
    res["params_differ"] = _failure(sim, _forward(shard))
    with torch.no_grad():
        weight.copy_(saved)
    sim.compute_encodings(_forward(shard), None)  # the group still works after failures
    res["after_failures"] = _encodings(sim)
    res["observers"] = _observer_protocol(rank)
    dist.destroy_process_group()

    if rank == 0:  # single-process reference over all the data, same threads, same process
        everything = _batches()
        res["reference"] = {}
        for name, sim in sims.items():
            sim.compute_encodings(_forward(everything), None)
            res["reference"][name] = _encodings(sim)
        sims["int8-tf"].compute_encodings(_forward(shard), None)
        res["rank0-alone-int8-tf"] = _encodings(sims["int8-tf"])
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")


# ----------------------------------------------------------------------------- tests (parent side)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    from .helpers import launch_ranks  # not at the top: workers run this file as a script

    return launch_ranks(__file__, tmp_path_factory.mktemp("dist"), WORLD, TIMEOUT_S)


def assert_same(a: Encodings, b: Encodings) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key][0], b[key][0]), f"scale of {key}: {a[key][0]} vs {b[key][0]}"
        if a[key][1] is not None:
            assert torch.equal(a[key][1], b[key][1]), f"offset of {key}"


@pytest.mark.parametrize("mixed", [False, True], ids=["int8", "mixed-int8-int16"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_two_ranks_match_one_process_over_all_data_bit_for_bit(ranks, scheme, mixed) -> None:
    name = f"{'mixed' if mixed else 'int8'}-{scheme}"
    reference = ranks[0]["reference"][name]
    for r in range(WORLD):
        assert_same(ranks[r][name], reference)
    if mixed:
        assert any("int16" in key for key in reference)


def test_one_rank_alone_would_give_other_encodings(ranks) -> None:
    """Guards the tests above: the shards' ranges differ from the union's."""
    alone, union = ranks[0]["rank0-alone-int8-tf"], ranks[0]["reference"]["int8-tf"]
    assert any(not torch.equal(alone[k][0], union[k][0]) for k in union if "weight" not in k)


@pytest.mark.parametrize("case", ["ddp", "uneven"], ids=["ddp-wrapped", "uneven-shards"])
def test_ddp_wrapped_model_and_uneven_shards_give_the_same_encodings(ranks, case) -> None:
    for r in range(WORLD):
        assert_same(ranks[r][f"{case}-int8-tf_enhanced"], ranks[0]["reference"]["int8-tf_enhanced"])


@pytest.mark.parametrize(
    "case, pattern, cause",
    [
        (
            "nan",
            r"calibration failed on rank 1 of 2: quantizer '.+' observed non-finite values during calibration: 1 NaN",
            None,
        ),
        ("no_data", r"calibration failed on rank 1 of 2: no calibration data reached this rank", None),
        (
            "callback_raises",
            r"rank 0 of 2: the forward_pass_callback raised ValueError: bad batch",
            "ValueError",
        ),
        ("params_differ", r"the parameter of quantizer 'fc.*' differs across ranks", None),
    ],
    ids=["nan-on-rank-1", "no-data-on-rank-1", "callback-raises-on-rank-0", "weights-differ"],
)
def test_failure_on_one_rank_raises_the_same_error_on_every_rank(ranks, case, pattern, cause) -> None:
    messages = [ranks[r][case]["message"] for r in range(WORLD)]
    assert messages[0] is not None
    assert messages[0] == messages[1]
    assert "no encoding was changed" in messages[0]
    assert re.search(pattern, messages[0]), messages[0]
    assert all(ranks[r][case]["kept"] for r in range(WORLD))
    # the failing rank keeps the original exception as the cause; the others have none
    failing = 0 if case == "callback_raises" else 1
    assert ranks[failing][case]["cause"] == cause


def test_group_still_works_after_failures(ranks) -> None:
    for r in range(WORLD):
        assert_same(ranks[r]["after_failures"], ranks[0]["reference"]["int8-tf_enhanced"])


def test_observer_combine_is_exact_with_a_quantizer_only_one_rank_feeds(ranks) -> None:
    for r in range(WORLD):
        got, want = ranks[r]["observers"]["combined"], ranks[r]["observers"]["reference"]
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            for key in g:
                assert torch.equal(g[key].cpu(), w[key]), key


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])

"""analyze_sensitivity under torch.distributed: 2 gloo ranks on CPU, each with half of the batches.

The worker processes (this file run as a script) run the sweep on their shard; rank 0 then
leaves the process group and runs it on all the batches (the single-process reference).
"""

from __future__ import annotations

import math
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

WORLD = 2
TIMEOUT_S = 180


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(2, 3, 8, 8, generator=gen) * (1 + i) for i in range(4)]  # shards differ in range


def _sweep(batches: list[torch.Tensor]) -> dict[str, Any]:
    from torch import nn

    import mixprec

    try:
        from .models import build, plant_outlier_weight
    except ImportError:  # run as a script: tests/ is on sys.path
        from models import build, plant_outlier_weight  # type: ignore[no-redef]

    model, example = build("small_cnn")
    plant_outlier_weight(model.block2[0])
    sim = mixprec.QuantizationSimModel(model, dummy_input=example)
    rep = mixprec.analyze_sensitivity(sim, batches, targets=[nn.Conv2d, nn.Linear], param={"weight": "int4"})
    profile = rep.suggest(min_sqnr_db=rep.baseline - 2.0)
    return {
        "rows": [(r.layer, r.metric, r.local_sqnr_db) for r in rep.rows],
        "baseline": rep.baseline,
        "suggested": [(r.target, str(dict(r.param)["weight"])) for r in profile.requests],
    }


def worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=90)
    )
    res = {"sharded": _sweep(_batches()[rank::WORLD])}
    dist.destroy_process_group()
    if rank == 0:
        res["reference"] = _sweep(_batches())
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    from .helpers import launch_ranks  # not at the top: workers run this file as a script

    return launch_ranks(__file__, tmp_path_factory.mktemp("dist_sensitivity"), WORLD, TIMEOUT_S)


@pytest.mark.slow
def test_two_ranks_rank_like_one_process_over_all_batches(ranks) -> None:
    reference = ranks[0]["reference"]
    assert reference["rows"][0][0] == "block2.0"
    for r in range(WORLD):
        got = ranks[r]["sharded"]
        assert [row[0] for row in got["rows"]] == [row[0] for row in reference["rows"]]
        for (_, metric, local), (_, want, want_local) in zip(got["rows"], reference["rows"], strict=True):
            # sums of the same terms in another order: equal to rounding
            assert math.isclose(metric, want, rel_tol=1e-9) and math.isclose(local, want_local, rel_tol=1e-9)
        assert math.isclose(got["baseline"], reference["baseline"], rel_tol=1e-9)
        assert got["suggested"] == reference["suggested"]


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])

"""CPU timings of fake-quant kernels and of the tf_enhanced range search.

Compares mixprec's composed ``round``/``clamp`` fake quant with ``torch.fake_quantize_per_*``
on an 8x64x56x56 float32 activation (no_grad forward, and forward+backward), int8 and int16,
per tensor and per channel; then times histogram observation plus tf_enhanced search for one
activation, for a 512x512x3x3 per-channel weight, and for all quantizers of a ResNet-50.

Usage:
    python benchmarks/bench_quantizer_kernels.py [--threads N] [--repeats R]

Prints a table and writes ``benchmarks/results/quantizer_kernels.json``. Times are the median
and the minimum wall time of ``R`` runs after warm-up, and the median process CPU time. On a
busy machine trust the minimum, or the CPU time with ``--threads 1`` (with more threads, OpenMP
workers waiting for a descheduled peer inflate wall times by orders of magnitude).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mixprec.core.granularity import PerChannel, PerTensor
from mixprec.quant import qmath as qm
from mixprec.quant.observers import QuantScheme, RangeObserver, num_bins_for_tensor
from mixprec.quant.quantizers import IntQuantizer

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: python benchmarks/...
    sys.path.insert(0, str(ROOT))

from benchmarks._timing import time_runs  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quantizer_kernels.json"


timeit = functools.partial(time_runs, warmup=3)


def with_grad(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    xg = x.clone().requires_grad_()
    ones = torch.ones_like(x)

    def run() -> None:
        xg.grad = None
        f(xg).backward(ones)

    return run


def kernel_rows(x: torch.Tensor, repeats: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for bits in (8, 16):
        rows += _per_channel_rows(x, bits, repeats)
        rows += _per_tensor_rows(x, bits, repeats)
    return rows


def _per_tensor_rows(x: torch.Tensor, bits: int, repeats: int) -> list[dict[str, object]]:
    """Asymmetric per-tensor encoding from min/max."""
    qmax = 2**bits - 1
    scale, offset = qm.encoding_from_range(x.min(), x.max(), bits, False)
    zp = (-offset).to(torch.int32)
    qp_py = qm.int_qparams(scale, offset, bits, as_python=True)
    qp_t = qm.int_qparams(scale, offset, bits)
    s_f, zp_i = scale.item(), int(zp)
    module = IntQuantizer(bits, False)
    module.set_range(x.min(), x.max())
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "ours composed (cached python scalars)": lambda t: qm.fake_quantize_int_prepared(t, qp_py),
        "ours composed (0-d tensor qparams)": lambda t: qm.fake_quantize_int_prepared(t, qp_t),
        "ours IntQuantizer module": module,
        "torch.fake_quantize_per_tensor_affine (tensor qparams)": lambda t: (
            torch.fake_quantize_per_tensor_affine(t, scale, zp, 0, qmax)
        ),
        "torch.fake_quantize_per_tensor_affine (float qparams)": lambda t: (
            torch.fake_quantize_per_tensor_affine(t, s_f, zp_i, 0, qmax)
        ),
    }
    ref = impls["torch.fake_quantize_per_tensor_affine (tensor qparams)"](x)
    rows: list[dict[str, object]] = []
    for name, f in impls.items():
        rows += _measure(f"int{bits}", "per_tensor", name, f, x, ref, repeats)
    return rows


def _per_channel_rows(x: torch.Tensor, bits: int, repeats: int) -> list[dict[str, object]]:
    """Axis 1: symmetric (bounds equal across channels) and asymmetric (per-channel bounds)."""
    rows: list[dict[str, object]] = []
    for sym in (True, False):
        cs, co = qm.encoding_from_range(x.amin((0, 2, 3)), x.amax((0, 2, 3)), bits, sym)
        czp = (-co).to(torch.int32)
        cqp = qm.view_qparams(qm.int_qparams(cs, co, bits, as_python=True), PerChannel(1), 4)
        kind = "sym" if sym else "asym"
        ours = f"ours composed per-channel {kind}"
        theirs = f"torch.fake_quantize_per_channel_affine {kind}"
        impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            ours: lambda t, cqp=cqp: qm.fake_quantize_int_prepared(t, cqp),
            theirs: lambda t, cs=cs, czp=czp, qmax=2**bits - 1: torch.fake_quantize_per_channel_affine(
                t, cs, czp, 1, 0, qmax
            ),
        }
        ref = impls[theirs](x)
        for name, f in impls.items():
            rows += _measure(f"int{bits}", "per_channel", name, f, x, ref, repeats)
    return rows


def _measure(
    prec: str,
    gran: str,
    name: str,
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    ref: torch.Tensor,
    repeats: int,
) -> list[dict[str, object]]:
    with torch.no_grad():
        mismatches = int((f(x) != ref).sum())
        no_grad = timeit(lambda: f(x), repeats)
    grad = timeit(with_grad(f, x), repeats)
    base = {"precision": prec, "granularity": gran, "impl": name, "mismatches_vs_torch": mismatches}
    return [{**base, "mode": "no_grad fwd", **no_grad}, {**base, "mode": "fwd+bwd", **grad}]


def search_rows(repeats: int) -> list[dict[str, object]]:
    torch.manual_seed(0)
    act = torch.relu(torch.randn(8, 64, 56, 56)) * 3
    act.view(-1)[:10] = 80.0
    weight = torch.randn(512, 512, 3, 3) * 0.02
    rows: list[dict[str, object]] = []

    obs = RangeObserver(PerTensor())
    rows.append(
        {
            "case": "activation 8x64x56x56: observe (aligned histogram)",
            **timeit(lambda: obs.observe(act), repeats),
        }
    )
    rows.append(
        {
            "case": "activation 8x64x56x56: tf_enhanced search (2048 bins)",
            **timeit(lambda: obs.compute_range(QuantScheme.TF_ENHANCED, 8, False), repeats),
        }
    )
    wobs = RangeObserver(PerChannel(0))
    rows.append(
        {"case": "weight 512x512x3x3 per-channel: observe", **timeit(lambda: _fresh_observe(weight), repeats)}
    )
    wobs.observe(weight)
    rows.append(
        {
            "case": "weight 512x512x3x3 per-channel: tf_enhanced search (512 ch)",
            **timeit(lambda: wobs.compute_range(QuantScheme.TF_ENHANCED, 8, True), repeats),
        }
    )
    q = IntQuantizer(8, True, PerChannel(0))
    rows.append(
        {
            "case": "weight 512x512x3x3 per-channel: IntQuantizer.calibrate_tensor total",
            **timeit(lambda: q.calibrate_tensor(weight, "tf_enhanced"), repeats),
        }
    )
    rows.append(_resnet50_search())
    return rows


def _fresh_observe(w: torch.Tensor) -> None:
    RangeObserver(PerChannel(0)).observe(w)


def _resnet50_search() -> dict[str, object]:
    """Search time only, for per-tensor activation histograms + per-channel weights of ResNet-50."""
    try:
        import torchvision
    except ImportError:
        return {
            "case": "resnet50: torchvision not installed",
            "median_ms": float("nan"),
            "min_ms": float("nan"),
        }
    model = torchvision.models.resnet50()
    weights = [
        m.weight.detach() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    n_act = 170  # roughly one output quantizer per conv/bn-folded layer, add, relu and pooling
    act_obs = []
    for i in range(n_act):
        o = RangeObserver(PerTensor())
        o.observe(torch.relu(torch.randn(50_000)) * (1 + i % 7) if i % 2 else torch.randn(50_000))
        act_obs.append(o)
    w_obs = []
    for w in weights:  # binned as IntQuantizer.calibrate_tensor bins parameters
        o = RangeObserver(PerChannel(0), num_bins=num_bins_for_tensor(PerChannel(0), w))
        o.observe(w)
        w_obs.append(o)

    def search_all() -> None:
        for o in act_obs:
            o.compute_range(QuantScheme.TF_ENHANCED, 8, False)
        for o in w_obs:
            o.compute_range(QuantScheme.TF_ENHANCED, 8, True)

    t = timeit(search_all, 3)
    return {
        "case": f"resnet50: tf_enhanced search of {n_act} activation + {len(w_obs)} weight quantizers",
        **t,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(8, 64, 56, 56)
    kernels = kernel_rows(x, args.repeats)
    searches = search_rows(max(3, args.repeats // 4))

    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}")
    print(f"\nfake quant of float32 {tuple(x.shape)} (ms: median / min wall, median cpu)")
    print(f"{'prec':6} {'granularity':12} {'mode':12} {'median':>8} {'min':>8} {'cpu':>8}  {'mism':>5}  impl")
    for r in kernels:
        print(
            f"{r['precision']:6} {r['granularity']:12} {r['mode']:12} {r['median_ms']:8.2f} {r['min_ms']:8.2f}"
            f" {r['cpu_median_ms']:8.2f}  {r['mismatches_vs_torch']:5}  {r['impl']}"
        )
    print("\nrange search (ms: median / min / cpu)")
    for r in searches:
        print(f"{r['median_ms']:9.2f} {r['min_ms']:9.2f} {r['cpu_median_ms']:9.2f}  {r['case']}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
    }
    RESULTS.write_text(json.dumps({"meta": meta, "fake_quant": kernels, "range_search": searches}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()

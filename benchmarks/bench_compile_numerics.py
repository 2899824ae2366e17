"""Where compiled (inductor) sim outputs differ from the eager sim, and by how many steps.

Measures, on CPU, side by side in one process:
1. the fake quant alone: eager vs inductor on random tensors with many values on rounding ties;
2. one conv + ReLU sim: how many quantized outputs inductor puts on another grid point, and how
   far the float conv itself moves (inductor's conv/epilogue vs eager's);
3. resnet18 and mobilenet_v2 (random weights, batch 2 at 64x64 as tests/test_runtime_compile.py,
   and batch 8): the float model compiled vs eager, and the sim's logits under aot_eager and
   inductor vs the eager sim, in steps of the logits' output quantizer.

Usage: python benchmarks/bench_compile_numerics.py   (prints a table, writes
benchmarks/results/compile_numerics.json); several minutes on one CPU core (inductor compiles).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from mixprec import QuantizationSimModel
from mixprec.quant import qmath as qm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks._zoo_models import _reestimate_batchnorm  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "compile_numerics.json"


def fake_quant_alone() -> dict:
    torch.manual_seed(0)
    scale, zp = 0.0123, 117
    x = (torch.randn(400_000) * 60 + (128 - zp)) * scale
    x[:200_000] = (torch.randint(-130, 130, (200_000,)).float() + 0.5) * scale  # ties, up to rounding
    # as a quantizer holds them: float32 scale, inverse computed in float32 (as torch's quantized kernel)
    qp = qm.int_qparams(torch.tensor(scale), torch.tensor(-zp), 8, as_python=True)
    eager_fast = qm._fq_uint8_grid(x, qp)  # the eager path for 8-bit per-tensor grids
    eager_composed = qm._fq_int(x, qp, want_mask=True)[0]  # the composed form (want_mask skips the fast path)
    compiled = torch.compile(lambda t: qm._fq_int(t, qp, want_mask=False)[0], backend="inductor")(x)
    return {
        "values": x.numel(),
        "inductor_vs_eager_fast_differ": int((compiled != eager_fast).sum()),
        "inductor_vs_eager_composed_differ": int((compiled != eager_composed).sum()),
    }


def steps(a: torch.Tensor, b: torch.Tensor, step: float) -> dict[str, int]:
    d = ((a - b).abs() / step).round().long().flatten()
    return {
        "total": d.numel(),
        "0": int((d == 0).sum()),
        "1": int((d == 1).sum()),
        "2": int((d == 2).sum()),
        ">2": int((d > 2).sum()),
    }


def one_conv() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3), nn.ReLU()).eval()
    x = torch.randn(8, 3, 64, 64)
    sim = QuantizationSimModel(model, dummy_input=x)
    sim.compute_encodings(lambda m, _: m(x), None)
    step = sim.model[1].output_quantizers[0].get_encoding().scale.item()
    torch._dynamo.reset()
    with torch.no_grad():
        f_eager = model(x)
        f_ind = torch.compile(model, backend="inductor")(x)
        eager = sim.model(x)
        ind = torch.compile(sim.model, backend="inductor")(x)
    rel = ((f_ind - f_eager).abs() / f_eager.abs().clamp_min(1e-6)).max().item()
    return {
        "float_outputs_not_bit_equal": int((f_ind != f_eager).sum()),
        "float_max_rel_diff": rel,
        "sim_steps": steps(ind, eager, step),
    }


def one_flip(sim: QuantizationSimModel, layer: nn.Module, x: torch.Tensor, step: float) -> dict[str, int]:
    """Eager only: move ONE value of ``layer``'s quantized output one step; how far do the logits move?"""

    layer_step = layer.output_quantizers[0].get_encoding().scale.item()

    def bump(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        with torch._C.DisableTorchFunction():  # an edit of ours, not a layer of the model
            out = out.clone()
            flat = out.view(-1)
            flat[int(flat.abs().argmax())] += layer_step
        return out

    with torch.no_grad():
        base = sim.model(x)
        handle = layer.register_forward_hook(bump)
        try:
            moved = sim.model(x)
        finally:
            handle.remove()
    return steps(moved, base, step)


def network(name: str, batch: int, reestimate: bool) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(batch, 3, 64, 64)
    if reestimate:
        # random weights with default BN statistics shrink mobilenet_v2's logits to ~1e-9 (all on
        # the zero code); re-estimated statistics give a meaningful grid
        _reestimate_batchnorm(model, [torch.randn(8, 3, 64, 64) for _ in range(2)])
    sim = QuantizationSimModel(model, dummy_input=x)
    sim.compute_encodings(lambda m, _: m(x), None)
    head = sim.model.fc if name == "resnet18" else sim.model.classifier[1]
    step = head.output_quantizers[0].get_encoding().scale.item()
    row: dict = {"model": name, "batch": batch, "bn_reestimated": reestimate, "step": step}
    first = sim.model.relu if name == "resnet18" else sim.model.features[0][2]
    row["one_flip_at_first_layer"] = one_flip(sim, first, x, step)
    with torch.no_grad():
        torch._dynamo.reset()
        f_eager = model(x)
        f_ind = torch.compile(model, backend="inductor")(x)
        row["float_max_abs_diff_in_steps"] = (f_ind - f_eager).abs().max().item() / step
        eager = sim.model(x)
        torch._dynamo.reset()
        row["aot_eager"] = steps(
            torch.compile(sim.model, backend="aot_eager", fullgraph=True)(x), eager, step
        )
        torch._dynamo.reset()
        start = time.perf_counter()
        row["inductor"] = steps(torch.compile(sim.model, backend="inductor", fullgraph=True)(x), eager, step)
        row["inductor_compile_s"] = round(time.perf_counter() - start, 1)
    return row


def main() -> None:
    torch.set_num_threads(1)
    out = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
        "fake_quant": fake_quant_alone(),
        "one_conv": one_conv(),
        # mobilenet_v2 with default BN statistics: logits ~1e-9, all on the zero code (trivially equal)
        "networks": [
            network(n, b, n == "mobilenet_v2") for n in ("resnet18", "mobilenet_v2") for b in (2, 8)
        ],
    }
    print(f"machine: {out['machine']}")
    fq = out["fake_quant"]
    print(
        f"fake quant alone, {fq['values']} values (half on ties): inductor differs from eager on "
        f"{fq['inductor_vs_eager_fast_differ']} (fast path) / {fq['inductor_vs_eager_composed_differ']} (composed)"
    )
    oc = out["one_conv"]
    print(
        f"conv7x7+relu: float outputs not bit-equal {oc['float_outputs_not_bit_equal']}, max rel "
        f"{oc['float_max_rel_diff']:.2e}; sim outputs by steps {oc['sim_steps']}"
    )
    print(f"{'model':13} {'batch':>5} {'BN':>3} {'backend':>10} {'0 steps':>8} {'1':>6} {'2':>5} {'>2':>4}")
    for r in out["networks"]:
        bn = "re" if r["bn_reestimated"] else "-"
        for what in ("aot_eager", "inductor", "one_flip_at_first_layer"):
            s = r[what]
            label = "1 flip" if what.startswith("one_flip") else what
            print(
                f"{r['model']:13} {r['batch']:>5} {bn:>3} {label:>10} "
                f"{s['0']:>8} {s['1']:>6} {s['2']:>5} {s['>2']:>4}"
            )
        print(f"{'':13} float compiled vs eager: max {r['float_max_abs_diff_in_steps']:.3f} steps")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

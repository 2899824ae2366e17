"""The quantized forward's cost next to the float model's, measured side by side in one process.

Usage: python benchmarks/bench_runtime.py [--quick] [--sections a,b]
Prints a table and writes benchmarks/results/runtime.json. Each row times the float model and the
calibrated sim alternately (same inputs, ``torch.no_grad``, median of the repetitions), so the
ratio is not skewed by the machine's speed drifting between two separate runs.

Sections: gpt2 (124M config, 4x128, sdpa), llama (tiny 2x16, and hidden 256 4 layers 2x64, each
sdpa and eager), resnet50 / mobilenet_v2
(batch 8 at 224), compiled (sim vs float under torch.compile, inductor: resnet50, GPT-2, tiny
Llama), calibration (compute_encodings of one resnet50 batch vs a float forward of it), memory
(calibrated sim after a forward vs float weights), fingerprint (what the weight cache's per-forward
check of every cached weight costs next to a float forward: resnet50 b8, GPT-2 4x128); breakdown
(not run by default: tiny Llama and mobilenet_v2 forwards split into fake-quant kernels,
foreign-module hooks and the rest of the runtime's interception, next to the float model under a
pass-through torch-function mode and no-op global module hooks).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._timing import speed_probe  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "runtime.json"


def in_turn(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``reps`` times after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def side_by_side(float_fn: Callable[[], object], sim_fn: Callable[[], object], reps: int) -> dict:
    """Median seconds of each, alternating calls; first call of each is a warm-up."""
    row = in_turn({"float_s": float_fn, "sim_s": sim_fn}, reps)
    return {**row, "ratio": row["sim_s"] / row["float_s"]}


def lm(factory: str, attention: str, batch: int, seq: int, quick: bool, hidden: int = 64, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if factory == "gpt2":
        cfg = GPT2Config(n_layer=2 if quick else 12, attn_implementation=attention)
        model = GPT2LMHeadModel(cfg).eval()
    else:
        cfg = LlamaConfig(
            vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention,
        )  # fmt: skip
        model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    return model, {"input_ids": ids, "use_cache": False}


def vision(name: str, batch: int):
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval(), torch.randn(batch, 3, 224, 224)


def calibrated(model, inputs):
    import mixprec

    sim = mixprec.QuantizationSimModel(model, dummy_input=inputs, config_file="per_channel")
    kwargs = inputs if isinstance(inputs, dict) else None
    sim.compute_encodings(lambda m, _: m(**kwargs) if kwargs else m(inputs), None)
    return sim


def call(model, inputs) -> Callable[[], object]:
    if isinstance(inputs, dict):
        return lambda: model(**inputs)
    return lambda: model(inputs)


def forward_row(label: str, model, inputs, reps: int) -> dict:
    sim = calibrated(model, inputs)
    with torch.no_grad():
        row = side_by_side(call(model, inputs), call(sim.model, inputs), reps)
    return {"case": label, **row}


def compiled_row(label: str, model, inputs, reps: int) -> dict:
    sim = calibrated(model, inputs)
    with torch.no_grad():
        torch._dynamo.reset()
        cf = torch.compile(model, backend="inductor")
        cs = torch.compile(sim.model, backend="inductor")
        row = side_by_side(call(cf, inputs), call(cs, inputs), reps)
    return {"case": f"{label} compiled (inductor)", **row}


def quantizer_calls(sim, run_sim: Callable[[], object]) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """The (quantizer, input) pairs of one inference forward, after one that filled the weight cache."""
    seen: list[tuple[torch.nn.Module, torch.Tensor]] = []
    apply = sim.runtime.apply
    with torch.no_grad():
        run_sim()
        sim.runtime.apply = lambda q, x: seen.append((q, x)) or apply(q, x)
        try:
            run_sim()
        finally:
            del sim.runtime.apply  # the instance attribute: the class's method again
    return seen


class PassThrough(TorchFunctionMode):
    """A torch-function mode that only runs each call: the floor of any mode-based runtime."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **kwargs) if kwargs else func(*args)


def breakdown_row(label: str, model, inputs, reps: int, alone: bool) -> dict:
    """Where a sim forward's time goes: float, the sim, the sim with every quantizer returning its
    input (all the runtime's interception, no fake-quant kernels), the sim without the
    foreign-module hooks (sim/foreign.py), and the float model under a pass-through mode with
    no-op global module hooks, timed in turn in one loop (median of each)."""
    from torch.nn.modules import module as module_hooks

    from mixprec.quant.quantizers import IntQuantizer
    from mixprec.sim import mode

    sim = calibrated(model, inputs)
    run_sim = call(sim.model, inputs)
    quantize, enter, leave = IntQuantizer.forward, mode.foreign.enter, mode.foreign.leave

    def identity_quantizers() -> object:
        IntQuantizer.forward = lambda self, x: x
        try:
            return run_sim()
        finally:
            IntQuantizer.forward = quantize

    def without_foreign_hooks() -> object:
        mode.foreign.enter = mode.foreign.leave = lambda state: None
        try:
            return run_sim()
        finally:
            mode.foreign.enter, mode.foreign.leave = enter, leave

    run_float = call(model, inputs)

    def float_under_passthrough() -> object:
        # what the design costs before doing anything: a mode seeing every torch call and global
        # module hooks making every module call take nn.Module's hook path, both passing through
        pre = module_hooks.register_module_forward_pre_hook(lambda m, a: None)
        post = module_hooks.register_module_forward_hook(lambda m, a, o: None, always_call=True)
        try:
            with PassThrough():
                return run_float()
        finally:
            pre.remove()
            post.remove()

    fns = {"float_s": run_float, "sim_s": run_sim, "identity_quantizers_s": identity_quantizers,
           "no_foreign_hooks_s": without_foreign_hooks,
           "float_under_passthrough_s": float_under_passthrough}  # fmt: skip
    seen: list[tuple[torch.nn.Module, torch.Tensor]] = []
    if alone:
        # the same quantizer calls on the same tensors, outside the model: the kernels alone (small
        # models only: holding a CNN's activations changes how everything else runs)
        seen = quantizer_calls(sim, run_sim)
        fns["quantizer_calls_alone_s"] = lambda: [q.forward(x) for q, x in seen]
    with torch.no_grad():
        row = in_turn(fns, reps)
    f = row["float_s"]
    hooks = (row["sim_s"] - row["no_foreign_hooks_s"]) / f
    out = {
        "case": f"breakdown: {label}",
        **row,
        "ratio": row["sim_s"] / f,
        "fake_quant_kernels_over_float": (row["sim_s"] - row["identity_quantizers_s"]) / f,
        "foreign_hooks_over_float": hooks,
        "rest_over_float": (row["identity_quantizers_s"] - f) / f - hooks,
        "passthrough_over_float": row["float_under_passthrough_s"] / f,
    }
    if alone:
        out |= {
            "quantizer_calls": len(seen),
            "quantizer_calls_alone_over_float": row["quantizer_calls_alone_s"] / f,
        }
    return out


def calibration_row(reps: int) -> dict:
    import mixprec

    model, x = vision("resnet50", 8)
    sim = mixprec.QuantizationSimModel(model, dummy_input=x, quant_scheme="tf_enhanced")
    with torch.no_grad():
        row = side_by_side(lambda: model(x), lambda: sim.compute_encodings(lambda m, _: m(x), None), reps)
    return {"case": "compute_encodings resnet50 b8 (tf_enhanced) vs float forward", **row}


def fingerprint_row(label: str, model, inputs, reps: int) -> dict:
    """The weight cache's per-forward content check of every weight it holds, vs a float forward."""
    from mixprec.sim.weight_cache import fingerprint

    sim = calibrated(model, inputs)
    with torch.no_grad():
        call(sim.model, inputs)()
        cached = [entry.param for entry in sim.runtime._param_cache._entries.values()]
        row = side_by_side(call(model, inputs), lambda: [fingerprint(p) for p in cached], reps)
    return {"case": f"weight-cache fingerprints of {label} ({len(cached)} weights) vs float forward", **row}


def memory_row() -> dict:
    model, x = vision("resnet50", 8)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    sim = calibrated(model, x)
    with torch.no_grad():
        sim.model(x)
    quantizer_state = sum(t.numel() * t.element_size() for t in sim.model.state_dict().values())
    quantizer_state -= weights + sum(b.numel() * b.element_size() for b in model.buffers())
    cache = sim.runtime._param_cache.nbytes()
    sim.cache_quantized_weights = False
    gc.collect()
    return {
        "case": "memory: calibrated resnet50 sim after a forward, on top of the float model",
        "float_weights_mb": weights / 2**20,
        "extra_mb": (weights + quantizer_state + cache) / 2**20,  # the sim's copy of the model + cache
        "extra_over_weights": (weights + quantizer_state + cache) / weights,
        "extra_without_cache_over_weights": (weights + quantizer_state) / weights,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer layers and repetitions")
    parser.add_argument(
        "--sections", default="gpt2,llama,resnet50,mobilenet_v2,calibration,memory,fingerprint,compiled"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_flush_denormal(True)  # random weights go denormal in CNNs (see docs/performance.md)
    sections = set(args.sections.split(","))
    reps = 3 if args.quick else 7
    probe_start = speed_probe()
    rows = []
    if "gpt2" in sections:
        rows.append(
            forward_row("GPT-2 124M config 4x128 (sdpa)", *lm("gpt2", "sdpa", 4, 128, args.quick), reps)
        )
    if "llama" in sections:
        for attention in ("sdpa", "eager"):
            rows.append(
                forward_row(
                    f"tiny Llama 2x16 ({attention})", *lm("llama", attention, 2, 16, args.quick), reps * 3
                )
            )
        for attention in ("sdpa", "eager"):
            # the size at which version 0.1 read the 1.75x (docs/performance.md)
            model, inputs = lm("llama", attention, 2, 64, args.quick, hidden=256, layers=4)
            rows.append(
                forward_row(f"Llama hidden 256, 4 layers, 2x64 ({attention})", model, inputs, reps * 2)
            )
    if "breakdown" in sections:
        for attention in ("sdpa", "eager"):
            model, inputs = lm("llama", attention, 2, 16, args.quick)
            rows.append(breakdown_row(f"tiny Llama 2x16 ({attention})", model, inputs, reps * 40, True))
        rows.append(breakdown_row("mobilenet_v2 b8 224", *vision("mobilenet_v2", 8), reps * 2, False))
    for name in ("resnet50", "mobilenet_v2"):
        if name in sections:
            rows.append(forward_row(f"{name} b8 224", *vision(name, 8), reps))
    if "calibration" in sections:
        rows.append(calibration_row(max(2, reps // 2)))
    if "compiled" in sections:
        rows.append(compiled_row("resnet50 b8 224", *vision("resnet50", 8), reps))
        rows.append(compiled_row("GPT-2 4x128", *lm("gpt2", "sdpa", 4, 128, args.quick), reps))
        for attention in ("sdpa", "eager"):
            model, inputs = lm("llama", attention, 2, 16, args.quick)
            rows.append(compiled_row(f"tiny Llama 2x16 ({attention})", model, inputs, reps * 9))
    if "memory" in sections:
        rows.append(memory_row())
    if "fingerprint" in sections:
        rows.append(fingerprint_row("resnet50 b8", *vision("resnet50", 8), reps))
        rows.append(fingerprint_row("GPT-2 4x128", *lm("gpt2", "sdpa", 4, 128, args.quick), reps))
    machine = {
        "machine": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu (no GPU on this machine)",
        # milliseconds of a fixed matmul workload (benchmarks/_timing.py) before and after the rows:
        # when they differ, the machine's speed changed during the run
        "speed_probe_ms": [probe_start, speed_probe()],
    }
    for row in rows:
        if row["case"].startswith("breakdown"):
            print(
                f"{row['case']:<40} float {row['float_s'] * 1e3:8.2f} ms  sim x{row['ratio']:.2f} = 1 + "
                f"fake-quant kernels {row['fake_quant_kernels_over_float']:.2f} + foreign-module hooks "
                f"{row['foreign_hooks_over_float']:.2f} + other interception {row['rest_over_float']:.2f}"
                + (
                    f"; its {row['quantizer_calls']} quantizer calls alone, outside the model: "
                    f"{row['quantizer_calls_alone_over_float']:.2f}"
                    if "quantizer_calls" in row
                    else ""
                )
                + f"; the float model under a pass-through mode and no-op module hooks: x{row['passthrough_over_float']:.2f}"
            )
        elif "ratio" in row:
            print(
                f"{row['case']:<70} float {row['float_s'] * 1e3:9.1f} ms  sim {row['sim_s'] * 1e3:9.1f} ms  x{row['ratio']:.2f}"
            )
        else:
            print(f"{row['case']:<70} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "case"))
    run = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "speed_probe_ms": machine["speed_probe_ms"],
    }
    rows = [{**row, "run": run} for row in rows]  # rows merged from earlier runs keep their own
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged = {r["case"]: r for r in previous.get("rows", [])} | {r["case"]: r for r in rows}
    RESULTS.write_text(json.dumps({**machine, "rows": list(merged.values())}, indent=1))
    print(f"machine: {machine}")


if __name__ == "__main__":
    main()

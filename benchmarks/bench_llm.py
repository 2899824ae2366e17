"""GPT-2-sized (~125M parameters) language model: sim build, recipe apply, calibration, forward overhead.

Usage: python benchmarks/bench_llm.py [--quick]
Prints a table and writes benchmarks/results/llm.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def timed(fn, reps: int = 1) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    import mixprec

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer layers and tokens")
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = 4 if args.quick else 12
    cfg = GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                     attn_implementation="eager")  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    seq, batch, n_batches = (32, 2, 2) if args.quick else (128, 4, 4)
    batches = [
        {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq)), "use_cache": False}
        for _ in range(n_batches)
    ]
    dummy = {"input_ids": batches[0]["input_ids"][:1], "use_cache": False}

    build = timed(lambda: mixprec.QuantizationSimModel(model, dummy_input=dummy, config_file="per_channel"))
    sim = mixprec.QuantizationSimModel(model, dummy_input=dummy, config_file="per_channel")
    mp = mixprec.MixedPrecisionConfigurator(sim)

    def recipes() -> mixprec.MixedPrecisionReport:
        mp.set_precision(sim.model.lm_head, activation="fp16", param={"weight": "fp16"})
        mp.set_precision(F.softmax, activation="int16", within="transformer.h.*.attn.*")
        mp.set_precision(torch.matmul, activation="int16", within="transformer.h.*.attn.*")
        # GPT-2's Conv1D stores weights [in, out]: int4 per output channel (per-block needs [out, in])
        mp.set_precision("transformer.h.*.mlp.c_*", activation="int16", param={"weight": "int4"})
        return mp.apply(log_file=None, strict=False)

    start = time.perf_counter()
    report = recipes()
    apply_s = time.perf_counter() - start
    start = time.perf_counter()
    sim.compute_encodings(mixprec.forward_batches(batches, progress=False), None)
    calib_s = time.perf_counter() - start
    x = batches[0]
    with torch.no_grad():
        model(**x), sim.model(**x)
        float_t, sim_t = [], []
        for _ in range(3):
            float_t.append(timed(lambda: model(**x)))
            sim_t.append(timed(lambda: sim.model(**x)))
        f, s = statistics.median(float_t), statistics.median(sim_t)
        ref, out = model(**x).logits, sim.model(**x).logits
        sqnr = (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()
    rows = {
        "parameters_M": round(params / 1e6, 1),
        "layers_in_graph": len(sim.graph.layers),
        "quantizers": sum(1 for _ in sim.quantizers()),
        "build_s": round(build, 3),
        "apply_4_recipes_s": round(apply_s, 3),
        "quantizers_changed": len(report.changes),
        f"calibration_{n_batches}x{batch}x{seq}_tokens_s": round(calib_s, 2),
        f"float_forward_{batch}x{seq}_s": round(f, 3),
        f"sim_forward_{batch}x{seq}_s": round(s, 3),
        "forward_ratio": round(s / f, 2),
        "logits_sqnr_db": round(sqnr, 1),
    }
    width = max(map(len, rows))
    print(
        f"GPT-2 config, {layers} blocks, CPU, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    for k, v in rows.items():
        print(f"  {k:<{width}}  {v}")
    out_path = Path(__file__).parent / "results" / "llm.json"
    out_path.parent.mkdir(exist_ok=True)
    out_path.write_text(json.dumps({"quick": args.quick, "torch": torch.__version__, **rows}, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

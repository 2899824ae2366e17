"""Profile the slow items of the benchmark: sim build, sim forward, compute_encodings (resnet50).

    python benchmarks/hotspots.py [--image 224] [--calib-image 64] [--calib-batches 4] [--top 25]

cProfile (process CPU time, all threads) for the Python side, sorted by cumulative and own time,
torch.profiler for the ops of one sim forward. Writes ``benchmarks/results/hotspots.txt``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import _models  # noqa: E402
from benchmarks._backends import MixprecBackend, convs  # noqa: E402
from benchmarks._timing import now, speed_probe, usable_cores  # noqa: E402


def _cprofile(title: str, fn, top: int) -> str:  # type: ignore[no-untyped-def]
    prof = cProfile.Profile(time.process_time)  # CPU time: far less noisy than wall on a shared machine
    start = now()
    prof.enable()
    fn()
    prof.disable()
    wall = now() - start
    out = io.StringIO()
    for key in ("cumulative", "tottime"):
        out.write(f"--- sorted by {key}\n")
        stats = pstats.Stats(prof, stream=out).strip_dirs().sort_stats(key)
        stats.print_stats(top)
    return f"===== {title}: {wall:.2f} s wall (profile times below are process CPU time)\n{out.getvalue()}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image", type=int, default=224, help="image size of the build and forward profiles")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calib-image", type=int, default=64)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hotspots.txt")
    args = parser.parse_args()
    torch.set_num_threads(usable_cores())
    torch.set_flush_denormal(True)  # as in run.py: see _models.FLUSH_DENORMAL_NOTE
    backend = MixprecBackend()
    probe_start = speed_probe()
    model, dummy = _models.build(args.model, args.image)
    sections = []

    with torch.no_grad():
        model(dummy)  # warm: first calls pay one-off oneDNN kernel creation
    backend.build(model, dummy, config=None, scheme="tf_enhanced")
    box: dict = {}
    sections.append(
        _cprofile(
            f"sim build {args.model} (default args)",
            lambda: box.update(sim=backend.build(model, dummy, config=None, scheme="tf_enhanced")[0]),
            args.top,
        )
    )

    sim, _ = backend.build(model, dummy, config="per_channel", scheme="tf")
    backend.int16(sim, convs(sim.model)[::3])
    backend.calibrate(sim, lambda m, _: m(dummy))
    x = _models.images(args.batch, args.image)
    with torch.no_grad():
        sim.model(x), model(x)  # warm-up
        sections.append(_cprofile(f"float forward b{args.batch}", lambda: model(x), args.top))
        sections.append(_cprofile(f"sim forward (mixed) b{args.batch}", lambda: sim.model(x), args.top))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            sim.model(x)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        sections.append(f"===== torch.profiler, sim forward (mixed) b{args.batch}, by self CPU time\n{table}")

    calib_model, calib_dummy = _models.build(args.model, args.calib_image)
    csim, _ = backend.build(calib_model, calib_dummy, config="per_channel", scheme="tf_enhanced")
    backend.int16(csim, torch.nn.Conv2d)
    data = [_models.images(8, args.calib_image, seed=s) for s in range(args.calib_batches)]
    with torch.no_grad():
        calib_model(data[0])

    def calibrate() -> None:
        backend.calibrate(csim, lambda m, _: [m(b) for b in data])

    sections.append(
        _cprofile(
            f"compute_encodings {args.calib_batches} batches x 8 at {args.calib_image}px, tf_enhanced, per_channel",
            calibrate,
            args.top,
        )
    )
    probe = (
        f"machine speed probe: {probe_start:.1f} ms at start, {speed_probe():.1f} ms at end (steady if close)"
    )
    text = "\n\n".join([probe, *sections])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

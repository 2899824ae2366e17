"""The per-section tables of the benchmark report, mixprec next to AIMET where it ran."""

from __future__ import annotations

from ._report import (
    APPLY_5000_MAX_S,
    APPLY_EXPONENT_MAX,
    FORWARD_RATIO_MAX,
    RESNET50_BUILD_MAX_S,
    _by,
    secs,
    table,
    verdict,
)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _aimet(result: dict) -> tuple[dict, str]:
    """(the AIMET result or {}, a one-line status for the section titles)."""
    aimet = result.get("aimet") or {}
    status = aimet.get("status", "not run")
    if status in ("done", "partial"):
        cut = [
            f"{k}: {v}"
            for k, v in aimet.items()
            if k in ("build", "forward", "calibration") and isinstance(v, str)
        ]
        probe = aimet.get("speed_probe_ms") or {}
        cut += [f"speed probe {', '.join(f'{k} {v:.1f} ms' for k, v in probe.items())}"] if probe else []
        extra = f"; {'; '.join(cut)}" if cut else ""
        return aimet, f"aimet-torch {aimet.get('version')} ran in {aimet.get('python')} ({status}{extra})"
    return {}, f"aimet-torch: {aimet.get('note') or status}"


def render_sections(result: dict) -> list[str]:
    aimet, aimet_note = _aimet(result)
    parts = [aimet_note]
    if isinstance(result.get("build"), list):
        parts.append(_build(result, aimet))
    if isinstance(result.get("forward"), list):
        parts.append(_forward(result, aimet))
    if isinstance(result.get("calibration"), list):
        parts.append(_calibration(result, aimet))
    if isinstance(result.get("apply"), dict):
        parts.append(_apply(result["apply"]))
    for key in ("build", "forward", "calibration", "apply"):
        if isinstance(result.get(key), str):
            parts.append(f"({key}) {result[key]}")
    return parts


def _build(result: dict, aimet: dict) -> str:
    other = _by(aimet.get("build"), "model")
    rows = []
    for r in result["build"]:
        a = other.get((r["model"],), {})
        if r.get("build_s") is None:
            rows.append([r["model"], r.get("skipped") or r.get("error")] + ["-"] * 8)
            continue
        target = (
            verdict(r["build_s"] < RESNET50_BUILD_MAX_S) if r["model"] == "resnet50" and r["build_s"] else "-"
        )
        a_build = (
            f"{secs(a.get('build_s'))} (prep {secs(a.get('prepare_s'))}, cpu {secs(a.get('build_cpu_s'))})"
            if a.get("build_s")
            else a.get("error")
        )
        if a.get("prepare_error"):
            a_build = f"{a_build} [prepare failed]"
        rows.append(
            [r["model"], "x".join(map(str, r["input"])), r.get("layers"), secs(r["float_forward_s"]),
             secs(r["build_s"]), secs(r.get("build_cpu_s")), r["reps"], target, a_build or "-",
             secs(a.get("float_forward_s"))]
        )  # fmt: skip
    header = ["model", "input", "layers", "float fwd", "mixprec build", "build cpu", "reps",
              f"build<{RESNET50_BUILD_MAX_S}s", "aimet build (prepare+sim)", "aimet float fwd"]  # fmt: skip
    note = result["notes"]["build"]
    return f"(a) sim build, median of up to {result['settings']['build_reps']} ({note})\n" + table(
        header, rows
    )


def _forward(result: dict, aimet: dict) -> str:
    other = _by(aimet.get("forward"), "model", "batch")
    rows = []
    for r in result["forward"]:
        a = other.get((r["model"], r.get("batch")), {})
        a_cells = [_ratio(a.get("int8_ratio")), _ratio(a.get("mixed_ratio"))]
        if a.get("skipped") or a.get("error"):
            a_cells = [a.get("skipped") or a.get("error"), "-"]
        if "skipped" in r or "error" in r:
            rows.append(
                [r["model"], r.get("batch"), r.get("skipped") or r.get("error")] + ["-"] * 6 + a_cells
            )
            continue
        ok = [r[f"{p}_ratio"] <= FORWARD_RATIO_MAX for p in ("int8", "mixed")]
        rows.append(
            [r["model"], r["batch"], r["reps"], secs(r["float_s"]), secs(r["int8_s"]), _ratio(r["int8_ratio"]),
             secs(r["mixed_s"]), _ratio(r["mixed_ratio"]), " / ".join(verdict(o, r["reps"]) for o in ok), *a_cells]
        )  # fmt: skip
    header = ["model", "batch", "reps", "float", "sim int8", "ratio", "sim mixed", "ratio",
              f"<={FORWARD_RATIO_MAX}x (int8/mixed)", "aimet int8", "aimet mixed"]  # fmt: skip
    compiled = result.get("forward_compiled")
    compiled_line = compiled if isinstance(compiled, str) else f"{len(compiled)} CUDA rows in the JSON"
    return (
        f"(b) forward on CPU, calibrated sim vs float ({result['notes']['forward']}; '?' = under 3 reps)\n"
        + table(header, rows)
        + f"\n  CUDA / torch.compile: {compiled_line}"
    )


def _calibration(result: dict, aimet: dict) -> str:
    other = _by(aimet.get("calibration"), "model")
    rows = []
    for r in result["calibration"]:
        a = other.get((r["model"],), {})
        if "skipped" in r:
            rows.append([r["model"], r["skipped"]] + ["-"] * 9)
            continue
        est = lambda row: f"{secs(row['compute_encodings_s'])}{' est.' if row['estimated'] else ''}"  # noqa: E731
        rows.append(
            [r["model"], f"{r['batches_run']}/{r['batches_wanted']}", secs(r["measured_s"]), est(r),
             secs(r["observe_per_batch_s"]), secs(r["finalize_s"]), secs(r["float_forward_per_batch_s"]),
             secs(r["int16_convs_apply_s"]), est(a) if "measured_s" in a else a.get("skipped"),
             secs(a.get("observe_per_batch_s")),
             secs(a.get("finalize_s"))]
        )  # fmt: skip
    header = ["model", "batches run", "measured", "all batches", "observe/batch", "finalize", "float fwd/batch",
              "int16 apply", "aimet all batches", "aimet observe/batch", "aimet finalize"]  # fmt: skip
    return f"(c) compute_encodings ({result['notes']['calibration']})\n" + table(header, rows)


def _apply(apply: dict) -> str:
    rows = [
        [r["requested_layers"], r["layers"], secs(r["build_s"]), secs(r["build_cpu_s"]),
         f"{r['build_cpu_per_layer_us']:.0f} us", secs(r["record_s"]), secs(r["apply_s"]), secs(r["apply_cpu_s"]),
         f"{r['apply_cpu_per_layer_us']:.0f} us", r["quantizers_changed"], r["reps"]]
        for r in apply["rows"]
    ]  # fmt: skip
    header = ["size", "layers", "sim build", "build cpu", "build cpu/layer", "record 101 req", "apply",
              "apply cpu", "apply cpu/layer", "quantizers changed", "reps"]  # fmt: skip
    exp_a, exp_b = apply.get("apply_exponent"), apply.get("build_exponent")
    big = apply["rows"][-1] if apply["rows"] else None
    fit = (
        f"  apply cpu ~ layers^{exp_a:.2f} ({verdict(exp_a <= APPLY_EXPONENT_MAX)}: linear if <= {APPLY_EXPONENT_MAX};"
        f" wall-time fit ^{apply['apply_exponent_wall']:.2f}); apply cpu per layer "
        f"{apply['apply_per_layer_ratio_last_first']:.2f}x from first to last size; sim build cpu ~ layers^{exp_b:.2f};"
        f" apply at {big['layers']} layers {secs(big['apply_cpu_s'])} cpu "
        f"({verdict(big['apply_cpu_s'] < APPLY_5000_MAX_S)} < {APPLY_5000_MAX_S} s)"
        if exp_a is not None and exp_b is not None and big
        else ""
    )
    title = f"(d) MixedPrecisionConfigurator.apply vs layer count ({apply['note']}; cpu = process CPU time)"
    return f"{title}\n" + table(header, rows) + "\n" + fit

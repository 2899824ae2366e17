"""The ``mixprec`` command line: ``demo``, ``inspect``, ``apply``, ``sensitivity`` (needs ``pip install 'mixprec[cli]'``).

Every command builds a sim of a MODEL, which is ``torchvision:<name>`` (random weights, input
1x3x224x224), ``<module>:<factory>`` (a callable returning ``(model, dummy_input)``), or ``demo``.
A user error (bad MODEL, profile or config) prints one line on stderr and exits with code 2;
set ``MIXPREC_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn
from torch.utils._pytree import tree_map

from mixprec.capture.recorder import split_dummy_input
from mixprec.cli_sensitivity import register as register_sensitivity
from mixprec.errors import MixprecError
from mixprec.mixed.configurator import MixedPrecisionConfigurator
from mixprec.mixed.profile import Profile, load_profile
from mixprec.quantsim import QuantizationSimModel
from mixprec.report.build import empty_rows
from mixprec.report.html import write_html
from mixprec.report.model import MixedPrecisionReport
from mixprec.sim.placement import PlaceKind

app = typer.Typer(
    name="mixprec",
    help="Manual mixed precision for PyTorch models: apply precision requests, explain them, export.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # main() turns errors into one line; tracebacks only with MIXPREC_DEBUG
)
out_console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

# Errors a user can fix by changing an argument or a file: one line, exit code 2.
_USER_ERRORS = (MixprecError, ValueError, TypeError, ImportError, OSError)
_TORCHVISION_INPUT = (1, 3, 224, 224)
_MODEL_HELP = "torchvision:<name>, <module>:<factory> (returning (model, dummy_input)), or demo."
_CONFIG_HELP = "Sim config: a bundled preset name or a JSON path (default: the default preset)."


@dataclass
class LoadedModel:
    """A MODEL argument, built: the float model, its dummy input, and a short name for files."""

    model: nn.Module
    dummy_input: Any
    name: str


def load_model(spec: str) -> LoadedModel:
    """Build ``torchvision:<name>``, ``<module>:<factory>`` or ``demo``.

    Raises:
        ValueError: the spec is malformed or names no model; ImportError: its module cannot be imported.
    """
    if spec == "demo":
        spec = "mixprec.demo:build"
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise ValueError(f"MODEL {spec!r} is not torchvision:<name>, <module>:<factory> or demo")
    if source == "torchvision":
        return LoadedModel(_torchvision_model(name), torch.randn(*_TORCHVISION_INPUT), name)
    # Like `python -m`, let a factory module in the current directory be found by the console script.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(source)
    except ImportError as exc:
        raise ImportError(f"MODEL {spec!r}: cannot import module {source!r}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"MODEL {spec!r}: module {source!r} has no callable {name!r}")
    built = factory()
    if not (isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module)):
        raise TypeError(
            f"MODEL {spec!r}: {name}() must return (model, dummy_input), got {type(built).__name__}"
        )
    return LoadedModel(built[0].eval(), built[1], type(built[0]).__name__)


def _torchvision_model(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise ImportError("torchvision:<name> models need torchvision: pip install torchvision") from exc
    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
        raise ValueError(f"unknown torchvision model {name!r}; {hint}")
    return torchvision.models.get_model(name, weights=None).eval()


def _sim(loaded: LoadedModel, config: str | None) -> QuantizationSimModel:
    return QuantizationSimModel(loaded.model, dummy_input=loaded.dummy_input, config_file=config)


def _forward(model: nn.Module, inputs: Any) -> Any:
    args, kwargs = split_dummy_input(inputs)
    return model(*args, **kwargs)


def _random_like(dummy_input: Any) -> Any:
    """Random calibration data shaped like the dummy input; integer tensors (token ids, masks) kept."""
    return tree_map(
        lambda t: torch.randn_like(t) if torch.is_tensor(t) and t.is_floating_point() else t, dummy_input
    )


def calibrate(sim: QuantizationSimModel, dummy_input: Any, batches: int) -> None:
    """``compute_encodings`` on ``batches`` random batches, with a progress bar on stderr."""
    progress = Progress(
        TextColumn("calibrating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )

    def run(model: nn.Module, _: Any) -> None:
        with progress:
            task = progress.add_task("calibrating", total=batches)
            for _batch in range(batches):
                _forward(model, _random_like(dummy_input))
                progress.advance(task)

    sim.compute_encodings(run, None)


def write_outputs(report: MixedPrecisionReport, out: Path, title: str) -> list[Path]:
    """``report.json`` and ``report.html`` next to the ``mmp_log.txt`` that ``apply`` wrote."""
    (out / "report.json").write_text(report.to_json() + "\n")
    write_html(report, out / "report.html", title=title)
    return [out / "mmp_log.txt", out / "report.json", out / "report.html"]


def _summary(name: str, sim: QuantizationSimModel, report: MixedPrecisionReport, files: list[Path]) -> None:
    n_layers = len(report.layers)
    changed = sorted({row["name"] for row in report.layers if row["status"] != "unchanged"})
    out_console.print(
        f"[bold]{name}[/]: {n_layers} layers; {len(report.requests)} request(s), "
        f"{len(report.unmatched)} matching nothing; {len(changed)} layer(s) requested or propagated to, "
        f"{len(report.changes)} quantizer(s) changed, {report.precision_change_count} precision change(s)"
    )
    precisions: dict[str, int] = {}
    for row in report.layers:
        key = row["computes"] or "fp32"
        precisions[key] = precisions.get(key, 0) + 1
    out_console.print("layers by precision: " + ", ".join(f"{p} {n}" for p, n in sorted(precisions.items())))
    for path in files:
        out_console.print(f"wrote {path}", markup=False, highlight=False)


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for mmp_log.txt, report.json, report.html.")
    ] = Path("demo_out"),
    batches: Annotated[
        int, typer.Option("--calibrate", min=1, help="Random batches for compute_encodings.")
    ] = 4,
) -> None:
    """Run manual mixed precision on a small built-in CNN and write what it did.

    Six requests: one layer at int16, one block at int16, every Linear at fp16,
    a layer type the model lacks (reported as matching nothing), the model input
    at int16 and the model output at fp16. Each requested layer reads, computes
    and emits its precision. Then it applies them, calibrates on random data,
    and writes mmp_log.txt, report.json, report.html and profile.yaml.
    """
    from mixprec import demo as demo_model

    loaded = load_model("demo")
    sim = _sim(loaded, None)
    mp = MixedPrecisionConfigurator(sim)
    demo_model.seed_requests(mp)
    out.mkdir(parents=True, exist_ok=True)
    mp.to_profile(out / "profile.yaml")  # the same requests as a file to edit and replay with `apply`
    report = mp.apply(log_file=out / "mmp_log.txt", strict=True)
    calibrate(sim, loaded.dummy_input, batches)
    report.note_calibration(empty_rows(sim))
    files = write_outputs(report, out, f"mixprec demo: {loaded.name}")
    _summary(f"demo ({loaded.name})", sim, report, [*files, out / "profile.yaml"])


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help=_MODEL_HELP)],
    config: Annotated[str | None, typer.Option("--config", "-c", help=_CONFIG_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print sim.precision_table() as JSON.")] = False,
) -> None:
    """List the quantized layers: qualified name, type, quantizers and current precisions."""
    loaded = load_model(model)
    sim = _sim(loaded, config)
    rows = sim.precision_table()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{loaded.name}: {len(rows)} quantized layers ({config or 'default'} config)")
    for column in ("Layer", "Type", "Quantizers", "Reads at", "Outputs", "Params"):
        table.add_column(column, overflow="fold")
    for row in rows:
        quantizers = [f"in{i}" for i, p in enumerate(row["inputs"]) if p] + [
            f"out{i}" for i, p in enumerate(row["outputs"]) if p
        ]
        quantizers += [name for name, p in row["params"].items() if p]
        table.add_row(
            row["name"],
            row["type"],
            " ".join(quantizers) or "-",
            _fmt(row["effective_inputs"]),
            _fmt(row["outputs"]),
            ", ".join(f"{k}: {v or '-'}" for k, v in row["params"].items()) or "-",
        )
    out_console.print(table)
    inputs = [
        f"{sim.graph.inputs[int(place.slot)].path} {sim.precision_at(place) or 'fp32'}"
        for place in sim.places()
        if place.kind is PlaceKind.MODEL_INPUT
    ]
    out_console.print(
        "model inputs: " + (", ".join(inputs) or "not quantized"), markup=False, highlight=False
    )


@app.command()
def apply(
    model: Annotated[str, typer.Argument(help=_MODEL_HELP)],
    profile: Annotated[Path, typer.Option("--profile", "-p", help="Profile of requests (.yaml/.yml/.json).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the reports and the exported model.")],
    config: Annotated[str | None, typer.Option("--config", "-c", help=_CONFIG_HELP)] = None,
    batches: Annotated[
        int, typer.Option("--calibrate", min=1, help="Random batches for compute_encodings.")
    ] = 8,
    prefix: Annotated[
        str | None, typer.Option(help="Export file name prefix (default: the model's).")
    ] = None,
    strict: Annotated[
        bool | None, typer.Option("--strict/--no-strict", help="Override the profile's strict.")
    ] = None,
    export: Annotated[bool, typer.Option("--export/--no-export", help="Export ONNX + encodings.")] = True,
) -> None:
    """The whole flow: build the sim, apply a profile, calibrate on random data, report, export."""
    loaded_profile: Profile = load_profile(profile)  # before the model: a bad profile fails fast
    loaded = load_model(model)
    sim = _sim(loaded, config)
    mp = MixedPrecisionConfigurator(sim)
    mp.apply_profile(loaded_profile)
    out.mkdir(parents=True, exist_ok=True)
    report = mp.apply(
        log_file=out / "mmp_log.txt", strict=loaded_profile.strict if strict is None else strict
    )
    calibrate(sim, loaded.dummy_input, batches)
    report.note_calibration(empty_rows(sim))
    files = write_outputs(report, out, f"mixprec: {loaded.name} with {profile.name}")
    if export:
        name = prefix or re.sub(r"\W+", "_", loaded.name)
        try:
            result = sim.export(str(out), name, dummy_input=loaded.dummy_input)
            out_console.print(result.summary(), markup=False, highlight=False, soft_wrap=True)
            files += sorted(p for p in out.iterdir() if p.name.startswith(name))
        except ImportError as exc:
            err_console.print(
                f"export skipped: {exc} (needs mixprec.export.exporter and 'pip install mixprec[export]'; or pass --no-export)",
                markup=False,
                soft_wrap=True,
            )
    _summary(loaded.name, sim, report, files)


# `mixprec sensitivity`, in its own module; it gets MODEL loading from here (it cannot import cli)
register_sensitivity(app, load_model, _sim, _random_like, out_console, err_console)


def _fmt(values: list[str | None]) -> str:
    return ", ".join(v or "-" for v in values) or "-"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning errors into one line on stderr."""
    try:
        app(args=argv, prog_name="mixprec")
    except KeyboardInterrupt:
        print("mixprec: interrupted", file=sys.stderr)
        sys.exit(130)
    except _USER_ERRORS as exc:
        if os.environ.get("MIXPREC_DEBUG"):
            raise
        print(f"mixprec: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 (a bug, not a user error: still one line, with how to see more)
        if os.environ.get("MIXPREC_DEBUG"):
            raise
        print(
            f"mixprec: internal error: {type(exc).__name__}: {_one_line(exc)} (MIXPREC_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()

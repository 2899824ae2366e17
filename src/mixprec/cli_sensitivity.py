"""``mixprec sensitivity MODEL``: rank layers by how much a precision hurts, write JSON and HTML.

Registered on the ``mixprec`` app by :mod:`mixprec.cli`, which hands over how it resolves MODEL,
builds the sim and makes random batches, so the command behaves as the others do.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from torch import nn

_TARGETS_HELP = (
    "What to try, repeatable: a torch.nn class name (Conv2d, Linear), an import path "
    "(transformers.models.llama.modeling_llama.LlamaDecoderLayer, torch.matmul), a layer name, glob or 're:' regex."
)


def parse_target(text: str) -> Any:
    """``Conv2d`` -> nn.Conv2d; ``pkg.mod.Name`` -> the imported object; anything else stays a name/glob/regex.

    Raises:
        ValueError: an import path whose module cannot be imported or has no such attribute.
    """
    if text.startswith("re:") or any(c in text for c in "*?["):
        return text
    if hasattr(nn, text) and isinstance(getattr(nn, text), type):
        return getattr(nn, text)
    module_name, _, attr = text.rpartition(".")
    if module_name and attr[:1].isupper() or module_name in ("torch", "torch.nn.functional"):
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(
                f"--targets {text!r}: cannot import {attr!r} from {module_name!r}: {exc}"
            ) from exc
    return text  # a layer or module name


def parse_params(values: list[str], block_size: int | None) -> dict[str, Any]:
    """``["weight=int4"]`` -> ``{"weight": "int4"}`` (per block when ``block_size`` is given)."""
    params: dict[str, Any] = {}
    for item in values:
        name, sep, precision = item.partition("=")
        if not sep or not name or not precision:
            raise ValueError(f"--param {item!r} is not NAME=PRECISION, e.g. weight=int4")
        params[name] = precision if block_size is None else {"precision": precision, "block_size": block_size}
    return params


def register(
    app: typer.Typer,
    load_model: Callable[[str], Any],
    build_sim: Callable[[Any, str | None], Any],
    random_like: Callable[[Any], Any],
    out_console: Any,
    err_console: Any,
) -> None:
    """Add the ``sensitivity`` command to ``app``, with the CLI's MODEL loading and consoles."""

    @app.command()
    def sensitivity(
        model: Annotated[str, typer.Argument(help="torchvision:<name>, <module>:<factory>, or demo.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Folder for sensitivity.json and .html.")],
        targets: Annotated[list[str], typer.Option("--targets", "-t", help=_TARGETS_HELP)],
        param: Annotated[
            list[str] | None, typer.Option("--param", "-p", help="NAME=PRECISION to try, e.g. weight=int4.")
        ] = None,
        activation: Annotated[str | None, typer.Option(help="Activation precision to try.")] = None,
        block_size: Annotated[int | None, typer.Option(help="Try the params per block of this size.")] = None,
        config: Annotated[
            str | None, typer.Option("--config", "-c", help="Sim config preset or JSON.")
        ] = None,
        batches: Annotated[
            int, typer.Option("--batches", min=1, help="Random batches shaped like the input.")
        ] = 4,
        top: Annotated[int, typer.Option(help="Rows shown in the terminal.")] = 20,
        suggest_sqnr: Annotated[
            float | None,
            typer.Option(help="Also write suggested_profile.yaml meeting this output SQNR (dB)."),
        ] = None,
    ) -> None:
        """Try a precision on each target layer alone; rank the layers by the drop in output SQNR."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from mixprec.analysis.sweep import analyze_sensitivity

        params = parse_params(param or [], block_size)
        parsed_targets = [parse_target(t) for t in targets]
        loaded = load_model(model)
        sim = build_sim(loaded, config)
        data = [random_like(loaded.dummy_input) for _ in range(batches)]
        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err_console, transient=True,
        )  # fmt: skip
        with bar:
            task = bar.add_task("sensitivity", total=None)

            def advance(done: int, total: int, name: str) -> None:
                bar.update(task, completed=done, total=total, description=f"sensitivity {name}")

            rep = analyze_sensitivity(
                sim, [_as_batch(b) for b in data], parsed_targets, param=params or None,
                activation=activation, progress=advance,
            )  # fmt: skip
        table = Table(
            title=f"{loaded.name}: {len(rep.rows)} candidates at {rep.tried}; baseline {rep.baseline:.2f} dB"
        )
        for column in ("#", "Layer", "Type", "SQNR dB", "Δ dB", "Local dB", "Params"):
            table.add_column(column, justify="left" if column in ("Layer", "Type") else "right")
        for i, r in enumerate(rep.rows[:top], 1):
            local = "-" if r.local_sqnr_db is None else f"{r.local_sqnr_db:.2f}"
            table.add_row(
                str(i), r.layer, r.type, f"{r.metric:.2f}", f"{r.delta:+.2f}", local, f"{r.params:,}"
            )
        out_console.print(table)
        out.mkdir(parents=True, exist_ok=True)
        files = [out / "sensitivity.json", out / "sensitivity.html"]
        rep.to_json(files[0])
        rep.to_html(files[1], title=f"Sensitivity of {loaded.name}: {rep.tried}")
        if suggest_sqnr is not None:
            files.append(rep.suggest(min_sqnr_db=suggest_sqnr).save(out / "suggested_profile.yaml"))
        for path in files:
            out_console.print(f"wrote {path}", markup=False, highlight=False)


def _as_batch(inputs: Any) -> Any:
    """A dummy-input-shaped value as a batch: a tuple of positional inputs stays a tuple."""
    return tuple(inputs) if isinstance(inputs, list) else inputs

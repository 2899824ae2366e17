"""Export a PrecisionState: float ONNX model, encodings file, and a QDQ ONNX model.

``sim.export(path, prefix, dummy_input)`` writes three files into ``path``:

* ``<prefix>.onnx``: the float model (``torch.onnx``, torch.export-based exporter; the legacy
  TorchScript exporter if that fails, with a note);
* ``<prefix>.encodings``: every quantizer's encoding, AIMET 0.6.1 JSON keyed by tensor names
  of ``<prefix>.onnx`` (see docs/export.md);
* ``<prefix>_qdq.onnx``: the same graph with a QuantizeLinear/DequantizeLinear pair (or Cast
  pair) at every quantizer of the sim, which onnxruntime runs like the sim.

All three come from one export of ``sim.model`` in which each quantizer emits a marker node
(:mod:`mixprec.export.trace`), so they share tensor names. Before anything is renamed into
place, the written files are read back and checked to cover every quantizer at its precision.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

try:
    import onnx
except ImportError as exc:  # an optional dependency: say how to get it
    raise ImportError("export needs onnx and onnxruntime: pip install 'mixprec[export]'") from exc
from torch.utils import _pytree as pytree

from mixprec.capture.recorder import split_dummy_input
from mixprec.errors import ExportError
from mixprec.export.coverage import check_coverage, keys_by_quantizer
from mixprec.export.encodings import Row, build_encodings
from mixprec.export.loading import load_encodings_into
from mixprec.export.onnx_graph import rename_io, strip_markers
from mixprec.export.qdq import QdqSpec, insert_qdq
from mixprec.export.trace import export_with_markers
from mixprec.quant.quantizers import IntQuantizer, QuantizerBase
from mixprec.sim.placement import Place, PlaceKind
from mixprec.sim.state import PrecisionState

DEFAULT_OPSET = 21  # the first opset with int4/int16 QuantizeLinear types
MIN_OPSET = 18  # the torch.export-based exporter writes 18 and later
T = TypeVar("T")
_log = logging.getLogger("mixprec.export")


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote, and how completely it covers the sim.

    Attributes:
        onnx_path / encodings_path / qdq_onnx_path: the written files.
        quantizers: quantizers in the sim; ``covered``: those found, at their precision, in
            both the encodings file and the QDQ model (export raises unless they are equal).
        activation_encodings / param_encodings: entries (tensor names) in the encodings file.
        by_precision: quantizers per precision name; ``by_form``: per ONNX form (``qdq``,
            ``qdq+clip``, ``cast``, ``emulated``; see ``mixprec.export.qdq``).
        exporter: ``"dynamo"`` (torch.export-based) or ``"torchscript"``; ``opset``: ONNX opset.
        notes: anything the user should know (exporter fallback).
        seconds: wall time of the export.
    """

    onnx_path: Path
    encodings_path: Path
    qdq_onnx_path: Path
    quantizers: int
    covered: int
    activation_encodings: int
    param_encodings: int
    by_precision: dict[str, int]
    by_form: dict[str, int]
    exporter: str
    opset: int
    notes: tuple[str, ...]
    seconds: float

    def summary(self) -> str:
        """One line: coverage, precisions, files."""
        precisions = ", ".join(f"{k} {v}" for k, v in sorted(self.by_precision.items()))
        text = (
            f"mixprec export: {self.covered}/{self.quantizers} quantizers covered ({precisions}; "
            f"{self.activation_encodings} activation + {self.param_encodings} param encodings) -> "
            f"{self.onnx_path.name}, {self.encodings_path.name}, {self.qdq_onnx_path.name} in "
            f"{self.onnx_path.parent} [{self.exporter} exporter, opset {self.opset}, {self.seconds:.1f}s]"
        )
        return text + "".join(f"; note: {n}" for n in self.notes)


def export_sim(
    sim: PrecisionState,
    path: str | os.PathLike,
    filename_prefix: str,
    dummy_input: Any = None,
    onnx_opset: int | None = None,
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> ExportResult:
    """Write ``<prefix>.onnx``, ``<prefix>.encodings`` and ``<prefix>_qdq.onnx`` into ``path``.

    Args:
        sim: a sim whose quantizers all have encodings (after ``compute_encodings`` or
            ``load_encodings``).
        path: the target folder (created if missing).
        filename_prefix: file name stem, without folders.
        dummy_input: input of the export trace, as for the sim's constructor. None: random
            tensors of the shapes captured when the sim was built (float inputs only).
        onnx_opset: ONNX opset, 18 or later; default 21 (below 21, int4 is written as int8 with a clip
            and int16, int32 and per-block quantizers as float ops; fp8 needs 19).
        input_names / output_names: names of the ONNX graph's inputs/outputs (one per model
            input/output); default: the model's I/O paths.

    Returns:
        An :class:`ExportResult`; its one-line summary is also logged (logger ``mixprec.export``, INFO).

    Raises:
        ExportError: a quantizer has no encoding, the folder cannot be written, the exporter
            failed, or a quantizer is missing from the artifacts (the message names it).
            Nothing is left in ``path`` when it raises.
        ValueError: bad prefix or opset, or no ``dummy_input`` where one is needed.

    Example:
        >>> sim.compute_encodings(lambda m, _: m(x), None)
        >>> result = sim.export("out/", "mobilenet", dummy_input=x)
        >>> result.covered == result.quantizers
        True
    """
    start = time.perf_counter()
    opset = DEFAULT_OPSET if onnx_opset is None else int(onnx_opset)
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(
            f"onnx_opset must be in {MIN_OPSET}..{onnx.defs.onnx_opset_version()}, got {onnx_opset!r}"
        )
    folder = _check_target(Path(path), filename_prefix)
    entries = list(sim.quantizers())
    _check_encodings(entries, getattr(sim, "empty_at_calibration", []))
    args, kwargs = _default_dummy_input(sim) if dummy_input is None else split_dummy_input(dummy_input)

    try:
        traced = export_with_markers(sim.model, args, kwargs, [q for _, q in entries], opset, sim.runtime)
    except RuntimeError as exc:
        raise ExportError(f"could not export {type(sim.model).__name__} to ONNX: {exc}") from exc
    for note in traced.notes:
        warnings.warn(note, stacklevel=3)
    rename_io(
        traced.model.graph,
        _io_names("input_names", input_names, [io.path for io in sim.graph.inputs]),
        _io_names("output_names", output_names, [io.path for io in sim.graph.outputs]),
    )
    try:
        float_model, sites = strip_markers(traced.model)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if _default_opset(float_model) != opset:
        try:
            float_model = onnx.version_converter.convert_version(float_model, opset)
        except RuntimeError as exc:
            raise ExportError(f"cannot convert the exported model to opset {opset}: {exc}") from None
    keys = keys_by_quantizer(sim, entries, sites, traced)
    specs = [_spec(sim, place, q, key) for i, (place, q) in enumerate(entries) for key in keys[i]]
    try:
        typed = onnx.shape_inference.infer_shapes(float_model)  # element types and ranks for the Q/DQ pass
        qdq_model, forms = insert_qdq(typed, specs, opset)
    except ValueError as exc:
        raise ExportError(f"cannot write the QDQ model: {exc}") from None
    rows = _rows(sim, entries, keys)
    document = build_encodings(sim, rows)

    prefix = filename_prefix
    names = {"onnx": f"{prefix}.onnx", "encodings": f"{prefix}.encodings", "qdq": f"{prefix}_qdq.onnx"}
    payloads = {
        names["onnx"]: _serialize(float_model),
        names["encodings"]: json.dumps(document, indent=1).encode(),
        names["qdq"]: _serialize(qdq_model),
    }

    def verify(temps: dict[str, Path]) -> tuple[Counter, Counter]:
        return check_coverage(
            sim,
            entries,
            keys,
            specs,
            opset,
            temps[names["onnx"]],
            temps[names["encodings"]],
            temps[names["qdq"]],
        )

    by_precision, by_form = _write_atomically(folder, payloads, verify)
    result = ExportResult(
        onnx_path=folder / names["onnx"],
        encodings_path=folder / names["encodings"],
        qdq_onnx_path=folder / names["qdq"],
        quantizers=len(entries),
        covered=sum(by_precision.values()),
        activation_encodings=len(document["activation_encodings"]),
        param_encodings=len(document["param_encodings"]),
        by_precision=dict(by_precision),
        by_form=dict(by_form),
        exporter=traced.exporter,
        opset=opset,
        notes=tuple(traced.notes),
        seconds=time.perf_counter() - start,
    )
    _log.info(result.summary())  # a library logs; the CLI prints it
    return result


def load_encodings(sim: PrecisionState, path: str | os.PathLike) -> None:
    """Load an ``.encodings`` file written by :func:`export_sim` into ``sim``'s quantizers.

    The file decides each place's precision (a quantizer at another precision is rebuilt, one
    the exported sim did not have is removed), so a fresh sim of the same model and config
    reproduces the exported sim's forward bit for bit.

    Precisions are taken over only from a file of the same model (same layers and parameter
    shapes); another model's file must agree with the sim's precisions.

    Raises:
        EncodingFileError: the file is not a mixprec encodings file, is malformed, or does not fit
            this sim (the message names the entry and the quantizer). The sim is unchanged then.
        OSError: the file cannot be read.
    """
    load_encodings_into(sim, path)


# ----------------------------------------------------------------------------- checks before export


def _check_target(folder: Path, prefix: str) -> Path:
    if not isinstance(prefix, str) or not prefix or prefix in (".", "..") or re.search(r"[/\\]", prefix):
        raise ValueError(f"filename_prefix must be a file name without folders, got {prefix!r}")
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ExportError(f"cannot write to {folder}: {probe} is not a directory; nothing was written")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write to {folder}: {probe} is not writable; nothing was written")
    return folder


def _check_encodings(entries: list[tuple[Place, QuantizerBase]], empty: list[str]) -> None:
    missing = [q.label for _, q in entries if q.needs_encoding and not q.is_initialized()]
    if not missing:
        return
    starved = [m for m in missing if m in empty]
    calibrated = any(q.needs_encoding and q.is_initialized() for _, q in entries)
    if starved:
        why = (
            f"{len(starved)} of them saw only empty tensors during calibration (sim.empty_at_calibration): "
            "calibrate with data that reaches those layers (a detector that detects something), or "
        )
    elif calibrated:  # the others have encodings: these layers were off the calibration data's path
        why = (
            "their layers did not run during compute_encodings (a path the calibration data did not take, "
            "or first run after it, e.g. on inputs of other shapes): "
            "run sim.compute_encodings(forward_pass_callback, args) with data that reaches them, or "
        )
    else:
        why = "call sim.compute_encodings(forward_pass_callback, args) or "
    shown = ", ".join(repr(m) for m in missing[:5]) + (
        f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    )
    raise ExportError(
        f"cannot export: {len(missing)} of {len(entries)} quantizers have no encoding ({shown}); {why}"
        "sim.load_encodings(path) first. Nothing was written"
    )


def _default_dummy_input(sim: PrecisionState) -> tuple[tuple, dict]:
    inputs = sim.graph.inputs
    spec = sim.graph.input_structure
    if not all(io.is_float for io in inputs) or getattr(spec, "num_leaves", -1) != len(inputs):
        raise ValueError("this model has non-float or non-tensor inputs: pass dummy_input=... to export")
    param = next(sim.model.parameters(), None)
    kw = {} if param is None else {"device": param.device, "dtype": param.dtype}
    leaves = [torch.randn(sim.graph.tensors[io.tensor].shape, **kw) for io in inputs]
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return tuple(args), dict(kwargs)


def _io_names(arg: str, names: list[str] | None, paths: list[str]) -> list[str]:
    if names is None:
        return paths
    names = list(names)
    if len(names) != len(paths) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{arg} must list {len(paths)} non-empty names (the model's {paths}), got {names!r}")
    return names


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _spec(sim: PrecisionState, place: Place, q: QuantizerBase, key: str) -> QdqSpec:
    if not q.needs_encoding:
        return QdqSpec(key, q.label, q.precision, q.granularity)
    enc = q.get_encoding()
    offset = None if enc.offset is None else enc.offset.cpu().numpy()
    # the quantizer drops the lowest code of signed strict grids only (see IntQuantizer._refresh)
    strict = isinstance(q, IntQuantizer) and q.symmetric and q.strict_symmetric and bool((offset < 0).any())  # type: ignore[operator]
    grid = None
    if place.kind is PlaceKind.PARAM:
        with torch.no_grad():
            grid = q(sim.param_tensor(place).detach()).float().cpu().numpy()
    mask = q.mask_threshold if q.passes_masks else None
    return QdqSpec(
        key, q.label, q.precision, q.granularity, enc.scale.cpu().numpy(), offset, strict, grid, mask
    )  # type: ignore[union-attr]


def _rows(
    sim: PrecisionState, entries: list[tuple[Place, QuantizerBase]], keys: list[list[str]]
) -> list[Row]:
    rows = [Row(place, q, tuple(keys[i])) for i, (place, q) in enumerate(entries)]
    # places without a quantizer are listed too, so loading can remove one a fresh sim has there
    rows += [Row(place, None, ()) for place in sim.places() if sim.quantizer_at(place) is None]
    return rows


# ----------------------------------------------------------------------------- writing


def _serialize(model: onnx.ModelProto) -> bytes:
    try:
        return model.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GB limit
        raise ExportError(
            f"the ONNX model is too large to write as one file ({exc}); nothing was written"
        ) from None


def _write_atomically(folder: Path, payloads: dict[str, bytes], verify: Callable[[dict[str, Path]], T]) -> T:
    """Write every payload to a temporary name in ``folder``, verify, then rename all into place.

    On any failure the temporary files, and files already renamed by this call, are removed.
    """
    temps: dict[str, Path] = {}
    placed: list[Path] = []
    name = ""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in payloads.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder)
            temps[name] = Path(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
        result = verify(temps)
        for name, tmp in temps.items():
            os.replace(tmp, folder / name)
            placed.append(folder / name)
        return result
    except BaseException as exc:
        for path in placed:
            path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ExportError(f"could not write {folder / name}: {exc}; nothing was written") from exc
        raise
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)

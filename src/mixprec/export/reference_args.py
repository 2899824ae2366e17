"""``sim.export`` with the reference's arguments: ``onnx_export_args``, ``propagate_encodings``,
``export_to_torchscript``, ``use_embedded_encodings``, ``export_model``,
``filename_prefix_encodings`` (docs/porting_from_aimet.md says what each does here).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixprec.errors import UnsupportedArgumentError
from mixprec.export.exporter import ExportResult, export_sim

if TYPE_CHECKING:
    from mixprec.sim.state import PrecisionState


# torch.onnx.export options with no effect on what mixprec writes (constants are folded and
# parameters stored as initializers either way; the written model is checked by onnx anyway)
_IGNORED_ONNX_ARGS = frozenset(
    {
        "export_params",
        "do_constant_folding",
        "keep_initializers_as_inputs",
        "verbose",
        "training",
        "enable_onnx_checker",
    }
)
_USED_ONNX_ARGS = frozenset({"opset_version", "input_names", "output_names"})


def _as_dict(onnx_export_args: Any) -> dict[str, Any]:
    if onnx_export_args is None:
        return {}
    if isinstance(onnx_export_args, Mapping):
        return dict(onnx_export_args)
    # the reference's OnnxExportApiArgs: an object whose attributes are the options
    if hasattr(onnx_export_args, "__dict__"):
        return {k: v for k, v in vars(onnx_export_args).items() if not k.startswith("_")}
    raise UnsupportedArgumentError(
        f"onnx_export_args must be a dict (e.g. {{'opset_version': 21}}) or an object with those "
        f"attributes, got {type(onnx_export_args).__name__}"
    )


def export_reference(
    sim: PrecisionState,
    path: str | os.PathLike,
    filename_prefix: str,
    dummy_input: Any,
    onnx_export_args: Any,
    propagate_encodings: bool,
    onnx_opset: int | None,
    reference_kwargs: dict[str, Any],
) -> ExportResult:
    """Translate the reference's export arguments, then :func:`export_sim`.

    Raises:
        UnsupportedArgumentError: an argument whose meaning mixprec does not provide; the
            message names the alternative. Nothing is written then.
    """
    options = _as_dict(onnx_export_args)
    unknown = sorted(set(options) - _USED_ONNX_ARGS - _IGNORED_ONNX_ARGS)
    if "dynamic_axes" in unknown:
        raise UnsupportedArgumentError(
            "onnx_export_args['dynamic_axes']: mixprec writes ONNX models with the shapes of dummy_input; "
            "export with a dummy_input of the deployment shape"
        )
    if unknown:
        raise UnsupportedArgumentError(
            f"onnx_export_args keys {unknown} are not supported; accepted: {sorted(_USED_ONNX_ARGS)} "
            f"(and, without effect here, {sorted(_IGNORED_ONNX_ARGS)})"
        )
    opset = options.get("opset_version")
    if opset is not None and onnx_opset is not None and int(opset) != int(onnx_opset):
        raise UnsupportedArgumentError(
            f"onnx_opset={onnx_opset} and onnx_export_args['opset_version']={opset} disagree; pass one of them"
        )
    opset = onnx_opset if onnx_opset is not None else opset
    if propagate_encodings:
        raise UnsupportedArgumentError(
            "propagate_encodings=True: mixprec's encodings file has an entry for every tensor a quantizer "
            "acts on, and <prefix>_qdq.onnx carries every quantizer, so there is nothing to propagate; "
            "drop the argument"
        )
    prefix_encodings = _check_reference_kwargs(reference_kwargs)
    result = export_sim(
        sim,
        path,
        filename_prefix,
        dummy_input,
        opset,
        input_names=options.get("input_names"),
        output_names=options.get("output_names"),
    )
    if prefix_encodings and prefix_encodings != filename_prefix:
        target = Path(result.encodings_path).with_name(f"{prefix_encodings}.encodings")
        os.replace(result.encodings_path, target)
        result = dataclasses.replace(result, encodings_path=target)
    return result


def _check_reference_kwargs(kwargs: dict[str, Any]) -> str | None:
    """The reference's other export keywords; returns ``filename_prefix_encodings``."""
    kwargs = dict(kwargs)
    prefix = kwargs.pop("filename_prefix_encodings", None)
    if prefix is not None and (not isinstance(prefix, str) or not prefix or "/" in prefix or "\\" in prefix):
        raise UnsupportedArgumentError(
            f"filename_prefix_encodings must be a file name without folders, got {prefix!r}"
        )
    if kwargs.pop("export_to_torchscript", False):
        raise UnsupportedArgumentError(
            "export_to_torchscript=True: mixprec exports ONNX only (<prefix>.onnx, <prefix>.encodings, "
            "<prefix>_qdq.onnx); drop the argument"
        )
    # the QDQ model (<prefix>_qdq.onnx) is the reference's "model with embedded encodings": always written
    kwargs.pop("use_embedded_encodings", None)
    if kwargs.pop("export_model", True) is False:
        raise UnsupportedArgumentError(
            "export_model=False: mixprec writes the ONNX model and its encodings together (their tensor "
            "names come from one export); drop the argument"
        )
    if kwargs:
        raise UnsupportedArgumentError(
            f"export got unexpected keyword arguments {sorted(kwargs)}; accepted: path, filename_prefix, "
            "dummy_input, onnx_export_args, propagate_encodings, onnx_opset, export_to_torchscript=False, "
            "use_embedded_encodings, export_model=True, filename_prefix_encodings"
        )
    return prefix

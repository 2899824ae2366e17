"""Graph surgery on the exported ONNX model: readable I/O names, and markers removed.

Removing a marker must leave, for each quantizer, one tensor name of the float model that
holds exactly the value the quantizer quantizes (the encodings file is keyed by it). Where
the marker's input is read only by the marker, the marker disappears and the input's name
is the key. Where that input is also read unquantized elsewhere, is already the key of
another quantizer (a quantizer right after another), or is a graph input that is also an
output, the marker becomes an ``Identity`` and its output is the key: the float model then
keeps one distinct name per quantized value.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import onnx

from mixprec.export.trace import MARKER_DOMAIN, MARKER_OP


@dataclass(frozen=True)
class MarkerSite:
    """Where quantizer ``index`` acts in the float model: the tensor named ``key``."""

    index: int
    key: str


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph``, including those of control-flow subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from iter_nodes(sub)


def marker_index(node: onnx.NodeProto) -> int | None:
    """The quantizer index of a marker node, None for any other node."""
    if node.domain != MARKER_DOMAIN or node.op_type != MARKER_OP:
        return None
    return next(a.i for a in node.attribute if a.name == "index")


def tensor_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name of the top-level graph: inputs, initializers, node outputs."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names.update(o for n in graph.node for o in n.output if o)
    return names


def unique_name(base: str, used: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever is not in ``used`` (which it joins)."""
    name, n = base, 0
    while name in used:
        n += 1
        name = f"{base}_{n}"
    used.add(name)
    return name


def set_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Replace the graph's nodes (copied first: clearing the field would detach them)."""
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere in the top-level graph."""
    for node in graph.node:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name == old:
                    seq[i] = new
    for seq in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in seq:
            if item.name == old:
                item.name = new


def io_name(path: str) -> str:
    """ONNX-friendly name of a model I/O path: ``input[0]`` -> ``input_0``, ``output.logits`` -> ``output_logits``."""
    return re.sub(r"\W+", "_", path).strip("_") or "tensor"


def rename_io(graph: onnx.GraphProto, input_paths: list[str], output_paths: list[str]) -> None:
    """Name graph inputs/outputs after the model's I/O paths, where the counts agree.

    The exporters name them ``args_0`` / ``mixprec::Marker_0``; the sim's paths are what the
    user knows. Where the counts differ (an input the exporter dropped), names stay as exported.
    """
    initializers = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    outputs = list(dict.fromkeys(o.name for o in graph.output))
    used = tensor_names(graph) | {o.name for o in graph.output}
    for old_names, paths in ((inputs, input_paths), (outputs, output_paths)):
        if len(old_names) != len(paths):
            continue
        for old, path in zip(old_names, paths, strict=True):
            used.discard(old)
            rename_tensor(graph, old, unique_name(io_name(path), used))


def strip_markers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[MarkerSite]]:
    """The float model (a copy of ``model`` without markers) and where each marker was.

    Raises:
        ValueError: a marker sits inside a control-flow subgraph (not supported).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    outputs = {o.name for o in graph.output}
    fixed = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    uses = Counter(name for n in graph.node for name in n.input if name)
    uses.update(outputs)
    producer = {name: n for n in graph.node for name in n.output}
    alias: dict[str, str] = {}
    claimed: set[str] = set()
    sites: list[MarkerSite] = []
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            while name in alias:
                name = alias[name]
            node.input[i] = name
        index = marker_index(node)
        if index is None:
            kept.append(node)
            continue
        a, b = node.input[0], node.output[0]
        sole = uses[a] == 1 and a not in claimed
        if sole and b not in outputs:
            alias[b] = a  # readers of the marker read its input
            uses[a] += uses[b] - 1
            key = a
        elif sole and a not in fixed:
            producer[a].output[list(producer[a].output).index(a)] = b  # a graph output keeps its name
            key = b
        else:
            node.op_type, node.domain, node.name = "Identity", "", f"{b}/Identity"
            del node.attribute[:]
            kept.append(node)
            key = b
        claimed.add(key)
        sites.append(MarkerSite(index, key))
    set_nodes(graph, kept)
    if any(marker_index(n) is not None for n in iter_nodes(graph)):
        raise ValueError(
            "a quantizer sits inside a control-flow subgraph (If/Loop); export does not support that"
        )
    present = tensor_names(graph) | outputs
    live = [v for v in graph.value_info if v.name in present]
    del graph.value_info[:]
    graph.value_info.extend(live)
    opsets = [o for o in out.opset_import if o.domain != MARKER_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(opsets)
    return out, sites

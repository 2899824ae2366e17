"""The properties checked after every ``apply`` of the property suite (tests/test_properties.py).

Each check recomputes what docs/rules.md promises from the sim as apply left it, with helpers
written independently of mixprec's own resolution code (the producer walk, fused groups).
"""

from __future__ import annotations

from mixprec import Precision, QuantizationSimModel
from mixprec.core.precision import FP32
from mixprec.sim.placement import Place, PlaceKind

from .strategies import RequestSpec, expected_layers

# -- helpers -----------------------------------------------------------------------------------------


def precisions(sim: QuantizationSimModel) -> dict[Place, tuple[int | None, Precision | None]]:
    return {
        p: (id(q) if (q := sim.quantizer_at(p)) is not None else None, sim.precision_at(p))
        for p in sim.places()
    }


def name(p: Precision | None) -> str | None:
    return None if p is None else p.name


def wanted(text: str | None) -> str | None:
    """What the sim holds after a request for ``text``: its canonical name, or None for fp32."""
    if text is None:
        return None
    p = Precision.parse(text)
    return None if p.is_full else p.name


def by_design_fused(sim: QuantizationSimModel, layer: int, slot: int) -> bool:
    template = sim.placement.outputs[layer][slot]
    return template is None or layer in sim.placement.fused or template.initial is None


def effective_inputs(
    sim: QuantizationSimModel, layer_index: int, memo: dict[int, Precision | None]
) -> list[Precision | None]:
    """docs/rules.md rule 2, 'producer quantizer of an input', written independently of mixprec.sim.effective."""
    graph = sim.graph
    layer = graph.layers[layer_index]
    result: list[Precision | None] = []
    for slot, tid in enumerate(layer.inputs):
        if not layer.input_is_float[slot]:
            result.append(None)
            continue
        if sim.placement.inputs[layer_index][slot] is not None and sim.precision_at(
            Place(PlaceKind.INPUT, layer_index, slot)
        ):
            result.append(sim.precision_at(Place(PlaceKind.INPUT, layer_index, slot)))
            continue
        result.append(None if tid is None else value_precision(sim, tid, memo))
    return result


def value_precision(
    sim: QuantizationSimModel, tid: int, memo: dict[int, Precision | None]
) -> Precision | None:
    graph = sim.graph
    node = graph.tensors[graph.source(tid)]
    if node.model_input is not None:
        i = node.model_input
        return (
            sim.precision_at(Place(PlaceKind.MODEL_INPUT, None, i)) if sim.placement.model_inputs[i] else None
        )
    if node.producer is None:
        return None
    producer, slot = node.producer
    q = (
        sim.quantizer_at(Place(PlaceKind.OUTPUT, producer, slot))
        if sim.placement.outputs[producer][slot]
        else None
    )
    if q is not None:
        return q.precision
    if not by_design_fused(sim, producer, slot):
        return None  # a request removed the quantizer (fp32)
    if producer not in memo:
        found = [p for p in effective_inputs(sim, producer, memo) if p is not None]
        memo[producer] = max(found) if found else None
    return memo[producer]


def fused_upstream(sim: QuantizationSimModel, layer_index: int) -> set[int]:
    """The layer and every producer it computes fused with (no output quantizer), transitively."""
    graph = sim.graph
    seen = {layer_index}
    stack = [layer_index]
    while stack:
        layer = graph.layers[stack.pop()]
        for tid in layer.inputs:
            if tid is None:
                continue
            node = graph.tensors[graph.source(tid)]
            if node.producer is None:
                continue
            p, slot = node.producer
            fused = sim.quantizer_at(Place(PlaceKind.OUTPUT, p, slot)) is None and by_design_fused(
                sim, p, slot
            )
            if fused and p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


# -- the properties after a successful apply ----------------------------------------------------------------


def check_one_precision_per_tensor(sim: QuantizationSimModel) -> None:
    graph = sim.graph
    memo: dict[int, Precision | None] = {}
    table = {row["name"]: row for row in sim.precision_table()}
    for layer in graph.layers:
        if layer.data_movement or layer.name not in table:
            continue
        mine = [name(p) for p in effective_inputs(sim, layer.index, memo)]
        assert table[layer.name]["effective_inputs"] == mine, f"precision_table disagrees for {layer.name}"
    sources = {graph.source(t) for t in graph.tensors}
    for tid in sources:
        seen = {}
        for reader, slot in graph.readers(tid):
            if sim.placement.inputs[reader.index][slot] is not None and sim.precision_at(
                Place(PlaceKind.INPUT, reader.index, slot)
            ):
                continue  # reads through its own input quantizer
            seen[f"{reader.name}[{slot}]"] = name(effective_inputs(sim, reader.index, memo)[slot])
        assert len(set(seen.values())) <= 1, f"tensor {tid} read at several precisions: {seen}"


def lost(report: dict, rid: int, layers: set[str]) -> bool:
    return any(c["loser"] == rid and c["loser_layer"] in layers for c in report["conflicts"])


def latest_layer_requests(
    sim: QuantizationSimModel, issued: list[tuple[int, RequestSpec]]
) -> dict[int, tuple[int, RequestSpec]]:
    """Layer index -> the last ``(request id, spec)`` issued on it (input/output requests left out)."""
    latest: dict[int, tuple[int, RequestSpec]] = {}
    for rid, spec in issued:
        if spec.kind not in ("input", "output"):
            for index in expected_layers(sim, spec):
                latest[index] = (rid, spec)
    return latest


def check_latest_request_holds(
    sim: QuantizationSimModel, report: dict, issued: list[tuple[int, RequestSpec]]
) -> None:
    graph = sim.graph
    memo: dict[int, Precision | None] = {}
    for index, (rid, spec) in latest_layer_requests(sim, issued).items():
        layer = graph.layers[index]
        exempt_layers = {graph.layers[i].name for i in fused_upstream(sim, index)}
        if spec.activation is not None:
            asked = (
                spec.activation
                if isinstance(spec.activation, list)
                else [spec.activation] * len(layer.inputs)
            )
            got = effective_inputs(sim, index, memo)
            for slot, text in enumerate(asked):
                if text is None or layer.inputs[slot] is None or not layer.input_is_float[slot]:
                    continue
                if name(got[slot]) != wanted(text) and not lost(report, rid, exempt_layers):
                    raise AssertionError(
                        f"layer {layer.name} input {slot}: request {rid} {spec} asked {text}, "
                        f"reads {name(got[slot])}; conflicts: {report['conflicts']}"
                    )
        for pname, text in spec.param or ():
            if pname not in layer.params:
                continue
            place = Place(PlaceKind.PARAM, index, pname)
            if name(sim.precision_at(place)) != wanted(text):
                quantizer = sim.describe(place)
                assert any(c["loser"] == rid and c["quantizer"] == quantizer for c in report["conflicts"]), (
                    f"layer {layer.name} param {pname}: request {rid} asked {text}, holds {name(sim.precision_at(place))}"
                )


def check_drawn_in_layers(sim: QuantizationSimModel, report: dict) -> None:
    """Rule 3: a reader drawn in by a shared tensor is treated as requested at that precision (all inputs)."""
    graph = sim.graph
    memo: dict[int, Precision | None] = {}
    for row in report["after_propagation"]:
        if row["reason"] != "shared tensor":
            continue
        layer = graph.layer(row["layer"])
        got = {
            name(p)
            for slot, p in enumerate(effective_inputs(sim, layer.index, memo))
            if layer.inputs[slot] is not None and layer.input_is_float[slot]
        }
        names = {graph.layers[i].name for i in fused_upstream(sim, layer.index)}
        assert len(got) <= 1 or lost(report, row["request"], names), (
            f"layer {layer.name}, drawn in by request {row['request']}, reads {got}"
        )


def check_changes_listed(sim: QuantizationSimModel, before: dict, report: dict) -> None:
    after = precisions(sim)
    listed = {c["quantizer"]: c for c in report["changes"]}
    for place, (qid, precision) in after.items():
        if before[place] != (qid, precision):
            label = sim.describe(place)
            assert label in listed, (
                f"{label} changed {before[place][1]} -> {precision} but the report does not list it"
            )
            assert listed[label]["new"] == name(precision) and listed[label]["old"] == name(before[place][1])
            q = sim.quantizer_at(place)
            if q is not None:
                settings = sim.template_at(place).settings
                assert q.granularity == settings.granularity, label
                assert q.precision.is_float or q.symmetric == settings.symmetric, label
                assert not q.needs_encoding or not q.is_initialized(), (
                    f"{label}: a changed quantizer must need calibration"
                )
    labels = {sim.describe(p) for p in after}
    for label, c in listed.items():
        assert label in labels
        place = next(p for p in after if sim.describe(p) == label)
        assert name(after[place][1]) == c["new"], (
            f"{label}: report says {c['new']}, sim holds {after[place][1]}"
        )


def check_readers_of_changed_tensors_drawn_in(sim: QuantizationSimModel, before: dict, report: dict) -> None:
    """Rule 3: every reader of a tensor whose producer quantizer changed is treated by the plan."""
    graph = sim.graph
    treated = {row["layer"] for row in report["after_propagation"]}
    places = {sim.describe(p): p for p in sim.places() if p.kind in (PlaceKind.OUTPUT, PlaceKind.MODEL_INPUT)}
    for c in report["changes"]:
        place = places.get(c["quantizer"])
        if place is None or c["reason"] == "emitted":  # rule 4: an emitted output draws no reader in
            continue
        if place.kind is PlaceKind.OUTPUT:
            tensor = graph.layers[place.layer].outputs[int(place.slot)]
        else:
            tensor = graph.inputs[int(place.slot)].tensor
        for reader, slot in graph.readers(tensor):
            own = Place(PlaceKind.INPUT, reader.index, slot)
            if (
                sim.placement.inputs[reader.index][slot] is not None
                and before.get(own, (None, None))[1] is not None
            ):
                continue
            assert reader.name in treated, (
                f"{reader.name} reads {c['quantizer']} ({c['old']} -> {c['new']}) but is not in the plan"
            )


def check_plan_matches_sim(sim: QuantizationSimModel, report: dict) -> None:
    """The report describes the sim as apply left it: its layer map and its after-propagation rows."""
    memo: dict[int, Precision | None] = {}
    graph = sim.graph
    for row in report["layers"]:
        layer = graph.layer(row["name"])
        found = [p for p in effective_inputs(sim, layer.index, memo) if p is not None]
        assert row["computes"] == name(max(found) if found else None), row
        outputs = [
            name(sim.precision_at(Place(PlaceKind.OUTPUT, layer.index, s))) if t else None
            for s, t in enumerate(sim.placement.outputs[layer.index])
        ]
        assert row["outputs"] == outputs, row
        assert row["params"] == {
            n: name(sim.precision_at(Place(PlaceKind.PARAM, layer.index, n))) for n in layer.params
        }
    for row in report["after_propagation"]:
        layer = graph.layer(row["layer"])
        assert row["inputs"] == [name(p) for p in effective_inputs(sim, layer.index, memo)], row
    for c in report["conflicts"]:
        assert c["winner_precision"] != c["loser_precision"], f"agreeing requests never conflict: {c}"
    check_kernels_and_precision_changes(sim, report)


def check_kernels_and_precision_changes(sim: QuantizationSimModel, report: dict) -> None:
    """Rule 5 and the precision-change list (docs/rules.md, "The report"), recomputed from the sim."""
    memo: dict[int, Precision | None] = {}
    findings, changes = set(), set()
    graph = sim.graph
    for layer in graph.layers:
        if layer.data_movement:
            continue
        inputs = effective_inputs(sim, layer.index, memo)
        found = [p for p in inputs if p is not None]
        computes = max(found) if found else None
        reads = tuple(
            (name(p) or "fp32") if f and t is not None else None
            for p, f, t in zip(inputs, layer.input_is_float, layer.inputs, strict=True)
        )
        emits = tuple(
            (name(value_precision(sim, t, memo)) or "fp32") if f else None
            for f, t in zip(layer.output_is_float, layer.outputs, strict=True)
        )
        if any(reads) and len({p for p in reads + emits if p}) > 1:
            changes.add((layer.name, reads, emits))
        kernels = sim.config.kernels_for(layer.op_type)
        weight = (
            sim.precision_at(Place(PlaceKind.PARAM, layer.index, "weight"))
            if "weight" in layer.params
            else None
        )
        if not kernels or (computes is None and weight is None):
            continue
        # an fp32 (unquantized) activation is not checked: only the weight is, as the implementation does
        ok = any(
            (computes is None or k.activation == computes)
            and ("weight" not in layer.params or k.param is None or k.param == (weight or FP32))
            for k in kernels
        )
        if not ok:
            findings.add(layer.name)
    assert {k["layer"] for k in report["kernel_findings"]} == findings
    listed = {(c["layer"], tuple(c["inputs"]), tuple(c["outputs"])) for c in report["precision_changes"]}
    assert listed == changes, f"listed only: {listed - changes}; missing: {changes - listed}"
    assert report["precision_change_count"] == len(report["precision_changes"])
    flagged = {row["name"] for row in report["layers"] if row["precision_change"]}
    assert flagged == {c[0] for c in changes}, "the layer map must flag exactly the listed precision changes"


def group_end(sim: QuantizationSimModel, index: int, slot: int) -> tuple[int, int]:
    """Where a layer's output is quantized: its own slot, or past the supergroup / folded BN it heads."""
    graph = sim.graph
    while index in sim.placement.fused:
        consumers = graph.tensors[graph.layers[index].outputs[slot]].consumers
        if len(consumers) != 1:
            break
        index, slot = consumers[0][0], 0
    return index, slot


def check_requested_layers_emit(
    sim: QuantizationSimModel, report: dict, issued: list[tuple[int, RequestSpec]]
) -> None:
    """Rule 4: a requested layer emits its precision (a list's first entry) at the end of its fused group."""
    graph = sim.graph
    memo: dict[int, Precision | None] = {}
    for index, (rid, spec) in latest_layer_requests(sim, issued).items():
        asked = spec.activation[0] if isinstance(spec.activation, list) else spec.activation
        if asked is None:
            continue
        layer = graph.layers[index]
        for slot, is_float in enumerate(layer.output_is_float):
            end, end_slot = group_end(sim, index, slot)
            if not is_float or sim.placement.outputs[end][end_slot] is None:
                continue
            place = Place(PlaceKind.OUTPUT, end, end_slot)
            if sim.quantizer_at(place) is None and by_design_fused(sim, end, end_slot):
                # the config leaves the output unquantized: it carries what the layer computes at
                if isinstance(spec.activation, list):
                    continue
                got = value_precision(sim, graph.layers[end].outputs[end_slot], memo)
                names = {graph.layers[i].name for i in fused_upstream(sim, end)}
                excused = lost(report, rid, names) or any(
                    c["loser"] == rid and c["quantizer"] == sim.describe(place) for c in report["conflicts"]
                )
            else:
                got = sim.precision_at(place)
                excused = any(
                    c["loser"] == rid and c["quantizer"] == sim.describe(place) for c in report["conflicts"]
                )
            assert name(got) == wanted(asked) or excused, (
                f"layer {layer.name}: request {rid} {spec} asked it to emit {asked}, "
                f"{sim.describe(place)} holds {name(got)}; conflicts: {report['conflicts']}"
            )


def check_requested_rows_say_why(report: dict) -> None:
    """Each requested layer's row explains every way it differs from its request, and only those."""

    def same(asked: str | None, got: str | None) -> bool:
        return asked is None or got is None or wanted(asked) == wanted(got)

    for row in report["requested_layers"]:
        asked = row["asked"]
        differs = [not same(a, g) for a, g in zip(asked["inputs"], row["reads"], strict=True)]
        differs += [not same(asked["output"], e) for e in row["emits"]]
        differs += [not same(p.split()[0], row["params"].get(n)) for n, p in asked["params"].items()]
        assert len(row["why"]) == sum(differs), row

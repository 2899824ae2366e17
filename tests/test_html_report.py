"""The HTML report: one self-contained file whose graph renders in a real browser (headless Chromium).

Set ``MIXPREC_UPDATE_DOCS_IMG=1`` to refresh docs/img/report.png from the demo screenshot.
"""

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mixprec import MixedPrecisionConfigurator, MixedPrecisionReport, QuantizationSimModel
from mixprec.demo import build, seed_requests
from mixprec.report.html import MAX_VISIBLE, precision_color, render_html, write_html

DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img" / "report.png"


@pytest.fixture(scope="module")
def demo_report():
    model, x = build()
    mp = MixedPrecisionConfigurator(QuantizationSimModel(model, dummy_input=x))
    seed_requests(mp)
    return mp.apply(log_file=None)


def big_report(blocks=120):
    """A synthetic report of 5 * blocks layers: residual blocks, every third one at int16."""
    layers, previous, before = [], "model input input[0]", "int8"
    for b in range(blocks):
        precision = "int16" if b % 3 == 0 else "int8"
        status = "requested" if b % 3 == 0 else ("propagated upstream" if b % 3 == 1 else "unchanged")
        names = [f"blocks.{b}.{n}" for n in ("conv", "bn", "relu", "add", "act")]
        sources = [[previous], [names[0]], [names[1]], [names[2], previous], [names[3]]]
        reads = [[before], [precision], [precision], [precision, before], [precision]]
        for name, src, kind, read in zip(
            names, sources, ("Conv2d", "BatchNorm2d", "ReLU", "add", "relu"), reads, strict=True
        ):
            layers.append({"name": name, "type": kind, "op_type": kind, "module": name.rsplit(".", 1)[0],
                           "computes": precision, "outputs": [precision], "params": {}, "sources": src,
                           "reads": read, "emits": [precision], "status": status,
                           "precision_change": len({*read, precision}) > 1})  # fmt: skip
        previous, before = names[-1], precision
    return MixedPrecisionReport(layers=layers, applied=True)


# Without a browser --------------------------------------------------------------------------------


def test_page_is_self_contained(demo_report, tmp_path):
    path = demo_report.to_html(tmp_path / "report.html")
    text = path.read_text()
    without_svg_namespace = text.replace("http://www.w3.org/2000/svg", "")
    assert not re.search(r"https?://", without_svg_namespace)
    assert not re.search(r"<link\b|<script[^>]+src=|@import|url\((?!#)", text)  # url(#id): a local marker
    assert text.count("<script") == 2  # the embedded data and the inline script


def test_page_has_requests_and_changes_with_reasons(demo_report):
    text = render_html(demo_report, "demo")
    assert "torch.nn.modules.pooling.AvgPool2d" in text  # the unmatched request
    for change in demo_report.changes:
        assert change["why"] in text
    assert "requested: input of layer layer1.conv2" in text


def test_embedded_data_cannot_close_the_script_early(tmp_path):
    report = big_report(1)
    report.layers[0]["name"] = "</script><b>x"
    text = render_html(report)
    assert "</script><b>x" not in text


# In headless Chromium -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is required in CI (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def browse(chromium, url, tmp_path, *extra):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=2000"]  # fmt: skip
    result = subprocess.run([chromium, *flags, *extra, url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class SvgNodes(HTMLParser):
    """Collects the graph's node groups (with their body rect's fill), edges and legend swatches."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes, self.edges, self.swatches, self.ready, self._open = [], [], {}, False, None
        self.svg: dict = {}
        self.status = ""
        self._in_status = False

    def handle_data(self, data):
        if self._in_status:
            self.status += data

    def handle_endtag(self, tag):
        self._in_status = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "body":
            self.ready = a.get("data-graph-ready") == "1"
        elif tag == "svg" and a.get("id") == "graph":
            self.svg = a
        elif tag == "span" and a.get("id") == "graph-status":
            self._in_status = True
        elif tag == "g" and "node" in classes:
            self._open = {**a, "classes": classes}
            self.nodes.append(self._open)
        elif tag == "rect" and "body" in classes and self._open is not None:
            self._open["fill"] = a.get("fill")
            self._open = None
        elif tag == "path" and "edge" in classes:
            self.edges.append({**a, "classes": classes})
        elif tag == "span" and "swatch" in classes:
            self.swatches[a["data-precision"]] = a["data-color"]


def rendered(chromium, path, tmp_path, fragment=""):
    parser = SvgNodes()
    parser.feed(browse(chromium, path.as_uri() + fragment, tmp_path, "--dump-dom"))
    assert parser.ready, "the graph script did not finish"
    return parser


def test_graph_renders_every_layer_in_its_precision_color(chromium, demo_report, tmp_path):
    path = write_html(demo_report, tmp_path / "report.html", title="mixprec demo: DemoNet")
    dom = rendered(chromium, path, tmp_path)
    layers = {n["data-name"]: n for n in dom.nodes if "layer" in n["classes"]}
    expected = {row["name"]: row for row in demo_report.layers}
    assert layers.keys() == expected.keys()
    for name, node in layers.items():
        computes = expected[name]["computes"] or "fp32"
        assert node["data-precision"] == computes, name
        assert node["fill"] == precision_color(computes) == dom.swatches[computes], name
    statuses = {name: node["data-status"] for name, node in layers.items()}
    assert statuses == {name: row["status"] for name, row in expected.items()}
    assert "status-requested" in layers["layer1.conv2"]["classes"]
    assert "status-shared" in layers["stem.0"]["classes"]  # changed through the model input request
    check_edges_and_changes(dom, demo_report)
    assert demo_report.precision_change_count == 4
    shot = tmp_path / "report.png"
    browse(chromium, path.as_uri(), tmp_path, "--window-size=1400,1900", f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000
    if os.environ.get("MIXPREC_UPDATE_DOCS_IMG"):
        DOCS_IMG.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_IMG)


def check_edges_and_changes(dom, report):
    """Each edge has its tensor's precision colour; the marked layers and the count are the report's."""
    names = {n["data-id"]: n.get("data-name") for n in dom.nodes}
    rows = {row["name"]: row for row in report.layers}
    expected = {}
    for row in rows.values():
        for source, precision in zip(row["sources"], row["reads"], strict=True):
            expected.setdefault((source, row["name"]), set()).add(precision or "fp32")
    drawn = {(names[e["data-from"]], names[e["data-to"]]): e for e in dom.edges}
    assert drawn.keys() == expected.keys()
    for key, edge in drawn.items():
        (precision,) = expected[key]  # every edge of these reports carries one precision
        assert edge["data-precision"] == precision, key
        assert edge["stroke"] == precision_color(precision) == dom.swatches[precision], key
    marked = {n["data-name"] for n in dom.nodes if "layer" in n["classes"] and "change" in n["classes"]}
    assert marked == {c["layer"] for c in report.precision_changes}
    count = report.precision_change_count
    assert int(dom.svg["data-precision-changes"]) == count
    assert f"{count} precision change" in dom.status
    # the map is not just the boxes' colours again: some edge leaves its producer at another precision
    assert any(e["data-precision"] != rows[src]["computes"] for (src, _), e in drawn.items() if src in rows)


def lone_int16_report():
    from .models import build as build_tiny

    model, x = build_tiny("linear_stack")
    sim = QuantizationSimModel(model, dummy_input=x)
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(sim.model.block[1], activation="int16")
    return mp.apply(log_file=None)


def resnet18_report():
    import torch
    from torchvision.models import resnet18

    sim = QuantizationSimModel(resnet18().eval(), dummy_input=torch.randn(1, 3, 64, 64))
    mp = MixedPrecisionConfigurator(sim)
    mp.set_precision(torch.nn.Conv2d, activation="int16", param={"weight": "int16"})
    return mp.apply(log_file=None)


@pytest.mark.parametrize(
    "make",
    [lone_int16_report, pytest.param(resnet18_report, marks=pytest.mark.slow)],
    ids=["lone-int16", "resnet18-conv2d"],
)
def test_map_colours_edges_and_marks_precision_changes(chromium, tmp_path, make):
    report = make()
    assert report.precision_change_count > 0
    path = write_html(report, tmp_path / "report.html")
    dom = rendered(chromium, path, tmp_path, "#expand=all")
    check_edges_and_changes(dom, report)
    text = path.read_text()
    assert f"{report.precision_change_count} precision changes" in text  # the page's summary line


@pytest.mark.slow
def test_large_model_starts_collapsed_and_expands(chromium, tmp_path):
    report = big_report(120)
    path = write_html(report, tmp_path / "big.html")
    dom = rendered(chromium, path, tmp_path)
    groups = [n for n in dom.nodes if "group" in n["classes"]]
    # The one wrapper module "blocks" is opened (a view of two boxes says nothing); its blocks stay closed.
    assert len(groups) == 120 and len(dom.nodes) <= MAX_VISIBLE + 1  # + the model input node
    shown = sum(int(g["data-count"]) for g in groups) + sum("layer" in n["classes"] for n in dom.nodes)
    assert shown == 600  # every layer is in the view, alone or inside a group
    mixed = {g["data-precision"] for g in groups}
    assert mixed <= {"int8", "int16", "mixed"}
    # a block entered at another precision changes it at its conv and its add: 80 of 120 blocks
    changes = sum(row["precision_change"] for row in report.layers)
    assert changes == 160 == int(dom.svg["data-precision-changes"])
    assert sum(int(g["data-changes"]) for g in groups) == changes  # every block is collapsed here
    assert "160 precision changes" in dom.status
    full = rendered(chromium, path, tmp_path, "#expand=all")
    assert sum("layer" in n["classes"] for n in full.nodes) == 600
    opened = rendered(chromium, path, tmp_path, "#expand=blocks.7")
    assert {n["data-name"] for n in opened.nodes if "layer" in n["classes"]} == {
        f"blocks.7.{n}" for n in ("conv", "bn", "relu", "add", "act")
    }
    one = rendered(chromium, path, tmp_path, "#collapse=all")
    assert sum("group" in n["classes"] for n in one.nodes) == 1  # "blocks" holds everything


CLICKS = """<script>
// Drive the page like a user: open a group, select a layer inside it, collapse all, search.
const click = (el) => el.dispatchEvent(new MouseEvent("click", { bubbles: true }));
const log = [];
click(document.querySelector('#graph .node.group[data-group="blocks.7"]'));
log.push(document.querySelectorAll('#graph .node.layer').length);
click(document.querySelector('#graph .node[data-name="blocks.7.add"]'));
log.push(document.querySelector("#details").textContent.includes("blocks.7.relu"));
click(document.querySelector("#details button"));  // "Collapse blocks.7"
log.push(document.querySelectorAll('#graph .node.layer').length);
click(document.getElementById("btn-collapse"));
log.push(document.querySelectorAll("#graph .node").length);
const box = document.getElementById("search");
box.value = "blocks.42.bn";
box.dispatchEvent(new Event("change"));
log.push(document.querySelectorAll("#graph .node.match").length, document.querySelectorAll("#graph .node").length);
click(document.querySelector('#tree button[data-group="blocks"]'));
log.push(document.querySelectorAll("#graph .node").length);
document.body.setAttribute("data-log", JSON.stringify(log));
</script>"""


def test_clicks_open_select_collapse_and_search(chromium, tmp_path):
    path = tmp_path / "clicks.html"
    path.write_text(render_html(big_report(120)).replace("</body>", CLICKS + "</body>"))
    dom = browse(chromium, path.as_uri(), tmp_path, "--dump-dom")
    log = json.loads(html.unescape(re.search(r'data-log="([^"]*)"', dom).group(1)))
    assert log == [5, True, 0, 2, 1, 1 + 119 + 5, 2]  # input + other blocks + blocks.42's layers

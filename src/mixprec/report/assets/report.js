// mixprec HTML report: lays out and draws the precision map from the embedded report data.
// No libraries: a layered DAG (row = longest path from the inputs) drawn as inline SVG, with
// module groups that collapse into one node so that models with hundreds of layers stay usable.
(function () {
  "use strict";
  const SVGNS = "http://www.w3.org/2000/svg";
  const data = JSON.parse(document.getElementById("mixprec-data").textContent);
  const report = data.report;
  const palette = data.palette;
  const MAX_VISIBLE = data.max_visible || 120;
  const { W, H, DW, layout } = mixprecLayout; // layout.js, inlined before this script
  const INPUT = "model input ";

  // ---- nodes: model inputs and unknown sources first (they feed everything), then layers in graph order
  const nodes = [];
  const byName = new Map();
  const layerNames = new Set(report.layers.map((l) => l.name));
  const inputPrecision = new Map();
  report.changes.forEach((c) => { if (c.layer.startsWith(INPUT)) inputPrecision.set(c.layer, c.new); });
  function addNode(name, kind, layer) {
    const node = { id: "n" + nodes.length, order: nodes.length, name, kind, layer, groups: [] };
    node.precision = kind === "layer" ? layer.computes || "fp32" : inputPrecision.get(name) || null;
    nodes.push(node);
    byName.set(name, node);
  }
  report.layers.forEach((l) => l.sources.forEach((s) => {
    if (!layerNames.has(s) && !byName.has(s)) addNode(s, s.startsWith(INPUT) ? "input" : "other", null);
  }));
  report.layers.forEach((l) => addNode(l.name, "layer", l));
  // Layers where precision changes (inputs differ among themselves or from what the layer emits):
  // the report's precision_changes, flagged on each layer row.
  const changeCount = nodes.filter((n) => n.kind === "layer" && n.layer.precision_change).length;

  // ---- module groups from the qualified names ("layer1.conv1.0" is in "layer1" and "layer1.conv1")
  const groups = new Map();
  function prefixes(name) {
    const parts = name.split(".");
    const out = [];
    for (let i = 1; i < parts.length; i++) out.push(parts.slice(0, i).join("."));
    return out;
  }
  nodes.forEach((n) => {
    if (n.kind !== "layer") return;
    prefixes(n.name).forEach((p) => {
      if (!groups.has(p)) groups.set(p, { path: p, members: [], children: [], parent: null });
      groups.get(p).members.push(n);
    });
  });
  // A group of one layer would only hide it: keep groups of two or more.
  for (const [path, g] of [...groups]) if (g.members.length < 2) groups.delete(path);
  nodes.forEach((n) => { if (n.kind === "layer") n.groups = prefixes(n.name).filter((p) => groups.has(p)); });
  groups.forEach((g) => {
    const up = prefixes(g.path).filter((p) => groups.has(p));
    g.parent = up.length ? up[up.length - 1] : null;
    g.depth = up.length;
    if (g.parent) groups.get(g.parent).children.push(g.path);
  });
  const topGroups = [...groups.values()].filter((g) => g.parent === null).map((g) => g.path);

  // ---- collapse state
  let collapsed = new Set();
  let selected = null;
  let matches = new Set();
  const rep = (n) => { for (const g of n.groups) if (collapsed.has(g)) return "g:" + g; return n.id; };
  function visibleCount(state) {
    const saved = collapsed;
    collapsed = state;
    const count = new Set(nodes.map(rep)).size;
    collapsed = saved;
    return count;
  }
  function autoCollapse() {
    // Open groups breadth first while the graph stays under MAX_VISIBLE nodes.
    const state = new Set(topGroups);
    if (visibleCount(new Set()) <= MAX_VISIBLE) return new Set();
    let frontier = topGroups.slice();
    while (frontier.length) {
      const next = [];
      for (const path of frontier) {
        const trial = new Set(state);
        trial.delete(path);
        groups.get(path).children.forEach((c) => trial.add(c));
        // Over budget is still better than a view of a few boxes (one wrapper module around everything).
        const count = visibleCount(trial);
        if (count <= MAX_VISIBLE || visibleCount(state) < MAX_VISIBLE / 4) {
          state.delete(path);
          groups.get(path).children.forEach((c) => { state.add(c); next.push(c); });
        }
      }
      frontier = next;
    }
    return state;
  }
  function expand(path) {
    collapsed.delete(path);
    const trial = new Set(collapsed);
    groups.get(path).children.forEach((c) => trial.add(c));
    // Open one level at a time when opening everything inside would flood the view.
    if (visibleCount(collapsed) > MAX_VISIBLE) collapsed = trial;
  }

  function reveal(path) {
    // Open a group and its ancestors, outermost first, each one level at a time when the view is full.
    [...prefixes(path), path].forEach((p) => { if (collapsed.has(p)) expand(p); });
  }

  // ---- the visible graph: collapsed groups stand for their members
  function buildView() {
    const vnodes = [];
    const byId = new Map();
    nodes.forEach((n) => {
      const id = rep(n);
      let v = byId.get(id);
      if (!v) {
        v = { id, order: vnodes.length, members: [], group: id.startsWith("g:") ? id.slice(2) : null, node: n, in: [], out: [] };
        byId.set(id, v);
        vnodes.push(v);
      }
      v.members.push(n);
    });
    const edges = new Map();
    nodes.forEach((n) => {
      if (n.kind !== "layer") return;
      n.layer.sources.forEach((s, i) => {
        const src = byName.get(s);
        const u = byId.get(rep(src)), v = byId.get(rep(n));
        if (u === v) return;
        const key = u.id + ">" + v.id;
        let e = edges.get(key);
        if (!e) { e = { u, v, precisions: new Set() }; edges.set(key, e); u.out.push(e); v.in.push(e); }
        // The edge carries the tensor as its reader reads it: the precision of the quantizer that
        // last quantized it (fp32 where none did), from the report's "reads".
        e.precisions.add((n.layer.reads || [])[i] || "fp32");
      });
    });
    return { vnodes, edges: [...edges.values()] };
  }

  function el(tag, attrs, parent, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  const color = (p) => palette[p || "fp32"] || "#bdbdbd";
  const MIXED = "#57606a";
  const markerId = (p) => "arrow-" + String(p).replace(/[^a-z0-9_]/gi, "");
  function textColor(hex) {
    const n = parseInt(hex.slice(1), 16);
    const lum = (0.299 * (n >> 16) + 0.587 * ((n >> 8) & 255) + 0.114 * (n & 255)) / 255;
    return lum > 0.55 ? "#111" : "#fff";
  }
  const statusClass = (s) => ({ requested: "requested", unchanged: "unchanged", "propagated upstream": "propagated", "shared tensor": "shared" }[s] || "propagated");
  const short = (s, n) => (s.length > n ? "\u2026" + s.slice(s.length - n + 1) : s);

  function drawEdges(svg, view) {
    // Ports: a node's out-edges leave from its bottom, in-edges enter its top, spread by where they go.
    const firstStep = (e) => (e.dummies.length ? e.dummies[0] : e.v);
    const lastStep = (e) => (e.dummies.length ? e.dummies[e.dummies.length - 1] : e.u);
    view.vnodes.forEach((v) => {
      v.out.sort((a, b) => firstStep(a).x - firstStep(b).x);
      v.in.sort((a, b) => lastStep(a).x - lastStep(b).x);
    });
    view.edges.forEach((e) => {
      const pts = [[e.u.x + (W * (e.u.out.indexOf(e) + 1)) / (e.u.out.length + 1), e.u.y + H]];
      e.dummies.forEach((d) => { pts.push([d.x + DW / 2, d.y]); pts.push([d.x + DW / 2, d.y + H]); });
      pts.push([e.v.x + (W * (e.v.in.indexOf(e) + 1)) / (e.v.in.length + 1), e.v.y]);
      let d = `M${pts[0][0]},${pts[0][1]}`;
      for (let i = 1; i < pts.length; i++) {
        const [x1, y1] = pts[i - 1], [x2, y2] = pts[i];
        const bend = y2 <= y1 ? 60 : Math.min(40, (y2 - y1) / 2);
        d += ` C${x1},${y1 + bend} ${x2},${y2 - bend} ${x2},${y2}`;
      }
      const back = e.v.row <= e.u.row;
      // One precision: the edge has its colour. Several (edges merged into a collapsed group): dashed grey.
      const precision = e.precisions.size === 1 ? [...e.precisions][0] : "mixed";
      const stroke = precision === "mixed" ? MIXED : color(precision);
      const cls = "edge" + (precision === "mixed" ? " mixed" : "") + (back ? " back" : "");
      const path = el("path", { d, class: cls, stroke, "marker-end": `url(#${markerId(precision)})`,
        "data-from": e.u.id, "data-to": e.v.id, "data-precision": precision }, svg);
      el("title", {}, path, `${e.u.node.name} \u2192 ${e.v.node.name}: ${[...e.precisions].join(", ")}`);
    });
  }

  function drawNode(svg, v) {
    const g = el("g", { transform: `translate(${v.x},${v.y})`, "data-id": v.id }, svg);
    if (v.group) return drawGroup(g, v);
    const n = v.node;
    const fill = n.kind === "layer" ? color(n.precision) : "#ffffff";
    g.setAttribute("class", `node ${n.kind}` + (n.kind === "layer" ? " status-" + statusClass(n.layer.status) : ""));
    g.setAttribute("data-name", n.name);
    g.setAttribute("data-precision", n.precision || "");
    if (n.kind === "layer") g.setAttribute("data-status", n.layer.status);
    if (n.kind === "layer" && n.layer.precision_change) g.classList.add("change");
    el("rect", { class: "body", width: W, height: H, rx: 6, fill }, g);
    const ink = textColor(fill);
    el("text", { class: "name", x: 8, y: 18, fill: ink }, g, short(n.name.replace(INPUT, "input "), 24));
    if (n.kind === "layer") {
      const l = n.layer;
      const weight = l.params && l.params.weight;
      const sub = `${l.type} \u00b7 ${n.precision}` + (weight && weight !== n.precision ? ` \u00b7 w ${weight}` : "");
      el("text", { x: 8, y: 36, fill: ink }, g, short(sub, 29));
      const badge = { requested: "R", propagated: "P", shared: "S" }[statusClass(l.status)];
      if (badge && l.status !== "unchanged") {
        const b = el("g", { class: "badge", transform: `translate(${W - 2},2)` }, g);
        el("circle", { r: 8 }, b);
        el("text", { x: -3.5, y: 3.5 }, b, badge);
      }
      if (l.precision_change) {
        // precision changes here: what it reads differs among its inputs or from what it emits
        // on the box's left edge, clear of its text and of the edges entering at the top
        const c = el("g", { class: "change-mark", transform: `translate(0,${H / 2})` }, g);
        el("rect", { x: -13, y: -9, width: 18, height: 18, rx: 4 }, c);
        el("text", { x: -4, y: 4.5, "text-anchor": "middle" }, c, "\u0394");
      }
    } else {
      el("text", { x: 8, y: 36, fill: ink }, g, n.precision ? "quantized at " + n.precision : "model input");
    }
    el("title", {}, g, tooltip(n));
    g.addEventListener("click", () => select(n));
  }

  function drawGroup(g, v) {
    const counts = new Map();
    v.members.forEach((n) => counts.set(n.precision, (counts.get(n.precision) || 0) + 1));
    const uniform = counts.size === 1 ? [...counts.keys()][0] : null;
    const fill = uniform ? color(uniform) : "#f6f8fa";
    g.setAttribute("class", "node group");
    g.setAttribute("data-group", v.group);
    g.setAttribute("data-precision", uniform || "mixed");
    g.setAttribute("data-count", v.members.length);
    el("rect", { class: "body", width: W, height: H, rx: 9, fill }, g);
    el("rect", { class: "inner", x: 4, y: 4, width: W - 8, height: H - 8, rx: 6 }, g);
    let x = 10;
    [...counts.entries()].sort((a, b) => b[1] - a[1]).forEach(([p, c]) => {
      const w = ((W - 20) * c) / v.members.length;
      el("rect", { class: "mix", x, y: H - 12, width: w, height: 5, fill: color(p), "data-precision": p }, g);
      x += w;
    });
    const ink = textColor(fill);
    el("text", { class: "name", x: 10, y: 18, fill: ink }, g, "\u25b8 " + short(v.group, 23));
    const req = v.members.filter((n) => n.layer.status === "requested").length;
    const prop = v.members.filter((n) => !["requested", "unchanged"].includes(n.layer.status)).length;
    const changes = v.members.filter((n) => n.layer.precision_change).length;
    g.setAttribute("data-changes", changes);
    if (changes) g.classList.add("change");
    el("text", { x: 10, y: 31, fill: ink }, g, `${v.members.length} layers` + (req ? ` \u00b7 R ${req}` : "") +
      (prop ? ` \u00b7 P ${prop}` : "") + (changes ? ` \u00b7 \u0394 ${changes}` : ""));
    el("title", {}, g, `${v.group}: ${v.members.length} layers (${[...counts].map(([p, c]) => p + " " + c).join(", ")}); click to open`);
    g.addEventListener("click", () => { expand(v.group); render(); });
  }

  function tooltip(n) {
    if (n.kind !== "layer") return n.name;
    const l = n.layer;
    const params = Object.entries(l.params || {}).map(([k, p]) => `${k}: ${p || "-"}`).join(", ");
    return `${l.name} (${l.type}, ${l.op_type})\nreads: ${(l.reads || []).map((o) => o || "-").join(", ") || "-"}` +
      `\ncomputes: ${l.computes || "fp32"}\nemits: ${(l.emits || []).map((o) => o || "-").join(", ")}` +
      `\nparams: ${params || "-"}\nstatus: ${l.status}${l.precision_change ? "\nprecision changes here" : ""}` +
      `\nsources: ${l.sources.join(", ") || "-"}`;
  }

  function select(n) {
    selected = n.name;
    const box = document.getElementById("details");
    box.textContent = "";
    const dl = document.createElement("dl");
    const rows = n.kind === "layer" ? [["Layer", n.name], ["Type", `${n.layer.type} (${n.layer.op_type})`], ["Module", n.layer.module || "(root)"],
      ["Reads", (n.layer.reads || []).map((o) => o || "-").join(", ") || "-"],
      ["Computes", n.precision], ["Emits", (n.layer.emits || []).map((o) => o || "-").join(", ")],
      ["Precision change", n.layer.precision_change ? "yes" : "no"],
      ["Params", Object.entries(n.layer.params || {}).map(([k, p]) => `${k}: ${p || "-"}`).join(", ") || "-"],
      ["Status", n.layer.status], ["Sources", n.layer.sources.join(", ") || "-"]] : [["Node", n.name], ["Precision", n.precision || "unchanged"]];
    rows.forEach(([k, val]) => {
      const dt = document.createElement("dt"); dt.textContent = k; dl.appendChild(dt);
      const dd = document.createElement("dd"); dd.textContent = val; dl.appendChild(dd);
    });
    box.appendChild(dl);
    if (n.groups.length) {
      const inner = n.groups[n.groups.length - 1];
      const btn = document.createElement("button");
      btn.type = "button";
      btn.textContent = "Collapse " + inner;
      btn.addEventListener("click", () => { collapsed.add(inner); render(); });
      box.appendChild(btn);
    }
    render();
  }

  function drawTree() {
    const nav = document.getElementById("tree");
    nav.textContent = "";
    const build = (paths, parent) => {
      if (!paths.length) return;
      const ul = document.createElement("ul");
      paths.forEach((path) => {
        const g = groups.get(path);
        const li = document.createElement("li");
        const btn = document.createElement("button");
        btn.type = "button";
        btn.dataset.group = path;
        const open = !collapsed.has(path);
        btn.textContent = (collapsed.has(path) ? "\u25b8 " : "\u25be ") + path.split(".").pop() + ` (${g.members.length})`;
        const bar = document.createElement("span");
        bar.className = "bar";
        const counts = new Map();
        g.members.forEach((n) => counts.set(n.precision, (counts.get(n.precision) || 0) + 1));
        counts.forEach((c, p) => { const i = document.createElement("i"); i.style.background = color(p); i.style.width = (100 * c) / g.members.length + "%"; bar.appendChild(i); });
        btn.appendChild(bar);
        btn.addEventListener("click", () => { if (collapsed.has(path)) expand(path); else collapsed.add(path); render(); });
        li.appendChild(btn);
        if (open) build(g.children, li);
        ul.appendChild(li);
      });
      parent.appendChild(ul);
    };
    if (!topGroups.length) nav.textContent = "No module groups.";
    build(topGroups, nav);
  }

  function render() {
    const svg = document.getElementById("graph");
    svg.textContent = "";
    const view = buildView();
    layout(view);
    svg.setAttribute("width", view.width);
    svg.setAttribute("height", view.height);
    svg.setAttribute("viewBox", `0 0 ${view.width} ${view.height}`);
    const defs = el("defs", {}, svg);
    const used = new Set(view.edges.map((e) => (e.precisions.size === 1 ? [...e.precisions][0] : "mixed")));
    used.forEach((p) => {
      const m = el("marker", { id: markerId(p), viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 10, markerHeight: 10,
        markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" }, defs);
      el("path", { d: "M0,0 L10,5 L0,10 z", fill: p === "mixed" ? MIXED : color(p) }, m);
    });
    drawEdges(svg, view);
    view.vnodes.forEach((v) => drawNode(svg, v));
    svg.querySelectorAll(".node").forEach((g) => {
      const name = g.getAttribute("data-name");
      if (name && matches.has(name)) g.classList.add("match");
      if (name && name === selected) g.classList.add("selected");
    });
    svg.setAttribute("data-visible-nodes", view.vnodes.length);
    svg.setAttribute("data-precision-changes", changeCount);
    document.getElementById("graph-status").textContent =
      `${view.vnodes.length} nodes shown of ${nodes.length} (${collapsed.size} groups collapsed), ` +
      `${changeCount} precision change${changeCount === 1 ? "" : "s"} (\u0394)`;
    drawTree();
    document.body.setAttribute("data-graph-ready", "1");
  }

  function search(text) {
    const q = text.trim().toLowerCase();
    matches = new Set();
    if (q) {
      nodes.filter((n) => n.name.toLowerCase().includes(q) || (n.layer && n.layer.type.toLowerCase() === q)).slice(0, 200).forEach((n) => {
        matches.add(n.name);
        if (n.groups.length) reveal(n.groups[n.groups.length - 1]); // open the groups hiding a match
      });
    }
    render();
    const first = document.querySelector("#graph .node.match");
    if (first) first.scrollIntoView({ block: "center", inline: "center" });
  }

  document.getElementById("btn-expand").addEventListener("click", () => { collapsed = new Set(); render(); });
  document.getElementById("btn-collapse").addEventListener("click", () => { collapsed = new Set(topGroups); render(); });
  document.getElementById("btn-auto").addEventListener("click", () => { collapsed = autoCollapse(); render(); });
  document.getElementById("search").addEventListener("change", (ev) => search(ev.target.value));
  // The URL fragment picks the first view: #expand=all, #collapse=all, or #expand=<group>,<group>.
  const hash = decodeURIComponent(location.hash.slice(1));
  if (hash === "expand=all") collapsed = new Set();
  else if (hash === "collapse=all") collapsed = new Set(topGroups);
  else {
    collapsed = autoCollapse();
    if (hash.startsWith("expand=")) {
      hash.slice(7).split(",").filter((p) => groups.has(p)).forEach(reveal);
    }
  }
  render();
})();

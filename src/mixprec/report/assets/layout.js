// mixprec HTML report: the graph layout, no DOM. Rows are depths (longest path from the inputs);
// within a row, nodes sit under their parents, and edges spanning rows get dummy nodes (lanes).
const mixprecLayout = (function () {
  "use strict";
  const W = 184, H = 46, DW = 14, GAPX = 26, ROWH = 82, PAD = 28;

  function layout(view) {
    const rows = [];
    view.vnodes.forEach((v) => {
      // Graph order is topological; an edge from a later node can only come through a collapsed group.
      const depths = v.in.filter((e) => e.u.order < v.order).map((e) => e.u.row + 1);
      v.row = depths.length ? Math.max(...depths) : 0;
      v.width = W;
      v.preds = [];
      (rows[v.row] = rows[v.row] || []).push(v);
    });
    // An edge spanning several rows gets a thin dummy node per row in between, so it takes a lane
    // of its own instead of crossing the nodes on its way (a residual's skip edge runs beside the block).
    view.edges.forEach((e) => {
      e.dummies = [];
      let prev = e.u;
      for (let r = e.u.row + 1; r < e.v.row; r++) {
        const d = { dummy: true, row: r, width: DW, order: e.u.order, preds: [prev] };
        rows[r].push(d);
        e.dummies.push(d);
        prev = d;
      }
      if (e.u.row < e.v.row) e.v.preds.push(prev);
    });
    rows.forEach((row) => {
      // A node goes under the mean of its real parents (dummies only if it has none); overlaps are
      // pushed right, and the row is shifted so that real nodes sit where they want on average.
      row.forEach((v, i) => {
        const real = v.preds.filter((p) => !p.dummy);
        const ups = real.length ? real : v.preds;
        v.want = ups.length ? ups.reduce((a, p) => a + p.x + p.width / 2, 0) / ups.length - v.width / 2 : i * (W + GAPX);
      });
      row.sort((a, b) => a.want - b.want || (a.dummy ? 1 : 0) - (b.dummy ? 1 : 0) || a.order - b.order);
      let cursor = -Infinity;
      row.forEach((v) => { v.x = Math.max(v.want, cursor); cursor = v.x + v.width + (v.dummy ? GAPX / 2 : GAPX); });
      const real = row.filter((v) => !v.dummy);
      const shift = real.length ? real.reduce((a, v) => a + v.want - v.x, 0) / real.length : 0;
      row.forEach((v) => { v.x += shift; });
    });
    const all = rows.flat();
    const minX = Math.min(...all.map((v) => v.x));
    let width = 0;
    all.forEach((v) => { v.x += PAD - minX; v.y = PAD + v.row * ROWH; width = Math.max(width, v.x + v.width + PAD); });
    view.width = Math.max(width, 400);
    view.height = PAD * 2 + rows.length * ROWH - (ROWH - H);
  }

  return { W, H, DW, layout };
})();

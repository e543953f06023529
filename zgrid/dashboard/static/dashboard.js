// zgrid dashboard: the page. It draws what the server's event stream (/events) says and
// nothing else: a `hello` snapshot, then `grid` (every known node, edge and island),
// `totals` (one sample of the island's totals), `events` and `link` messages.
//
// The graph is laid out only when its structure changes (a node or an up link appears or
// goes, an island splits or merges); a change of values only restyles nodes and rewrites
// numbers, so a 1,000-node grid stays smooth. Redraws are batched into animation frames.
"use strict";

(() => {
  const BALANCED_KW = 1e-6;       // |net| at or below: balanced (the server's BALANCED_KW)
  const HISTORY_POINTS = 3600;    // the server's history length; the charts keep as many
  const EVENTS_SHOWN = 200;
  // A 1,000-row table costs ~100 ms of layout per update on a small machine: show the first
  // rows in the chosen order (sorting by a column brings the others up), like top does.
  const TABLE_ROWS_SHOWN = 100;
  const LABELS_UP_TO_NODES = 150; // more nodes than this: labels only when zoomed in
  const ANIMATE_UP_TO_NODES = 200;
  // fcose's force refinement costs seconds per layout beyond a few hundred nodes on a small
  // machine (measured by scripts/bench_dashboard.py); bigger grids get its spectral layout.
  const REFINE_UP_TO_NODES = 300;
  const SHAPES = { plant: "triangle", pv: "star", battery: "barrel", load: "ellipse",
                   idle: "round-rectangle" };
  const COLOURS = { producer: "#3fb950", consumer: "#f0883e", balanced: "#8b949e" };

  const state = {
    grid: null, structure: "", sort: { key: "id", dir: 1 }, pinned: null,
    x: [], series: { total_net: [], total_production: [], total_consumption: [],
                     imbalance_kw: [], balanced_net_kw: [], clearing_price: [], soc_pct: [] },
    last: null, frame: 0, dirty: { table: false, charts: false },
  };
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ formatting

  const number = (x, digits = 3) => (Math.abs(x) < 0.5 * 10 ** -digits ? 0 : x)
    .toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  const kw = (x) => (x === null || x === undefined) ? "-" : `${number(x)} kW`;
  const signedKw = (x) => (x === null || x === undefined) ? "-"
    : `${x >= 0.0005 ? "+" : ""}${number(x)} kW`;
  const price = (x) => (x === null || x === undefined) ? "none" : `${number(x, 4)} /kWh`;
  const role = (net) => net > BALANCED_KW ? "producer" : net < -BALANCED_KW ? "consumer"
    : "balanced";
  const signClass = (x) => x > BALANCED_KW ? "pos" : x < -BALANCED_KW ? "neg" : "zero";
  const clock = (t) => new Date(t * 1000).toLocaleTimeString("en-GB");
  const escape = (s) => String(s).replace(/[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

  // ------------------------------------------------------------------ the graph

  const cy = cytoscape({
    container: $("graph"),
    minZoom: 0.05,
    maxZoom: 4,
    style: [
      { selector: "node[size]", style: {
        "background-color": "data(colour)", "shape": "data(shape)",
        "width": "data(size)", "height": "data(size)",
        "label": "data(id)", "color": "#d8dee6", "font-size": 10,
        "text-valign": "bottom", "text-margin-y": 3, "min-zoomed-font-size": 0,
        "border-width": 0 } },
      { selector: "node.many", style: { "min-zoomed-font-size": 9 } },
      { selector: "node.us", style: { "border-width": 3, "border-color": "#58a6ff" } },
      { selector: "node.unreachable", style: { "opacity": 0.5 } },
      { selector: "node:parent", style: {
        "background-color": "#58a6ff", "background-opacity": 0.05, "shape": "round-rectangle",
        "border-width": 1, "border-color": "#2f4a66", "border-style": "dashed",
        "label": "data(label)", "text-valign": "top", "text-halign": "center",
        "color": "#7d8a96", "font-size": 11, "padding": 14 } },
      { selector: "node:parent.ours", style: { "border-color": "#58a6ff",
        "border-style": "solid" } },
      { selector: "edge", style: { "width": 2, "line-color": "#6e7f8d",
        "curve-style": "haystack" } },
      { selector: "edge[state = 'one_way']", style: { "line-style": "dashed",
        "line-color": "#d29922", "curve-style": "straight" } },
      { selector: "edge[state = 'down']", style: { "line-style": "dashed",
        "line-color": "#f85149", "curve-style": "straight" } },
    ],
  });
  window.zgrid = { cy, state };  // for tests and for the curious, from the browser console

  const islandId = (i) => `island:${i}`;
  const edgeId = (e) => `${e.a}\u2014${e.b}`;
  const rows = new Map();  // id -> the node's row of the last grid message (tooltip, table)
  const drawn = new Map(); // id -> what its element shows now, so unchanged nodes are skipped

  function look(n, us) {
    const size = Math.min(64, 16 + 7 * Math.log2(1 + Math.max(n.production, n.consumption,
      Math.abs(n.activation_kw))));
    return { parent: islandId(n.island), colour: COLOURS[role(n.actual_net)],
             shape: SHAPES[n.kind] || "ellipse", size: Math.round(size), us,
             reachable: n.reachable };
  }
  const sameLook = (a, b) => a && a.parent === b.parent && a.colour === b.colour
    && a.shape === b.shape && a.size === b.size && a.us === b.us && a.reachable === b.reachable;

  function applyGrid(grid) {
    state.grid = grid;
    const islands = grid.islands;
    const structure = JSON.stringify([islands,
      grid.edges.filter((e) => e.state === "up").map(edgeId)]);
    const many = grid.nodes.length > LABELS_UP_TO_NODES;
    rows.clear();
    for (const n of grid.nodes) rows.set(n.id, n);
    // Only what changed touches cytoscape: restyling is what costs at 1,000 nodes.
    cy.batch(() => {
      const wanted = new Set();
      islands.forEach((members, i) => {
        const id = islandId(i);
        wanted.add(id);
        const label = `island ${i + 1} \u00b7 ${members.length} node`
          + `${members.length === 1 ? "" : "s"}${i === 0 ? " \u00b7 this node's" : ""}`;
        const parent = cy.getElementById(id);
        if (parent.empty()) {
          cy.add({ group: "nodes", data: { id, label }, classes: i === 0 ? "ours" : "" });
        } else if (parent.data("label") !== label) {
          parent.data("label", label);
        }
      });
      for (const n of grid.nodes) {
        wanted.add(n.id);
        const want = look(n, n.id === grid.id);
        const had = drawn.get(n.id);
        if (sameLook(had, want)) continue;
        let ele = cy.getElementById(n.id);
        if (ele.empty()) {
          const near = grid.edges.find((e) => e.a === n.id || e.b === n.id);
          const other = near && cy.getElementById(near.a === n.id ? near.b : near.a);
          const at = other && other.nonempty() ? other.position() : { x: 0, y: 0 };
          ele = cy.add({ group: "nodes", data: { id: n.id, ...want },
            position: { x: at.x + 40 * (Math.random() - 0.5),
                        y: at.y + 40 * (Math.random() - 0.5) } });
        } else {
          if (!had || had.parent !== want.parent) ele.move({ parent: want.parent });
          ele.data(want);
        }
        ele.toggleClass("us", want.us).toggleClass("unreachable", !want.reachable)
           .toggleClass("many", many);
        drawn.set(n.id, want);
      }
      for (const e of grid.edges) {
        const id = edgeId(e);
        wanted.add(id);
        const ele = cy.getElementById(id);
        if (ele.empty()) {
          cy.add({ group: "edges", data: { id, source: e.a, target: e.b, state: e.state } });
        } else if (ele.data("state") !== e.state) {
          ele.data("state", e.state);
        }
      }
      const gone = cy.elements().filter((ele) => !wanted.has(ele.id()));
      gone.forEach((ele) => { drawn.delete(ele.id()); });
      gone.remove();
    });
    if (structure !== state.structure) {
      const first = state.structure === "";
      state.structure = structure;
      layout(first);
    }
    document.body.dataset.nodes = String(grid.nodes.length);
    document.body.dataset.islands = String(islands.length);
    $("node-count").textContent = String(grid.nodes.length);
    $("island-count").textContent = String(islands.length);
    $("node-id").textContent = `node ${grid.id} \u00b7 ${grid.status.endpoint || ""}`;
    $("graph-caption").textContent = `${grid.nodes.length} known, `
      + `${islands[0] ? islands[0].length : 0} in this node's island`;
    document.title = `zgrid \u00b7 ${grid.id}`;
    if (state.pinned) showTooltip(cy.getElementById(state.pinned));
    state.dirty.table = true;
    schedule();
  }

  function layout(first) {
    const n = cy.nodes().length;
    // Only up links shape the layout, so islands fall apart as separate components. fcose
    // (spectral start, then a grid-accelerated force refinement) takes about a second at
    // 1,000 nodes where cytoscape's own cose takes ten; later layouts start from the current
    // positions, so the picture moves rather than reshuffles.
    const eles = cy.elements().filter((ele) => ele.isNode() || ele.data("state") === "up");
    eles.layout({
      name: "fcose", quality: n > REFINE_UP_TO_NODES ? "draft" : "default",
      randomize: first || n > REFINE_UP_TO_NODES, animate: n <= ANIMATE_UP_TO_NODES,
      animationDuration: 400, fit: true, padding: 24, packComponents: true,
      nodeRepulsion: () => 6000, idealEdgeLength: () => 50, nestingFactor: 0.1,
      nodeDimensionsIncludeLabels: n <= LABELS_UP_TO_NODES, numIter: n > 300 ? 1000 : 2500,
    }).run();
  }

  // ------------------------------------------------------------------ tooltip

  function showTooltip(ele) {
    const tip = $("tooltip");
    const r = ele && ele.nonempty() && !ele.isParent() ? rows.get(ele.id()) : undefined;
    if (!r) { tip.hidden = true; return; }
    tip.textContent = [
      `${r.id}  (${r.kind}${r.reachable ? "" : ", unreachable"})`,
      `production   ${kw(r.production)}`, `consumption  ${kw(r.consumption)}`,
      `net          ${signedKw(r.net)}`, `activation   ${signedKw(r.activation_kw)}`,
      `actual net   ${signedKw(r.actual_net)}`,
      `flex up      ${kw(r.flex_up)} at ${price(r.price_up)}`,
      `flex down    ${kw(r.flex_down)} at ${price(r.price_down)}`,
      `links        ${r.links.join(" ") || "none"}`,
      `endpoint     ${r.endpoint || "-"}`,
    ].join("\n");
    const p = ele.renderedPosition();
    tip.style.left = `${p.x + 18}px`;
    tip.style.top = `${p.y + 24}px`;
    tip.hidden = false;
  }
  cy.on("mouseover", "node", (ev) => { if (!state.pinned) showTooltip(ev.target); });
  cy.on("mouseout", "node", () => { if (!state.pinned) $("tooltip").hidden = true; });
  cy.on("tap", (ev) => {
    const target = ev.target;
    state.pinned = target !== cy && target.isNode() && !target.isParent() ? target.id() : null;
    showTooltip(state.pinned ? target : null);
  });
  cy.on("pan zoom", () => { if (state.pinned) showTooltip(cy.getElementById(state.pinned)); });

  // ------------------------------------------------------------------ totals and charts

  function addPoint(p) {
    state.x.push(p.t);
    for (const key of Object.keys(state.series)) state.series[key].push(p[key] ?? null);
    if (state.x.length > HISTORY_POINTS) {
      state.x.shift();
      for (const key of Object.keys(state.series)) state.series[key].shift();
    }
    state.last = p;
    showTotals(p);
    state.dirty.charts = true;
    schedule();
  }

  function showTotals(p) {
    const put = (id, text, cls) => { const el = $(id); el.textContent = text;
      el.className = `value ${cls || ""}`; };
    put("total-net", signedKw(p.total_net), signClass(p.total_net));
    put("total-production", kw(p.total_production));
    put("total-consumption", kw(p.total_consumption));
    put("imbalance", signedKw(p.imbalance_kw), signClass(p.imbalance_kw));
    put("balanced-net", signedKw(p.balanced_net_kw), signClass(p.balanced_net_kw));
    put("clearing-price", price(p.clearing_price));
    put("shortfall", p.shortfall_kw ? kw(p.shortfall_kw) : "none",
        p.shortfall_kw ? "neg" : "");
    document.body.dataset.totalNet = String(p.total_net);
  }

  const axis = { stroke: "#7d8a96", grid: { stroke: "#263039" }, ticks: { stroke: "#263039" } };
  function chartSize(el) { return { width: Math.max(200, el.clientWidth),
                                    height: Math.max(90, el.clientHeight - 34) }; }
  const powerEl = $("chart-power"), priceEl = $("chart-price");
  const line = (label, stroke, extra = {}) => ({ label, stroke, points: { show: false },
                                                 ...extra });
  const powerChart = new uPlot({
    ...chartSize(powerEl), scales: { x: { time: true } },
    series: [{}, line("total net", "#58a6ff", { width: 2 }), line("production", "#3fb950"),
      line("consumption", "#f0883e"), line("imbalance", "#d29922", { dash: [6, 4] }),
      line("balanced net", "#bc8cff", { width: 2 })],
    axes: [axis, { ...axis, label: "kW", size: 60 }],
  }, [[], [], [], [], [], []], powerEl);
  const priceChart = new uPlot({
    ...chartSize(priceEl), scales: { x: { time: true }, pct: { range: [0, 100] } },
    series: [{}, line("clearing price", "#e3b341",
                      { width: 2, paths: uPlot.paths.stepped({ align: 1 }) }),
      line("battery SoC %", "#56d4dd", { scale: "pct" })],
    axes: [axis, { ...axis, label: "price /kWh", size: 60 },
      { ...axis, scale: "pct", side: 1, label: "SoC %", grid: { show: false } }],
  }, [[], [], []], priceEl);
  new ResizeObserver(() => { powerChart.setSize(chartSize(powerEl));
    priceChart.setSize(chartSize(priceEl)); }).observe($("charts"));

  function drawCharts() {
    const s = state.series;
    powerChart.setData([state.x, s.total_net, s.total_production, s.total_consumption,
      s.imbalance_kw, s.balanced_net_kw]);
    priceChart.setData([state.x, s.clearing_price, s.soc_pct]);
  }

  // ------------------------------------------------------------------ the node table

  document.querySelectorAll("#nodes-table th").forEach((th) => th.addEventListener("click", () => {
    const key = th.dataset.key;
    state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
    state.dirty.table = true;
    schedule();
  }));

  function drawTable() {
    const grid = state.grid;
    if (!grid) return;
    const { key, dir } = state.sort;
    const value = (n) => key === "degree" ? n.links.length : n[key];
    const sorted = [...grid.nodes].sort((a, b) => {
      const x = value(a), y = value(b);
      return (x < y ? -1 : x > y ? 1 : a.id < b.id ? -1 : 1) * dir;
    });
    const cells = (n) => `<td>${escape(n.id)}</td><td>${escape(n.kind)}</td>`
      + `<td class="num">${number(n.production)}</td><td class="num">${number(n.consumption)}</td>`
      + `<td class="num ${signClass(n.net)}">${number(n.net)}</td>`
      + `<td class="num">${number(n.activation_kw)}</td>`
      + `<td class="num ${signClass(n.actual_net)}">${number(n.actual_net)}</td>`
      + `<td class="num">${n.island + 1}</td><td class="num">${n.links.length}</td>`;
    const shown = sorted.slice(0, TABLE_ROWS_SHOWN);
    $("table-caption").textContent = shown.length < sorted.length
      ? `first ${shown.length} of ${sorted.length} by ${key}${dir < 0 ? " (descending)" : ""}:`
        + " click a column to sort" : "";
    document.querySelector("#nodes-table tbody").innerHTML = shown.map((n) =>
      `<tr data-id="${escape(n.id)}" class="${n.reachable ? "" : "unreachable"}`
      + `${n.id === grid.id ? " us" : ""}">${cells(n)}</tr>`).join("");
    document.querySelectorAll("#nodes-table th").forEach((th) => {
      th.classList.toggle("sorted", th.dataset.key === key);
      th.classList.toggle("desc", th.dataset.key === key && dir < 0);
    });
  }

  // ------------------------------------------------------------------ events

  function addEvents(events, reset = false) {
    const list = $("events");
    if (reset) list.textContent = "";
    for (const e of events) {
      const li = document.createElement("li");
      li.className = e.kind;
      li.innerHTML = `<time>${clock(e.t)}</time>${escape(e.text)}`;
      list.prepend(li);
    }
    while (list.children.length > EVENTS_SHOWN) list.lastChild.remove();
  }

  // ------------------------------------------------------------------ the stream

  function schedule() {
    if (state.frame) return;
    state.frame = requestAnimationFrame(() => {
      state.frame = 0;
      if (state.dirty.table) { state.dirty.table = false; drawTable(); }
      if (state.dirty.charts) { state.dirty.charts = false; drawCharts(); }
    });
  }

  function setLive(ok, message) {
    const pill = $("live");
    pill.textContent = ok ? "live" : "offline";
    pill.className = `pill ${ok ? "on" : "off"}`;
    pill.title = message;
    document.body.dataset.live = String(ok);
    if (!ok) $("node-id").textContent = message;
  }

  const handlers = {
    hello(body) {
      state.x = [];
      for (const key of Object.keys(state.series)) state.series[key] = [];
      if (body.grid) applyGrid(body.grid);
      for (const p of body.history) addPoint(p);
      addEvents(body.events, true);
      setLive(body.link.ok, body.link.message);
    },
    grid: applyGrid,
    totals: addPoint,
    events: (events) => addEvents(events),
    link: (body) => setLive(body.ok, body.message),
  };

  window.zgrid.handlers = handlers;  // scripts/bench_dashboard.py feeds messages through them

  const stream = new EventSource("events");
  stream.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    const handle = handlers[msg.type];
    if (handle) handle(msg.body);
  };
  stream.onerror = () => setLive(false, "the dashboard server is not answering; retrying");
})();

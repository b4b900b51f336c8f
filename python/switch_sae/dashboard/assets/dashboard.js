// The dashboard's pages: a feature table (paginated, sortable, searchable) fed by data
// chunks, and a feature page drawn from its record. Data files are scripts that call
// DASH.receive (see site.py: browsers refuse fetch() on file:// pages). Plots are Plotly.
"use strict";
const DASH = (() => {
  const store = {}, waiting = {};
  const root = () => document.body.dataset.root || "";
  const pad = (n) => String(n).padStart(4, "0");

  function receive(kind, key, payload) {
    const id = `${kind}/${key}`;
    store[id] = payload;
    (waiting[id] || []).forEach(([resolve]) => resolve(payload));
    delete waiting[id];
  }

  function load(kind, key) {
    const id = `${kind}/${key}`;
    if (id in store) return Promise.resolve(store[id]);
    return new Promise((resolve, reject) => {
      if (!waiting[id]) {
        waiting[id] = [];
        const script = document.createElement("script");
        // Singletons (meta, tokens) are data/<kind>.js; chunks are data/<kind>/<key>.js.
        script.src = `${root()}data/${kind === key ? kind : id}.js`;
        script.onerror = () => (waiting[id] || []).forEach(([, fail]) => fail(new Error(`cannot load ${script.src}`)));
        document.head.appendChild(script);
      }
      waiting[id].push([resolve, reject]);
    });
  }

  const fmt = (x) => (x === 0 ? "0" : Math.abs(x) >= 0.01 && Math.abs(x) < 1e4 ? x.toPrecision(3) : x.toExponential(2));
  const el = (tag, attrs = {}, text) => {
    const node = document.createElement(tag);
    Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, v));
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const showToken = (s) => (s === undefined ? "?" : s.replace(/\n/g, "↵").replace(/\t/g, "→"));

  // ------------------------------------------------------------------ feature table
  async function initTable(table) {
    const meta = await load("meta", "meta");
    const first = Number(table.dataset.first), count = Number(table.dataset.count);
    const state = { rows: [], shown: [], page: 0, column: 0, direction: 1, query: "" };
    const status = document.getElementById("table-status");
    const render = () => renderTable(table, meta, state);
    const refilter = () => { state.shown = filterRows(state.rows, state.query); sortRows(state); render(); };
    document.getElementById("search").addEventListener("input", (event) => {
      state.query = event.target.value.trim().toLowerCase(); state.page = 0; refilter();
    });
    document.getElementById("prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); render(); });
    document.getElementById("next").addEventListener("click", () => { state.page += 1; render(); });
    table.querySelectorAll("th").forEach((th) => th.addEventListener("click", () => {
      const column = Number(th.dataset.column);
      state.direction = state.column === column ? -state.direction : (th.dataset.type === "number" && column > 1 ? -1 : 1);
      state.column = column; state.page = 0;
      table.querySelectorAll("th").forEach((h) => h.classList.remove("asc", "desc"));
      th.classList.add(state.direction > 0 ? "asc" : "desc");
      sortRows(state); render();
    }));
    const lastChunk = Math.floor((first + count - 1) / meta.rows_per_chunk);
    for (let c = Math.floor(first / meta.rows_per_chunk); c <= lastChunk; c++) {
      const rows = await load("rows", pad(c));
      rows.forEach((row) => { if (row[0] >= first && row[0] < first + count) state.rows.push(row); });
      refilter();
    }
    status.textContent = `${state.rows.length.toLocaleString()} features`;
  }

  function filterRows(rows, query) {
    if (!query) return rows.slice();
    if (/^\d+$/.test(query)) return rows.filter((r) => r[0] === Number(query));
    if (/^e\d+$/.test(query)) return rows.filter((r) => r[1] === Number(query.slice(1)));
    return rows.filter((r) => r[5].toLowerCase().includes(query));
  }

  function sortRows(state) {
    const c = state.column, d = state.direction;
    state.shown.sort((a, b) => (typeof a[c] === "string" ? a[c].localeCompare(b[c]) : a[c] - b[c]) * d || a[0] - b[0]);
  }

  function renderTable(table, meta, state) {
    const size = meta.page_size, pages = Math.max(1, Math.ceil(state.shown.length / size));
    state.page = Math.min(state.page, pages - 1);
    const body = table.querySelector("tbody");
    body.replaceChildren();
    for (const row of state.shown.slice(state.page * size, (state.page + 1) * size)) {
      const tr = el("tr");
      const cell = el("td"); cell.appendChild(el("a", { href: `${DASH.root()}feature.html?id=${row[0]}` }, `#${row[0]}`)); tr.appendChild(cell);
      if (meta.switch) {
        const e = el("td"); e.appendChild(el("a", { href: `${DASH.root()}experts/expert_${row[1]}.html` }, String(row[1]))); tr.appendChild(e);
      }
      tr.appendChild(el("td", { class: "num" }, fmt(row[2])));
      tr.appendChild(el("td", { class: "num" }, fmt(row[3])));
      tr.appendChild(el("td", { class: "num" }, fmt(row[4])));
      tr.appendChild(el("td", { class: "tokens" }, row[5]));
      body.appendChild(tr);
    }
    document.getElementById("page-status").textContent =
      `page ${state.page + 1} of ${pages} · ${state.shown.length.toLocaleString()} matching`;
  }

  // ------------------------------------------------------------------ feature page
  async function initFeature() {
    const meta = await load("meta", "meta");
    const params = new URLSearchParams(location.search);
    const id = Number(params.get("id") || location.hash.slice(1) || 0);
    if (!Number.isInteger(id) || id < 0 || id >= meta.d_sae) {
      document.getElementById("feature-summary").textContent = `no feature ${params.get("id")}: ids run from 0 to ${meta.d_sae - 1}`;
      return;
    }
    const [chunk, tokens] = await Promise.all([load("features", pad(Math.floor(id / meta.features_per_chunk))), load("tokens", "tokens")]);
    const rec = chunk[id % meta.features_per_chunk];
    document.title = `Feature ${id} · ${meta.title}`;
    document.getElementById("feature-title").textContent = `Feature ${id}`;
    const where = rec.expert === undefined ? "" : `expert ${rec.expert} · `;
    document.getElementById("feature-summary").textContent = rec.fires
      ? `${where}fired on ${rec.fires.toLocaleString()} of ${meta.n_tokens.toLocaleString()} tokens (${fmt(rec.fires / meta.n_tokens)}); max activation ${fmt(rec.max)}`
      : `${where}never fired on the ${meta.n_tokens.toLocaleString()} held-out tokens`;
    renderExamples(document.getElementById("top-examples"), rec.top || [], tokens, rec.max);
    renderBands(document.getElementById("bands"), rec.bands || [], tokens, rec.max);
    renderHistogram(rec, meta);
    renderLogits(rec, tokens.vocab);
    renderNeighbours(rec, meta);
    if (rec.routing) renderRouting(rec, meta);
  }

  function renderExamples(target, examples, tokens, maximum) {
    if (!examples.length) { target.appendChild(el("p", { class: "note" }, "no firings to show")); return; }
    for (const [start, token, value, percents] of examples) {
      const line = el("div", { class: "example" });
      line.appendChild(el("span", { class: "value" }, fmt(value)));
      percents.forEach((q, i) => {
        const row = start + i;
        const span = el("span", { class: "tok" + (q > 0 ? " hl" : "") + (row === token ? " active" : "") },
          showToken(tokens.vocab[tokens.ids[row]]));
        if (q > 0) { span.style.backgroundColor = `rgba(255, 120, 0, ${(0.15 + 0.85 * q / 100).toFixed(2)})`; }
        span.title = `activation ≈ ${fmt((q / 100) * maximum)}`;
        line.appendChild(span);
      });
      target.appendChild(line);
    }
  }

  function renderBands(target, bands, tokens, maximum) {
    if (!bands.length) { target.appendChild(el("p", { class: "note" }, "no firings to show")); return; }
    const n = bands.length;
    bands.slice().reverse().forEach((band, i) => {  // highest band first
      const b = n - 1 - i;
      target.appendChild(el("h3", {}, `firings ranked ${Math.round((100 * b) / n)}–${Math.round((100 * (b + 1)) / n)}% by activation: ${fmt(band.low)} to ${fmt(band.high)}`));
      const box = el("div");
      renderExamples(box, band.examples, tokens, maximum);
      target.appendChild(box);
    });
  }

  function renderHistogram(rec, meta) {
    const target = document.getElementById("histogram");
    if (!rec.histogram || !rec.histogram.length) { target.appendChild(el("p", { class: "note" }, "never fired")); return; }
    const edges = meta.hist_edges, [lo, ...counts] = rec.histogram;
    const centre = (b) => (b === 0 ? edges[0] / 1.12 : b >= edges.length ? edges[edges.length - 1] * 1.12 : Math.sqrt(edges[b - 1] * edges[b]));
    const x = counts.map((_, i) => centre(lo + i));
    Plotly.newPlot(target, [{ type: "bar", x, y: counts, marker: { color: "#4c78a8" } }], {
      height: 300, margin: { l: 50, r: 20, t: 20, b: 45 }, template: "plotly_white",
      xaxis: { type: "log", title: { text: "activation" } }, yaxis: { title: { text: "tokens" } },
    }, { displaylogo: false, responsive: true });
  }

  function renderLogits(rec, vocab) {
    const body = document.querySelector("#logits tbody");
    if (!rec.logits_top) {
      body.appendChild(el("tr")).appendChild(el("td", { colspan: 4, class: "note" },
        rec.fires ? "no logit effect at this hook (not the residual stream)" : "not computed for a feature that never fired"));
      return;
    }
    rec.logits_top.forEach(([id, value], i) => {
      const [idLow, valueLow] = rec.logits_bottom[i];
      const tr = el("tr");
      tr.appendChild(el("td", { class: "tok-cell" }, showToken(vocab[id])));
      tr.appendChild(el("td", { class: "num pos" }, `+${fmt(value)}`));
      tr.appendChild(el("td", { class: "tok-cell" }, showToken(vocab[idLow])));
      tr.appendChild(el("td", { class: "num neg" }, fmt(valueLow)));
      body.appendChild(tr);
    });
  }

  function renderNeighbours(rec, meta) {
    const body = document.querySelector("#neighbours tbody");
    for (const [id, cos] of rec.neighbours) {
      const tr = el("tr");
      const cell = el("td"); cell.appendChild(el("a", { href: `feature.html?id=${id}` }, `#${id}`)); tr.appendChild(cell);
      if (meta.switch) {
        const expert = Math.floor(id / meta.d_expert);
        tr.appendChild(el("td", { class: expert === rec.expert ? "" : "other-expert" }, expert === rec.expert ? `${expert} (same)` : String(expert)));
      }
      tr.appendChild(el("td", { class: "num" }, cos.toFixed(3)));
      body.appendChild(tr);
    }
  }

  function renderRouting(rec, meta) {
    const section = document.getElementById("routing");
    section.hidden = false;
    const r = rec.routing;
    const share = r.would_fire ? `${(100 * r.elsewhere / r.would_fire).toFixed(1)}%` : "n/a";
    document.getElementById("routing-summary").innerHTML = "";
    document.getElementById("routing-summary").appendChild(document.createTextNode(
      `Held by expert ${rec.expert}. It would fire on ${r.would_fire.toLocaleString()} held-out tokens if each were routed to its expert; ` +
      `the router sent ${r.elsewhere.toLocaleString()} of them (${share}) elsewhere.`));
    const x = r.by_expert.map((_, e) => `expert ${e}`);
    const colours = r.by_expert.map((_, e) => (e === rec.expert ? "#e45756" : "#4c78a8"));
    Plotly.newPlot(document.getElementById("routing-plot"), [{ type: "bar", x, y: r.by_expert, marker: { color: colours } }], {
      height: 260, margin: { l: 50, r: 20, t: 30, b: 40 }, template: "plotly_white",
      title: { text: "Router's choice for the tokens that would fire it" }, yaxis: { title: { text: "tokens" } },
    }, { displaylogo: false, responsive: true });
  }

  function start() {
    const table = document.getElementById("feature-table");
    const failed = (err) => { console.error(err); const s = document.getElementById("table-status") || document.getElementById("feature-summary"); if (s) s.textContent = String(err); };
    if (table) initTable(table).catch(failed);
    if (document.body.dataset.page === "feature") initFeature().catch(failed);
  }

  document.addEventListener("DOMContentLoaded", start);
  return { receive, load, root };
})();

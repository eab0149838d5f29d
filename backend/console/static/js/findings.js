// The findings list: filters (the API's criteria), sorting, pages, bulk archive, live refresh.

import { getJSON, postJSON } from "./api.js";
import { h, orDash, replace, toast } from "./dom.js";
import { SEVERITY_BANDS, ago, findingRoute, fmtTime, severityBadge, taskIdOf } from "./format.js";

const POLL_MS = 4000;
const PAGE = 50;
const RANGES = [
  ["", "Any time"],
  ["1h", "Last hour", 3600e3],
  ["24h", "Last 24 hours", 86400e3],
  ["7d", "Last 7 days", 7 * 86400e3],
  ["30d", "Last 30 days", 30 * 86400e3],
  ["custom", "Custom (UTC)…"],
];
const COLUMNS = [
  ["", null],
  ["Severity", "severity"],
  ["Finding", "type"],
  ["Cluster", "resource.ecsClusterDetails.name"],
  ["Task", null],
  ["Container", "resource.ecsClusterDetails.taskDetails.containers.name"],
  ["Executable", "service.runtimeDetails.process.executablePath"],
  ["Count", "service.count"],
  ["First seen", "service.eventFirstSeen"],
  ["Last seen", "service.eventLastSeen"],
];
const FILTER_KEYS = ["severityGte", "severityLt", "type", "cluster", "family", "task", "archived", "range", "from", "to"];

function stateFrom(params) {
  const state = { sort: params.get("sort") || "updatedAt", order: params.get("order") || "DESC",
    offset: Number(params.get("offset") || 0) || 0 };
  for (const k of FILTER_KEYS) state[k] = params.get(k) || "";
  if (!state.archived) state.archived = "false";
  return state;
}

function hashOf(state) {
  const q = new URLSearchParams();
  for (const k of [...FILTER_KEYS, "sort", "order", "offset"]) {
    const v = state[k];
    if (v !== "" && v !== null && v !== undefined && !(k === "offset" && !v)
      && !(k === "archived" && v === "false") && !(k === "sort" && v === "updatedAt") && !(k === "order" && v === "DESC")) {
      q.set(k, String(v));
    }
  }
  const text = q.toString();
  return text ? `#/findings?${text}` : "#/findings";
}

function utcInput(ms) {
  return ms ? new Date(Number(ms)).toISOString().slice(0, 16) : "";
}

function fromUtcInput(value) {
  if (!value) return "";
  const t = Date.parse(`${value}:00Z`);
  return Number.isNaN(t) ? "" : String(t);
}

/** The API's filter parameters for the state (time presets are relative to now, so they move as time does). */
function apiFilters(state) {
  const p = {};
  for (const k of ["severityGte", "severityLt", "type", "cluster", "family", "task", "archived"]) if (state[k]) p[k] = state[k];
  const preset = RANGES.find((r) => r[0] === state.range);
  if (preset && preset[2]) p.from = Math.floor(Date.now() - preset[2]);
  if (state.range === "custom") {
    if (state.from) p.from = state.from;
    if (state.to) p.to = state.to;
  }
  return p;
}

function select(name, label, options, value, onchange) {
  return h("label", { class: "filter" }, label,
    h("select", { name, onchange },
      options.map(([v, text]) => h("option", { value: v, selected: v === value }, text))));
}

export function findingsView(root, params) {
  const state = stateFrom(params);
  const known = new Map(); // "detector/id" -> "updatedAt:count" shown or already noticed
  let cursor = null;
  let timer = null;
  let disposed = false;
  let loading = null;

  const status = h("span", { class: "live", id: "live-status" }, "● Live");
  const counter = h("span", { class: "page-info" });
  const tbody = h("tbody");
  const filterBox = h("form", { class: "filters", onsubmit: (e) => e.preventDefault() });
  const customBox = h("span", { class: "custom-range" });
  const bulk = h("div", { class: "bulk" },
    h("button", { type: "button", id: "archive-selected", onclick: () => archiveSelected(true) }, "Archive selected"),
    h("button", { type: "button", id: "unarchive-selected", onclick: () => archiveSelected(false) }, "Unarchive selected"));
  const prev = h("button", { type: "button", id: "prev-page", onclick: () => page(-1) }, "← Previous");
  const next = h("button", { type: "button", id: "next-page", onclick: () => page(1) }, "Next →");
  const headRow = h("tr");
  const table = h("table", { class: "findings", id: "findings-table" }, h("thead", {}, headRow), tbody);

  replace(root,
    h("div", { class: "view-head" }, h("h1", {}, "Findings"), status),
    filterBox,
    h("div", { class: "table-tools" }, bulk, h("div", { class: "pager" }, counter, prev, next)),
    h("div", { class: "table-wrap" }, table));

  function changed() {
    state.offset = 0;
    history.replaceState(null, "", hashOf(state));
    load();
  }

  function setFilter(key) {
    return (e) => {
      state[key] = e.target.value;
      if (key === "range") renderCustom();
      changed();
    };
  }

  function renderCustom() {
    if (state.range !== "custom") {
      replace(customBox);
      return;
    }
    const onFrom = (e) => { state.from = fromUtcInput(e.target.value); changed(); };
    const onTo = (e) => { state.to = fromUtcInput(e.target.value); changed(); };
    replace(customBox,
      h("label", { class: "filter" }, "From", h("input", { type: "datetime-local", name: "from", value: utcInput(state.from), onchange: onFrom })),
      h("label", { class: "filter" }, "To", h("input", { type: "datetime-local", name: "to", value: utcInput(state.to), onchange: onTo })));
  }

  function renderFilters(facets) {
    const bandFrom = [["", "Any"], ...SEVERITY_BANDS.map((b) => [String(b.gte), b.label])];
    const bandTo = [["", "Any"], ...SEVERITY_BANDS.map((b) => [String(b.lt), b.label])];
    const opts = (values, any) => [["", any], ...values.map((v) => [v, v])];
    replace(filterBox,
      select("severityGte", "Severity from", bandFrom, state.severityGte, setFilter("severityGte")),
      select("severityLt", "to", bandTo, state.severityLt, setFilter("severityLt")),
      select("type", "Type", opts(withCurrent(facets.types, state.type), "All types"), state.type, setFilter("type")),
      select("cluster", "Cluster", opts(withCurrent(facets.clusters, state.cluster), "All clusters"), state.cluster, setFilter("cluster")),
      select("family", "Task family", opts(withCurrent(facets.families, state.family), "All families"), state.family, setFilter("family")),
      select("archived", "Status", [["false", "Active"], ["true", "Archived"], ["all", "Active and archived"]], state.archived, setFilter("archived")),
      select("range", "Updated", RANGES.map((r) => [r[0], r[1]]), state.range, setFilter("range")),
      customBox,
      state.task ? h("span", { class: "chip", id: "task-filter" }, `Task ${taskIdOf(state.task)}`,
        h("button", { type: "button", class: "link", "aria-label": "remove the task filter",
          onclick: () => { state.task = ""; renderFilters(lastFacets); changed(); } }, "×")) : null,
      h("button", { type: "button", class: "link", id: "reset-filters", onclick: reset }, "Reset"));
    renderCustom();
  }

  function withCurrent(values, current) {
    return current && !values.includes(current) ? [current, ...values] : values;
  }

  function reset() {
    for (const k of FILTER_KEYS) state[k] = "";
    state.archived = "false";
    renderFilters(lastFacets);
    changed();
  }

  function renderHead() {
    replace(headRow, COLUMNS.map(([label, key]) => {
      if (!key) {
        if (label) return h("th", {}, label);
        return h("th", {}, h("input", { type: "checkbox", title: "select all", "aria-label": "select all",
          onchange: (e) => tbody.querySelectorAll("input.pick").forEach((c) => { c.checked = e.target.checked; }) }));
      }
      const active = state.sort === key;
      const arrow = active ? (state.order === "DESC" ? " ↓" : " ↑") : "";
      return h("th", { class: active ? "sorted" : null, "aria-sort": active ? (state.order === "DESC" ? "descending" : "ascending") : null },
        h("button", { type: "button", class: "sort", dataset: { sort: key }, onclick: () => sortBy(key) }, label, arrow));
    }));
  }

  function sortBy(key) {
    if (state.sort === key) state.order = state.order === "DESC" ? "ASC" : "DESC";
    else { state.sort = key; state.order = key === "type" || key.includes("name") || key.includes("Path") ? "ASC" : "DESC"; }
    renderHead();
    changed();
  }

  function page(delta) {
    state.offset = Math.max(0, state.offset + delta * PAGE);
    history.replaceState(null, "", hashOf(state));
    load();
  }

  function row(f, fresh) {
    const key = `${f.detectorId}/${f.id}`;
    return h("tr", { class: [fresh ? "fresh" : "", f.archived ? "archived" : ""].join(" ").trim() || null,
      dataset: { findingId: f.id, detectorId: f.detectorId } },
      h("td", {}, h("input", { type: "checkbox", class: "pick", value: key, "aria-label": "select finding" })),
      h("td", {}, severityBadge(f.severity)),
      h("td", { class: "finding-cell" },
        h("a", { href: findingRoute(f.detectorId, f.id), class: "title" }, orDash(f.title)),
        h("div", { class: "sub" }, f.type, f.archived ? h("span", { class: "tag" }, "archived") : null)),
      h("td", {}, orDash(f.clusterName), h("div", { class: "sub account" }, f.accountId)),
      h("td", {}, h("span", { class: "mono" }, orDash(f.taskId)), h("div", { class: "sub" }, orDash(f.family))),
      h("td", {}, orDash(f.containerName), h("div", { class: "sub" }, orDash(f.image))),
      h("td", { class: "mono wrap" }, orDash(f.executablePath)),
      h("td", { class: "num" }, String(f.count)),
      h("td", { class: "time" }, fmtTime(f.firstSeen ?? f.createdAt)),
      h("td", { class: "time" }, fmtTime(f.lastSeen ?? f.updatedAt), h("div", { class: "sub" }, ago(f.updatedAt))));
  }

  async function load(fresh = new Set()) {
    const token = {};
    loading = token;
    let data;
    try {
      data = await getJSON("/console/api/findings", { ...apiFilters(state), sort: state.sort, order: state.order,
        offset: state.offset, limit: PAGE });
    } catch (err) {
      if (!disposed && loading === token) replace(tbody, h("tr", {}, h("td", { colspan: COLUMNS.length, class: "error" }, err.message)));
      return;
    }
    if (disposed || loading !== token) return;
    if (cursor === null) cursor = data.cursor;
    for (const f of data.findings) known.set(`${f.detectorId}/${f.id}`, `${f.updatedAt}:${f.count}`);
    if (!data.findings.length) {
      replace(tbody, h("tr", {}, h("td", { colspan: COLUMNS.length, class: "empty" }, "No findings match these filters.")));
    } else {
      replace(tbody, data.findings.map((f) => row(f, fresh.has(`${f.detectorId}/${f.id}`))));
    }
    const last = Math.min(data.offset + data.findings.length, data.total);
    counter.textContent = data.total ? `${data.offset + 1}–${last} of ${data.total}` : "0 findings";
    prev.disabled = data.offset === 0;
    next.disabled = last >= data.total;
    root.dataset.loaded = String(Date.now());
  }

  async function poll() {
    if (disposed || document.hidden || cursor === null) return;
    try {
      const res = await getJSON("/console/api/findings/changes", { ...apiFilters(state), since: cursor });
      if (disposed) return;
      cursor = res.cursor;
      const fresh = new Set();
      for (const c of res.changed) {
        const key = `${c.detectorId}/${c.id}`;
        const version = `${c.updatedAt}:${c.count}`;
        if (known.get(key) !== version) fresh.add(key);
        known.set(key, version);
      }
      status.className = "live";
      status.textContent = `● Live · checked ${fmtTime(Date.now()).slice(11)}`;
      if (fresh.size) {
        await load(fresh);
        toast(`${fresh.size} new or updated finding${fresh.size > 1 ? "s" : ""}`);
      }
    } catch (err) {
      status.className = "live stale";
      status.textContent = `● Not live: ${err.message}`;
    }
  }

  async function archiveSelected(archived) {
    const picked = [...tbody.querySelectorAll("input.pick:checked")].map((c) => {
      const tr = c.closest("tr");
      return { detectorId: tr.dataset.detectorId, id: tr.dataset.findingId };
    });
    if (!picked.length) {
      toast("Select findings first", "warn");
      return;
    }
    try {
      const res = await postJSON("/console/api/findings/archive", { findings: picked, archived });
      toast(`${res.updated} finding${res.updated === 1 ? "" : "s"} ${archived ? "archived" : "unarchived"}`);
      await load();
    } catch (err) {
      toast(err.message, "error");
    }
  }

  let lastFacets = { types: [], clusters: [], families: [] };
  renderHead();
  renderFilters(lastFacets);
  getJSON("/console/api/facets").then((facets) => {
    if (disposed) return;
    lastFacets = facets;
    renderFilters(facets);
  }).catch((err) => toast(err.message, "error"));
  load();
  timer = setInterval(poll, POLL_MS);

  return {
    dispose() {
      disposed = true;
      clearInterval(timer);
    },
  };
}

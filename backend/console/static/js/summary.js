// Summary: findings over time by severity (a stacked bar chart) and by type, and where they come from.

import { getJSON } from "./api.js";
import { h, replace } from "./dom.js";
import { sparkline, stackedBars } from "./chart.js";
import { fmtShortTime, fmtTime } from "./format.js";

const PERIODS = [["1", "Last 24 hours"], ["7", "Last 7 days"], ["14", "Last 14 days"], ["30", "Last 30 days"], ["90", "Last 90 days"]];

function barList(items, labelOf, id) {
  const max = Math.max(1, ...items.map((i) => i.count));
  if (!items.length) return h("p", { class: "muted" }, "No findings in this period.");
  return h("table", { class: "grid bars", id },
    h("tbody", {}, items.map((item) => {
      const fill = h("span", { class: "bar-fill" });
      fill.style.width = `${(100 * item.count) / max}%`;
      return h("tr", {}, h("td", { class: "wrap" }, labelOf(item)), h("td", { class: "barcell" }, h("span", { class: "bar" }, fill)),
        h("td", { class: "num" }, String(item.count)));
    })));
}

export function summaryView(root, params) {
  let disposed = false;
  let days = params.get("days") || "14";
  let archived = params.get("archived") === "all";
  const body = h("div");
  const controls = h("form", { class: "filters", onsubmit: (e) => e.preventDefault() },
    h("label", { class: "filter" }, "Period",
      h("select", { name: "days", onchange: (e) => { days = e.target.value; sync(); } },
        PERIODS.map(([v, t]) => h("option", { value: v, selected: v === days }, t)))),
    h("label", { class: "filter inline" },
      h("input", { type: "checkbox", name: "archived", checked: archived, onchange: (e) => { archived = e.target.checked; sync(); } }),
      " include archived"));
  replace(root, h("div", { class: "view-head" }, h("h1", {}, "Summary")), controls, body);

  function sync() {
    history.replaceState(null, "", `#/summary?days=${encodeURIComponent(days)}${archived ? "&archived=all" : ""}`);
    load();
  }

  async function load() {
    let data;
    try {
      data = await getJSON("/console/api/summary", { days, archived: archived ? "all" : "" });
    } catch (err) {
      if (!disposed) replace(body, h("p", { class: "error" }, err.message));
      return;
    }
    if (disposed) return;
    const label = (t) => fmtShortTime(t, data.bucketMs);
    const keys = data.severityLabels;
    replace(body,
      h("div", { class: "totals" }, keys.map((k) => h("div", { class: `total sev-${k.toLowerCase()}`, dataset: { severity: k } },
        h("span", { class: "n" }, String(data.totals[k])), h("span", {}, k)))),
      h("section", { class: "card" },
        h("h2", {}, `Findings by severity, per ${data.bucketMs < 86400000 ? "hour" : "day"} (UTC)`),
        stackedBars(data.bySeverity, keys, label, { id: "severity-chart", width: 1200, height: 280 }),
        h("div", { class: "legend" }, keys.map((k) => h("span", { class: `key band-${k.toLowerCase()}` }, k))),
        h("p", { class: "muted" }, `From ${fmtTime(data.from)} to ${fmtTime(data.to)}, by the time each finding was first reported.`)),
      h("div", { class: "summary-grid" },
        h("section", { class: "card" }, h("h2", {}, "Findings by type"),
          data.byType.length ? h("table", { class: "grid", id: "types-table" },
            h("thead", {}, h("tr", {}, h("th", {}, "Type"), h("th", {}, "Over time"), h("th", {}, "Findings"))),
            h("tbody", {}, data.byType.map((t) => h("tr", {},
              h("td", { class: "wrap" }, h("a", { href: `#/findings?type=${encodeURIComponent(t.type)}&archived=${archived ? "all" : "false"}` }, t.type)),
              h("td", {}, sparkline(t.series.map((p) => p.count), { title: t.type })),
              h("td", { class: "num" }, String(t.total))))))
            : h("p", { class: "muted" }, "No findings in this period."),
          data.otherTypes ? h("p", { class: "muted" }, `and ${data.otherTypes} more types`) : null),
        h("section", { class: "card" }, h("h2", {}, "Top clusters"),
          barList(data.topClusters, (c) => [c.clusterName, h("div", { class: "sub" }, c.accountId)], "top-clusters")),
        h("section", { class: "card" }, h("h2", {}, "Top images"),
          barList(data.topImages, (i) => h("span", { class: "mono" }, i.image), "top-images"))));
    root.dataset.loaded = String(Date.now());
  }

  load();
  return { dispose() { disposed = true; } };
}

// Coverage: per cluster, the share of running tasks whose agent is healthy; each unhealthy task with its issue
// and what to do about it; agents' versions and the event sources each runs; the exporters' health.

import { getJSON } from "./api.js";
import { h, orDash, replace } from "./dom.js";
import { ago, fmtTime } from "./format.js";

const REFRESH_MS = 15000;

function percentBar(percent) {
  const fill = h("span", { class: "bar-fill" });
  // CSSOM, not a style attribute: the CSP allows no inline styles
  fill.style.width = `${percent ?? 0}%`;
  return h("span", { class: `bar ${percent === null ? "" : percent >= 100 ? "ok" : percent >= 80 ? "warn" : "bad"}` }, fill);
}

function statusTag(status) {
  return h("span", { class: `status status-${String(status).toLowerCase()}` }, status);
}

function taskRow(t) {
  return h("tr", { class: t.status === "UNHEALTHY" ? "unhealthy" : null, dataset: { taskArn: t.taskArn } },
    h("td", {}, statusTag(t.status)),
    h("td", {}, h("span", { class: "mono" }, orDash(t.taskId)), h("div", { class: "sub" }, orDash(t.family))),
    h("td", {}, orDash(t.launchType)),
    h("td", {}, orDash(t.agentVersion)),
    h("td", {}, (t.sourcesEnabled || []).length
      ? h("span", { class: "chips" }, t.sourcesEnabled.map((name) => h("span", { class: "chip" }, name)))
      : h("span", { class: "muted" }, t.agentId ? "none" : "no agent")),
    h("td", { class: "time" }, t.lastHeartbeatMs ? ago(t.lastHeartbeatMs) : "—",
      t.lastHeartbeat ? h("div", { class: "sub" }, fmtTime(t.lastHeartbeat)) : null),
    h("td", { class: "issue" }, t.issue ? h("div", { class: "issue-text" }, t.issue) : "—",
      (t.advice || []).map((a) => h("div", { class: "advice" }, "What to do: ", a))));
}

function clusterCard(c) {
  const versions = Object.entries(c.agentVersions || {});
  return h("section", { class: "card cluster", dataset: { cluster: c.clusterName } },
    h("div", { class: "cluster-head" },
      h("h2", {}, c.clusterName),
      h("span", { class: "muted" }, `${c.accountId} · ${c.region}`),
      statusTag(c.status),
      c.managementType === "DISABLED" ? h("span", { class: "tag" }, "excluded from coverage") : null),
    h("div", { class: "coverage-line" },
      h("span", { class: "percent" }, c.coveragePercent === null ? "—" : `${c.coveragePercent}%`),
      percentBar(c.coveragePercent),
      h("span", {}, `${c.healthy} of ${c.running} running task${c.running === 1 ? "" : "s"} healthy`)),
    c.issue ? h("p", { class: "issue-text" }, "Cluster issue: ", c.issue) : null,
    h("p", { class: "muted" }, "Agent versions: ",
      versions.length ? versions.map(([v, n], i) => [i ? ", " : "", `${v} (${n} task${n === 1 ? "" : "s"})`]) : "—"),
    h("table", { class: "grid tasks" },
      h("thead", {}, h("tr", {}, ["Status", "Task", "Launch", "Agent", "Event sources", "Last heartbeat", "Issue"].map((t) => h("th", {}, t)))),
      h("tbody", {}, c.tasks.map(taskRow))));
}

function exportersCard(data) {
  let content;
  if (!data.visible) {
    content = h("p", { class: "muted" }, "Exporters carry every account's findings: operators of all accounts see their health.");
  } else if (!data.exporters.length) {
    content = h("p", { class: "muted" }, "No exporter is configured (RUNTIME_BACKEND_EXPORTS_FILE).");
  } else {
    content = h("table", { class: "grid" },
      h("thead", {}, h("tr", {}, ["Exporter", "Type", "Status", "Queue", "Sent", "Retries", "Dead letters", "Last success",
        "Last error"].map((t) => h("th", {}, t)))),
      h("tbody", {}, data.exporters.map((e) => h("tr", { class: e.status === "OK" ? null : "unhealthy", dataset: { exporter: e.name } },
        h("td", {}, e.name), h("td", {}, e.type), h("td", {}, statusTag(e.status)),
        h("td", { class: "num" }, `${e.queueDepth} / ${e.queueCapacity}`),
        h("td", { class: "num" }, String(e.sent)), h("td", { class: "num" }, String(e.retries)),
        h("td", { class: "num" }, String(e.deadLettered)),
        h("td", { class: "time" }, fmtTime(e.lastSuccessAt)),
        h("td", { class: "issue" }, e.lastError ? h("div", { class: "issue-text" }, e.lastError) : "—",
          e.lastErrorAt ? h("div", { class: "sub" }, fmtTime(e.lastErrorAt)) : null)))));
  }
  return h("section", { class: "card", id: "exporters" }, h("h2", {}, "Exporters"), content);
}

export function coverageView(root) {
  let disposed = false;
  const body = h("div");
  const overall = h("p", { class: "overall", id: "coverage-overall" });
  replace(root, h("div", { class: "view-head" }, h("h1", {}, "Coverage")), overall, body);

  async function load() {
    let data;
    let exporters;
    try {
      [data, exporters] = await Promise.all([getJSON("/console/api/coverage"), getJSON("/console/api/exports")]);
    } catch (err) {
      if (!disposed) replace(body, h("p", { class: "error" }, err.message));
      return;
    }
    if (disposed) return;
    overall.textContent = data.running
      ? `${data.coveragePercent}% of ${data.running} running tasks are covered by a healthy agent (as of ${fmtTime(data.generatedAt)}).`
      : "No agent has reported yet: deploy the sidecar with a token (runtime-backend token create) to see tasks here.";
    replace(body, data.clusters.map(clusterCard), exportersCard(exporters));
    root.dataset.loaded = String(Date.now());
  }

  load();
  const timer = setInterval(() => { if (!document.hidden) load(); }, REFRESH_MS);
  return { dispose() { disposed = true; clearInterval(timer); } };
}

// One finding, readable: what happened, the process and its ancestors as a tree, the type's context, threat
// intel, the container and task, and the task's other runtime events around it. Every value is the agent's
// text and is shown as text.

import { getJSON, postJSON } from "./api.js";
import { h, orDash, replace, toast } from "./dom.js";
import { fmtTime, severityBadge } from "./format.js";

const PROCESS_FIELDS = [
  ["executablePath", "Executable"],
  ["commandLine", "Command line"],
  ["user", "User"],
  ["userId", "UID"],
  ["euid", "EUID"],
  ["pid", "PID"],
  ["namespacePid", "PID in task"],
  ["startTime", "Started"],
  ["pwd", "Working directory"],
  ["executableSha256", "SHA-256"],
];

function section(title, id, ...content) {
  return h("section", { class: "card", id }, h("h2", {}, title), ...content);
}

function kv(rows) {
  const present = rows.filter(([, v]) => v !== null && v !== undefined && v !== "");
  if (!present.length) return h("p", { class: "muted" }, "Nothing reported.");
  return h("dl", { class: "kv" }, present.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v instanceof Node ? v : String(v))]));
}

function valueNode(value) {
  if (value === null || value === undefined) return "—";
  if (Array.isArray(value)) {
    if (value.every((v) => typeof v !== "object" || v === null)) return value.map(String).join(", ");
    return h("ol", { class: "plain" }, value.map((v) => h("li", {}, valueNode(v))));
  }
  if (typeof value === "object") return objectTable(value);
  return String(value);
}

function objectTable(obj) {
  const entries = Object.entries(obj || {});
  if (!entries.length) return h("p", { class: "muted" }, "Nothing reported.");
  return h("dl", { class: "kv" }, entries.flatMap(([k, v]) => [h("dt", {}, k), h("dd", { class: "wrap" }, valueNode(v))]));
}

function processNode(p, role) {
  const name = p.name || (p.executablePath ? String(p.executablePath).split("/").pop() : "?");
  const when = p.startTime ? fmtTime(p.startTime) : null;
  return h("div", { class: `proc ${role}` },
    h("div", { class: "proc-head" },
      h("span", { class: "proc-name" }, name),
      h("span", { class: "proc-meta" },
        p.pid !== undefined && p.pid !== null ? `pid ${p.pid}` : "",
        p.user || p.userId !== undefined ? ` · ${p.user ?? ""}${p.userId !== undefined && p.userId !== null ? ` (uid ${p.userId})` : ""}` : "",
        when ? ` · started ${when}` : ""),
      role === "self" ? h("span", { class: "tag hot" }, "this finding") : null),
    h("div", { class: "proc-exe mono" }, orDash(p.executablePath)),
    h("div", { class: "proc-cmd mono" }, orDash(p.commandLine)));
}

/** Root ancestor first, the finding's process last: nested lists, so the shape reads as a tree. */
function lineageTree(process) {
  if (!process) return h("p", { class: "muted" }, "The agent reported no process.");
  const ancestors = [...(process.lineage || [])].reverse(); // the agent lists the nearest ancestor first
  const root = h("ul", { class: "tree", id: "lineage-tree" });
  let parent = root;
  for (const a of ancestors) {
    const ul = h("ul");
    parent.append(h("li", { class: "ancestor" }, processNode(a, "ancestor"), ul));
    parent = ul;
  }
  parent.append(h("li", { class: "self" }, processNode(process, "self")));
  return root;
}

function sentence(f, s) {
  const p = f.service?.runtimeDetails?.process || {};
  const parts = [];
  parts.push(p.name || p.executablePath || "A process");
  if (p.user) parts.push(` (user ${p.user})`);
  parts.push(s.containerName ? ` in container ${s.containerName}` : "");
  parts.push(s.taskId ? ` of task ${s.taskId}` : "");
  parts.push(s.family ? ` (${s.family})` : "");
  parts.push(s.clusterName ? ` on cluster ${s.clusterName}` : "");
  parts.push(`: ${f.title || f.type}`);
  if (f.service?.count > 1) parts.push(`, seen ${f.service.count} times`);
  return `${parts.join("")}.`;
}

function actionCard(action) {
  if (!action) return null;
  const net = action.networkConnectionAction;
  const dns = action.dnsRequestAction;
  const rows = [["Action", action.actionType]];
  if (net) {
    rows.push(["Direction", net.connectionDirection], ["Protocol", net.protocol],
      ["Remote address", net.remoteIpDetails?.ipAddressV4 || net.remoteIpDetails?.ipAddressV6],
      ["Remote port", net.remotePortDetails?.port], ["Local port", net.localPortDetails?.port]);
  }
  if (dns) rows.push(["Domain", dns.domain], ["Protocol", dns.protocol]);
  return section("Network activity", "action", kv(rows));
}

function intelCard(evidence) {
  const details = evidence?.threatIntelligenceDetails || [];
  const content = details.length
    ? h("table", { class: "grid" },
      h("thead", {}, h("tr", {}, h("th", {}, "Threat list"), h("th", {}, "Threat names"), h("th", {}, "File SHA-256"))),
      h("tbody", {}, details.map((d) => h("tr", {},
        h("td", {}, orDash(d.threatListName)), h("td", {}, orDash((d.threatNames || []).join(", "))),
        h("td", { class: "mono" }, orDash(d.threatFileSha256))))))
    : h("p", { class: "muted" }, "No threat-intelligence match in this finding.");
  return section("Threat intelligence", "intel", content);
}

function resourceCard(f) {
  const ecs = f.resource?.ecsClusterDetails || {};
  const task = ecs.taskDetails || {};
  const containers = task.containers || (f.resource?.containerDetails ? [f.resource.containerDetails] : []);
  return section("Container and task", "resource",
    kv([["Cluster", ecs.name], ["Cluster ARN", ecs.arn], ["Task", task.arn], ["Task definition", task.definitionArn],
      ["Launch type", task.launchType], ["Task started", task.startedAt ? fmtTime(task.startedAt) : null],
      ["Started by", task.startedBy], ["Group", task.group]]),
    containers.length ? h("table", { class: "grid" },
      h("thead", {}, h("tr", {}, ["Container", "Image", "Id", "Runtime", "Privileged"].map((t) => h("th", {}, t)))),
      h("tbody", {}, containers.map((c) => h("tr", {},
        h("td", {}, orDash(c.name)), h("td", { class: "wrap" }, orDash(c.image)), h("td", { class: "mono" }, orDash(c.id)),
        h("td", {}, orDash(c.containerRuntime)),
        h("td", {}, c.securityContext?.privileged ? "yes" : "no"))))) : null);
}

function agentCard(f) {
  let info = null;
  try {
    info = JSON.parse(f.service?.additionalInfo?.value || "null");
  } catch {
    info = f.service?.additionalInfo?.value || null;
  }
  return section("Agent", "agent", info ? valueNode(info) : h("p", { class: "muted" }, "No agent details."));
}

function timelineCard(data) {
  const tl = data.timeline;
  const s = data.summary;
  const first = s.firstSeen ?? s.createdAt;
  const last = s.lastSeen ?? s.updatedAt;
  const rows = [];
  const marks = [[first, "finding first seen"], ...(last !== first ? [[last, "finding last seen"]] : [])];
  let m = 0;
  const mark = (t, label) => h("tr", { class: "mark" }, h("td", { class: "time" }, fmtTime(t)),
    h("td", { colspan: 5 }, h("span", { class: "tag hot" }, label), " ", s.title || s.type));
  for (const e of tl.events) {
    while (m < marks.length && marks[m][0] <= e.time) { rows.push(mark(...marks[m])); m += 1; }
    const json = h("tr", { class: "event-json", hidden: true },
      h("td", { colspan: 6 }, h("pre", { class: "json" }, JSON.stringify(e.document, null, 2))));
    const toggle = h("button", { type: "button", class: "link event-toggle", "aria-expanded": "false",
      onclick: () => {
        json.hidden = !json.hidden;
        toggle.setAttribute("aria-expanded", String(!json.hidden));
      } }, "event");
    rows.push(h("tr", { class: e.related ? "related" : null },
      h("td", { class: "time" }, fmtTime(e.time)),
      h("td", {}, h("span", { class: "kind" }, e.kind)),
      h("td", {}, orDash(e.containerName)),
      h("td", {}, orDash(e.processName), e.pid !== null && e.pid !== undefined ? h("div", { class: "sub" }, `pid ${e.pid}`) : null),
      h("td", { class: "mono wrap" }, orDash(e.executablePath), e.commandLine ? h("div", { class: "sub mono" }, e.commandLine) : null),
      h("td", {}, toggle)), json);
  }
  while (m < marks.length) { rows.push(mark(...marks[m])); m += 1; }
  const note = tl.from !== null
    ? `Runtime events of task ${orDash(s.taskId)} from ${fmtTime(tl.from)} to ${fmtTime(tl.to)}; `
      + "events of this finding's process and its ancestors are highlighted."
    : "The finding names no task.";
  return section("Timeline", "timeline",
    h("p", { class: "muted" }, note, tl.truncated ? " Only the first events are shown." : ""),
    tl.events.length ? null : h("p", { class: "muted" }, "The agent shipped no runtime events for this task in this window."),
    h("table", { class: "grid timeline" },
      h("thead", {}, h("tr", {}, ["Time", "Event", "Container", "Process", "Executable / command line", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows)));
}

const CRITERION_LABELS = {
  type: "Finding type",
  "resource.ecsClusterDetails.taskDetails.containers.image": "Container image",
  "service.runtimeDetails.process.executablePath": "Executable",
  "resource.ecsClusterDetails.name": "Cluster",
  "resource.ecsClusterDetails.taskDetails.family": "Task family",
};

function ruleName(s) {
  const tail = String(s.type).split("/").pop().replace(/[^A-Za-z0-9_.-]+/g, "-").slice(0, 40);
  return `suppress-${tail}-${Date.now().toString(36).slice(-5)}`.slice(0, 64);
}

function suppressionForm(data, onDone) {
  const s = data.summary;
  const prefill = data.suppression.findingCriteria.criterion;
  const options = data.suppression.options;
  const name = h("input", { name: "name", value: ruleName(s), required: true, pattern: "[A-Za-z0-9_.\\-]{3,64}", size: 40 });
  const description = h("input", { name: "description", value: `Suppress ${s.type}`, size: 60 });
  const archiveNow = h("input", { type: "checkbox", name: "archiveMatching", checked: true });
  const boxes = Object.entries(options).map(([attr, value]) => {
    const box = h("input", { type: "checkbox", name: "criterion", value: attr, checked: attr in prefill });
    return { attr, value, box, label: h("label", { class: "criterion" }, box, " ", CRITERION_LABELS[attr] || attr, " = ",
      h("code", {}, String(value))) };
  });
  const form = h("form", { class: "card suppression", id: "suppression-form", onsubmit: submit },
    h("h2", {}, "Create a suppression rule"),
    h("p", { class: "muted" }, "New findings matching every checked criterion are archived on arrival (a filter with action ARCHIVE)."),
    h("div", { class: "criteria" }, boxes.map((b) => b.label)),
    h("label", {}, "Rule name ", name),
    h("label", {}, "Description ", description),
    h("label", {}, archiveNow, " Also archive the current findings that match"),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Create rule"),
      h("button", { type: "button", onclick: () => form.remove() }, "Cancel")));

  async function submit(e) {
    e.preventDefault();
    const criterion = {};
    for (const b of boxes) if (b.box.checked) criterion[b.attr] = { eq: [b.value] };
    if (!Object.keys(criterion).length) {
      toast("Check at least one criterion", "warn");
      return;
    }
    try {
      const res = await postJSON("/console/api/suppression-rules", {
        detectorId: s.detectorId, name: name.value, description: description.value,
        findingCriteria: { criterion }, archiveMatching: archiveNow.checked,
      });
      toast(`Suppression rule ${res.name} created; ${res.archived} current finding${res.archived === 1 ? "" : "s"} archived`);
      form.remove();
      onDone();
    } catch (err) {
      toast(err.message, "error");
    }
  }
  return form;
}

async function copyJson(finding) {
  const text = JSON.stringify(finding, null, 2);
  try {
    await navigator.clipboard.writeText(text);
    toast("Finding copied as JSON");
  } catch {
    // no clipboard permission (plain HTTP on another host): select the JSON for a manual copy
    const raw = document.getElementById("raw-json");
    if (raw) {
      raw.open = true;
      const range = document.createRange();
      range.selectNodeContents(raw.querySelector("pre"));
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      toast("The JSON is selected: press Ctrl+C to copy", "warn");
    }
  }
}

export function detailView(root, args) {
  const [detectorId, id] = args;
  let disposed = false;

  async function load() {
    let data;
    try {
      data = await getJSON("/console/api/finding", { detectorId, id });
    } catch (err) {
      if (!disposed) replace(root, h("p", { class: "error" }, err.status === 404 ? "No such finding." : err.message),
        h("a", { href: "#/findings" }, "← Findings"));
      return;
    }
    if (!disposed) render(data);
  }

  function render(data) {
    const f = data.finding;
    const s = data.summary;
    const process = f.service?.runtimeDetails?.process;
    const context = f.service?.runtimeDetails?.context;
    const formSlot = h("div");
    const archiveButton = h("button", { type: "button", id: "archive-toggle", onclick: toggleArchive },
      s.archived ? "Unarchive" : "Archive");

    async function toggleArchive() {
      try {
        await postJSON("/console/api/findings/archive", { findings: [{ detectorId: s.detectorId, id: s.id }], archived: !s.archived });
        toast(s.archived ? "Finding unarchived" : "Finding archived");
        load();
      } catch (err) {
        toast(err.message, "error");
      }
    }

    replace(root,
      h("nav", { class: "crumbs" }, h("a", { href: "#/findings" }, "← Findings")),
      h("div", { class: "detail-head" },
        severityBadge(s.severity),
        h("h1", { id: "finding-title" }, orDash(f.title)),
        s.archived ? h("span", { class: "tag", id: "archived-tag" }, `archived${s.archivedBy ? ` by ${s.archivedBy}` : ""}`) : null),
      h("p", { class: "sentence", id: "finding-sentence" }, sentence(f, s)),
      h("p", { class: "description" }, orDash(f.description)),
      h("div", { class: "actions" },
        archiveButton,
        h("button", { type: "button", id: "suppress", onclick: () => replace(formSlot, suppressionForm(data, load)) }, "Create suppression rule…"),
        h("button", { type: "button", id: "copy-json", onclick: () => copyJson(f) }, "Copy as JSON"),
        s.taskArn && data.otherFindingsOfTask ? h("a", { class: "button", id: "task-findings",
          href: `#/findings?archived=all&task=${encodeURIComponent(s.taskArn)}` },
          `All ${data.otherFindingsOfTask + 1} findings of this task`) : null),
      formSlot,
      h("div", { class: "detail-grid" },
        section("Overview", "overview", kv([
          ["Type", f.type], ["Severity", f.severity], ["Count", f.service?.count],
          ["First seen", fmtTime(f.service?.eventFirstSeen)], ["Last seen", fmtTime(f.service?.eventLastSeen)],
          ["Created", fmtTime(f.createdAt)], ["Updated", fmtTime(f.updatedAt)], ["Received", fmtTime(data.receivedAt)],
          ["Account", f.accountId], ["Region", f.region], ["Finding id", f.id], ["Detector", s.detectorId]])),
        section("Process and lineage", "process", lineageTree(process),
          process ? h("details", {}, h("summary", {}, "All process fields"),
            kv(PROCESS_FIELDS.map(([k, label]) => [label, process[k]]))) : null),
        section(`Context of ${f.type}`, "context", context ? objectTable(context) : h("p", { class: "muted" }, "No context fields.")),
        actionCard(f.service?.action),
        intelCard(f.service?.evidence),
        resourceCard(f),
        agentCard(f)),
      timelineCard(data),
      h("details", { class: "card", id: "raw-json" }, h("summary", {}, "The finding as JSON"),
        h("pre", { class: "json" }, JSON.stringify(f, null, 2))));
    root.dataset.loaded = String(Date.now());
  }

  load();
  return { dispose() { disposed = true; } };
}

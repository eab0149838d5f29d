// Shared formatting: severities, times (UTC, unambiguous across regions), ids.

import { h } from "./dom.js";

export const SEVERITY_BANDS = [
  { label: "Low", gte: 1, lt: 4 },
  { label: "Medium", gte: 4, lt: 7 },
  { label: "High", gte: 7, lt: 9 },
  { label: "Critical", gte: 9, lt: 11 },
];

export function severityLabel(severity) {
  if (severity >= 9) return "Critical";
  if (severity >= 7) return "High";
  if (severity >= 4) return "Medium";
  return "Low";
}

export function severityBadge(severity) {
  const label = severityLabel(severity);
  return h("span", { class: `sev sev-${label.toLowerCase()}`, title: `severity ${severity}` },
    label, " ", Number(severity).toFixed(1));
}

function pad(n, width = 2) {
  return String(n).padStart(width, "0");
}

/** Epoch ms or an ISO string -> "2025-10-09 12:34:56Z". */
export function fmtTime(value) {
  if (value === null || value === undefined || value === "") return "—";
  const d = typeof value === "number" ? new Date(value) : new Date(String(value));
  if (Number.isNaN(d.getTime())) return String(value);
  return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} `
    + `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}Z`;
}

export function fmtShortTime(ms, bucketMs) {
  const d = new Date(ms);
  const day = `${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
  return bucketMs < 86400000 ? `${day} ${pad(d.getUTCHours())}:00` : day;
}

export function ago(ms) {
  if (ms === null || ms === undefined) return "";
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 60) return `${Math.max(s, 0)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function taskIdOf(arn) {
  if (!arn) return null;
  const parts = String(arn).split("/");
  return parts[parts.length - 1];
}

export function findingRoute(detectorId, id) {
  return `#/finding/${encodeURIComponent(detectorId)}/${encodeURIComponent(id)}`;
}

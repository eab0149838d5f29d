// Charts as inline SVG, drawn here (no library): stacked bars over time and sparklines.
// Colours come from classes in console.css; labels are text nodes.

import { s } from "./dom.js";

/** An even axis maximum at or above v, so that the middle tick is a whole number too. */
function niceMax(v) {
  if (v <= 10) return Math.max(2, Math.ceil(v / 2) * 2);
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 4, 5, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

/**
 * rows: [{start, <key>: n, ...}], keys: the stacked series bottom to top, label(start) -> axis text.
 */
export function stackedBars(rows, keys, label, { width = 800, height = 260, id = null } = {}) {
  const m = { top: 12, right: 12, bottom: 34, left: 44 };
  const iw = width - m.left - m.right;
  const ih = height - m.top - m.bottom;
  const totals = rows.map((r) => keys.reduce((sum, k) => sum + (r[k] || 0), 0));
  const max = niceMax(Math.max(1, ...totals));
  const y = (v) => m.top + ih - (v / max) * ih;
  const bw = iw / Math.max(rows.length, 1);
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", id,
    "aria-label": `findings per period, stacked by ${keys.join(", ")}` });

  for (const t of [0, max / 2, max]) {
    svg.append(
      s("line", { x1: m.left, x2: width - m.right, y1: y(t), y2: y(t), class: "gridline" }),
      s("text", { x: m.left - 6, y: y(t) + 4, class: "axis", "text-anchor": "end" }, String(Math.round(t))));
  }
  const every = Math.max(1, Math.ceil(rows.length / 10));
  rows.forEach((r, i) => {
    let acc = 0;
    const x = m.left + i * bw + bw * 0.12;
    const w = Math.max(bw * 0.76, 1);
    for (const k of keys) {
      const v = r[k] || 0;
      if (!v) continue;
      const top = y(acc + v);
      svg.append(s("rect", { x, y: top, width: w, height: y(acc) - top, class: `band band-${k.toLowerCase()}`,
        dataset: { series: k, count: v } }, s("title", {}, `${label(r.start)}: ${v} ${k}`)));
      acc += v;
    }
    if (i % every === 0) {
      svg.append(s("text", { x: x + w / 2, y: height - m.bottom + 16, class: "axis", "text-anchor": "middle" }, label(r.start)));
    }
  });
  svg.append(s("line", { x1: m.left, x2: width - m.right, y1: y(0), y2: y(0), class: "baseline" }));
  return svg;
}

/** A small bar sparkline of counts. */
export function sparkline(values, { width = 160, height = 28, title = "" } = {}) {
  const max = Math.max(1, ...values);
  const bw = width / Math.max(values.length, 1);
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "spark", role: "img", "aria-label": title });
  values.forEach((v, i) => {
    if (!v) return;
    const bh = Math.max((v / max) * (height - 2), 1.5);
    svg.append(s("rect", { x: i * bw + 0.5, y: height - bh, width: Math.max(bw - 1, 1), height: bh, class: "spark-bar" },
      s("title", {}, String(v))));
  });
  return svg;
}

// Building the page: every string becomes a text node or an attribute value, never markup.
// Finding fields are attacker-controlled (a process picks its own command line), so nothing here parses HTML.

const SVG_NS = "http://www.w3.org/2000/svg";

function setAttrs(node, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) {
      if (typeof value !== "function") throw new Error(`${name}: handlers are functions`);
      node.addEventListener(name.slice(2), value);
    } else if (name === "value" || name === "checked" || name === "selected") {
      node[name] = value;
    } else if (name === "dataset") {
      for (const [k, v] of Object.entries(value)) node.dataset[k] = String(v);
    } else {
      const text = value === true ? "" : String(value);
      // links are made by this code only: same-page routes or console paths, never a finding's text
      if ((name === "href" || name === "src" || name === "action") && !/^[#/]/.test(text)) {
        throw new Error(`${name}: only same-origin paths and routes`);
      }
      node.setAttribute(name, text);
    }
  }
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element: h("td", {class: "x"}, "text", otherNode). */
export function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  return append(node, children);
}

/** An SVG element (the charts). */
export function s(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  return append(node, children);
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export function replace(node, ...children) {
  return append(clear(node), children);
}

/** "—" for missing values, the value as text otherwise. */
export function orDash(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}

let toastTimer = null;
export function toast(message, kind = "info") {
  const box = document.getElementById("toast");
  if (!box) return;
  box.className = `toast ${kind}`;
  box.textContent = message;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.className = "toast"; box.textContent = ""; }, 6000);
}

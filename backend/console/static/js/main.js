// The console's single page: the session, the navigation, and a router over location.hash.

import { getJSON, postJSON, setCsrfToken } from "./api.js";
import { h, replace, toast } from "./dom.js";
import { coverageView } from "./coverage.js";
import { detailView } from "./detail.js";
import { findingsView } from "./findings.js";
import { summaryView } from "./summary.js";

const VIEWS = {
  findings: (root, params) => findingsView(root, params),
  finding: (root, params, args) => detailView(root, args),
  summary: (root, params) => summaryView(root, params),
  coverage: (root) => coverageView(root),
};

let current = null;

function parseHash() {
  const raw = window.location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map((p) => decodeURIComponent(p));
  return { name: parts[0] || "findings", args: parts.slice(1), params: new URLSearchParams(query) };
}

function route() {
  const { name, args, params } = parseHash();
  if (current) current.dispose();
  const view = document.getElementById("view");
  const make = VIEWS[name];
  view.dataset.view = make ? name : "missing";
  delete view.dataset.loaded;
  // the previous page must not linger (and take clicks) while the next one loads its data
  replace(view, h("p", { class: "muted" }, "Loading…"));
  for (const a of document.querySelectorAll("nav.main a")) {
    a.classList.toggle("active", a.dataset.nav === (name === "finding" ? "findings" : name));
  }
  if (!make) {
    replace(view, h("p", { class: "error" }, "No such page."), h("a", { href: "#/findings" }, "← Findings"));
    current = null;
    return;
  }
  current = make(view, params, args);
  window.scrollTo(0, 0);
}

async function signOut() {
  try {
    await postJSON("/console/logout", {});
  } catch (err) {
    toast(err.message, "error");
  }
  window.location.assign("/console/login");
}

async function start() {
  let session;
  try {
    session = await getJSON("/console/api/session");
  } catch (err) {
    replace(document.getElementById("view"), h("p", { class: "error" }, err.message));
    return;
  }
  setCsrfToken(session.csrfToken);
  const who = document.getElementById("who");
  const accounts = session.accounts.includes("*") ? "all accounts" : `accounts ${session.accounts.join(", ")}`;
  replace(who, h("span", { class: "user" }, session.username), h("span", { class: "muted" }, ` · ${accounts}`));
  document.getElementById("signout").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  route();
}

start();

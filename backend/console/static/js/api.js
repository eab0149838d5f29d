// The console's JSON API: same origin, the session cookie, and the session's CSRF token on every POST.

let csrfToken = null;

export function setCsrfToken(token) {
  csrfToken = token;
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function url(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v === null || v === undefined || v === "") continue;
    for (const item of Array.isArray(v) ? v : [v]) q.append(k, String(item));
  }
  const text = q.toString();
  return text ? `${path}?${text}` : path;
}

async function handle(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (response.status === 401) {
    window.location.assign("/console/login");
    throw new ApiError(401, "signed out");
  }
  if (!response.ok) {
    throw new ApiError(response.status, (body && body.error) || `HTTP ${response.status}`);
  }
  return body;
}

export async function getJSON(path, params) {
  const response = await fetch(url(path, params), {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  });
  return handle(response);
}

export async function postJSON(path, body) {
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRF-Token": csrfToken || "" },
    body: JSON.stringify(body),
  });
  return handle(response);
}

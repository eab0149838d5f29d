"""The console's HTTP side: sign-in pages, the single page's shell, its JSON API, security headers.

Everything lives under ``/console`` on the API's own origin. The page is static (HTML, ES modules, CSS from
``static/``) and gets its data from ``/console/api/...``, authenticated by the session cookie; nothing from a
finding is ever written into HTML by the server. State-changing requests (POST) must carry the session's CSRF
token in ``X-CSRF-Token``, a JSON body, and, when the browser sends Origin or Referer, this origin.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from multidict import MultiDict
from sqlalchemy.ext.asyncio import AsyncSession

from backend.console import queries
from backend.console.operators import MAX_PASSWORD_CHARS, any_operator, dummy_hash, password_hash_of, verify_password
from backend.console.sessions import (
    COOKIE_NAME,
    COOKIE_PATH,
    SESSION_TTL_MS,
    LoginThrottle,
    SignedIn,
    close_session,
    load_session,
    open_session,
)
from backend.criteria import parse_finding_criteria
from backend.errors import ApiError
from backend.tenancy import now_ms

log = logging.getLogger("backend.console")

STATIC_DIR = Path(__file__).resolve().with_name("static")
THROTTLE = web.AppKey("console_throttle", LoginThrottle)

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
MAX_API_BODY = 64 * 1024
MAX_LOGIN_BODY = 8 * 1024
MAX_ARCHIVE_ITEMS = 200
DEFAULT_TIMELINE_MINUTES = 15


def in_console(path: str) -> bool:
    return path == COOKIE_PATH or path.startswith(COOKIE_PATH + "/")


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if not in_console(request.path):
        return
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if "Cache-Control" not in response.headers:
        static = request.path.startswith(COOKIE_PATH + "/static/")
        # the page and its data are the operator's: no shared or back-button cache of them
        response.headers["Cache-Control"] = "no-cache" if static else "no-store"


# -- the request's origin and transport -------------------------------------------------------------------------


def is_https(request: web.Request) -> bool:
    from backend.app import SETTINGS

    if request.app[SETTINGS].tls_cert:
        return True
    # a TLS-terminating proxy in front: the cookie must not then travel over plain HTTP either
    return request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower() == "https"


def same_origin(request: web.Request) -> bool:
    """Origin (or else Referer), when the browser sends one, names this host; absent, CSRF tokens decide."""
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if not source:
        return True
    if source == "null":  # sandboxed frames, data: and file: pages, some redirects: never this console
        return False
    parts = urlsplit(source)
    hosts = {request.host.lower()}
    forwarded = request.headers.get("X-Forwarded-Host")
    if forwarded:
        hosts.add(forwarded.split(",")[0].strip().lower())
    scheme = "https" if is_https(request) else request.scheme
    return parts.netloc.lower() in hosts and parts.scheme in (scheme, request.scheme)


def set_session_cookie(request: web.Request, response: web.StreamResponse, secret: str) -> None:
    response.set_cookie(
        COOKIE_NAME,
        secret,
        path=COOKIE_PATH,
        max_age=SESSION_TTL_MS // 1000,
        httponly=True,
        samesite="Strict",
        secure=is_https(request),
    )


def clear_session_cookie(request: web.Request, response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE_NAME, path=COOKIE_PATH, secure=is_https(request), samesite="Strict")


# -- pages --------------------------------------------------------------------------------------------------


def _page(title: str, body: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A small server-made page. ``body`` is HTML built here from constants and html.escape'd values only."""
    text = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        '<link rel="icon" href="/console/static/favicon.svg" type="image/svg+xml">'
        '<link rel="stylesheet" href="/console/static/console.css"></head>'
        f'<body class="signin"><main class="signin-box"><h1>Runtime Monitor</h1>{body}</main></body></html>\n'
    )
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=headers)


NO_OPERATOR_PAGE = (
    "<p>No operator can sign in yet: the console stays closed until one is created on the backend.</p>"
    "<p>Create one with:</p>"
    "<pre>runtime-backend operator create --username NAME --accounts '*'</pre>"
    "<p>(the command asks for the password; <code>--accounts</code> takes account ids, comma-separated, to limit "
    "what the operator sees). Then reload this page.</p>"
)


def login_page(
    message: str = "", username: str = "", status: int = 200, retry_after: float | None = None
) -> web.Response:
    note = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    body = (
        f'{note}<form method="post" action="/console/login" class="signin-form">'
        '<label>Username <input name="username" autocomplete="username" required autofocus '
        f'value="{html.escape(username, quote=True)}"></label>'
        '<label>Password <input name="password" type="password" autocomplete="current-password" required>'
        '</label><button type="submit">Sign in</button></form>'
    )
    headers = {"Retry-After": str(int(retry_after) + 1)} if retry_after is not None else None
    return _page("Sign in · Runtime Monitor", body, status, headers)


def no_operator_page() -> web.Response:
    return _page("Set up · Runtime Monitor", NO_OPERATOR_PAGE, status=403)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


async def _operators_exist(request: web.Request) -> bool:
    from backend.app import DB

    async with request.app[DB].sessions() as session:
        return await any_operator(session)


async def get_login(request: web.Request) -> web.StreamResponse:
    if not await _operators_exist(request):
        return no_operator_page()
    return login_page()


async def post_login(request: web.Request) -> web.StreamResponse:
    from backend.app import DB

    if not same_origin(request):
        return _page("Refused", '<p class="error">Sign-in from another site refused.</p>', status=403)
    if request.content_length is None or request.content_length > MAX_LOGIN_BODY:
        return login_page("The sign-in form is too large.", status=413)
    form = await request.post()
    username = str(form.get("username") or "").strip()[:64]
    password = str(form.get("password") or "")
    address = request.remote or "?"
    throttle = request.app[THROTTLE]
    wait = throttle.retry_after(username, address)
    if wait is not None:
        log.warning("console sign-in throttled", extra={"username": username, "peer": address})
        return login_page(
            f"Too many failed sign-ins: try again in {int(wait // 60) + 1} minutes.",
            username,
            status=429,
            retry_after=wait,
        )
    async with request.app[DB].sessions() as session:
        if not await any_operator(session):
            return no_operator_page()
        stored = await password_hash_of(session, username) if username else None
    ok = False
    if username and password and len(password) <= MAX_PASSWORD_CHARS:
        # scrypt takes ~50 ms of CPU: off the event loop, and for unknown users too (same time either way)
        matched = await asyncio.to_thread(verify_password, password, stored or dummy_hash())
        ok = matched and stored is not None
    if not ok:
        throttle.failed(username, address)
        log.warning("console sign-in failed", extra={"username": username, "peer": address})
        return login_page("Wrong username or password.", username, status=401)
    throttle.succeeded(username)
    async with request.app[DB].sessions() as session, session.begin():
        secret = await open_session(session, username)
    log.info("console sign-in", extra={"username": username, "peer": address})
    response = _redirect(COOKIE_PATH + "/")
    set_session_cookie(request, response, secret)
    return response


async def get_index(request: web.Request) -> web.StreamResponse:
    from backend.app import DB

    async with request.app[DB].sessions() as session, session.begin():
        if not await any_operator(session):
            return no_operator_page()
        user = await load_session(session, request.cookies.get(COOKIE_NAME))
    if user is None:
        response = _redirect(COOKIE_PATH + "/login")
        if request.cookies.get(COOKIE_NAME):
            clear_session_cookie(request, response)
        return response
    page = web.FileResponse(STATIC_DIR / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})
    if user.renewed:
        set_session_cookie(request, page, request.cookies[COOKIE_NAME])
    return page


async def post_logout(request: web.Request) -> web.StreamResponse:
    from backend.app import DB

    if not same_origin(request):
        return _json({"error": "cross-origin request refused"}, 403)
    secret = request.cookies.get(COOKIE_NAME)
    async with request.app[DB].sessions() as session, session.begin():
        user = await load_session(session, secret)
        if user is not None:
            if not _csrf_ok(request, user):
                return _json({"error": "missing or wrong X-CSRF-Token"}, 403)
            await close_session(session, secret)
    response = _json({"signedOut": True})
    clear_session_cookie(request, response)
    return response


# -- the JSON API -----------------------------------------------------------------------------------------------


class ConsoleError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ConsoleRequest:
    request: web.Request
    session: AsyncSession
    user: SignedIn
    scope: queries.Scope
    body: dict[str, Any]

    @property
    def query(self) -> MultiDict[str]:
        return MultiDict(self.request.query)


ApiHandler = Callable[[ConsoleRequest], Awaitable[Any]]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _csrf_ok(request: web.Request, user: SignedIn) -> bool:
    sent = request.headers.get("X-CSRF-Token", "")
    return bool(sent) and hmac.compare_digest(sent.encode(), user.csrf_token.encode())


def api(handler: ApiHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Session authentication, CSRF checks on POST, the operator's scope, and errors as JSON."""

    async def handle(request: web.Request) -> web.StreamResponse:
        from backend.app import DB

        changes_state = request.method not in ("GET", "HEAD")
        try:
            body: dict[str, Any] = {}
            if changes_state:
                if not same_origin(request):
                    raise ConsoleError(403, "cross-origin request refused")
                if request.content_type != "application/json":
                    raise ConsoleError(415, "send JSON (Content-Type: application/json)")
                if request.content_length is not None and request.content_length > MAX_API_BODY:
                    raise ConsoleError(413, f"the body is larger than {MAX_API_BODY} bytes")
                raw = await request.content.read(MAX_API_BODY + 1)
                if len(raw) > MAX_API_BODY:
                    raise ConsoleError(413, f"the body is larger than {MAX_API_BODY} bytes")
                try:
                    parsed = orjson.loads(raw) if raw.strip() else {}
                except orjson.JSONDecodeError:
                    raise ConsoleError(400, "the body is not valid JSON") from None
                if not isinstance(parsed, dict):
                    raise ConsoleError(400, "the body must be a JSON object")
                body = parsed
            out: Any = None
            async with request.app[DB].sessions() as session, session.begin():
                # no exception for a missing session or token: forgetting an expired session must commit
                user = await load_session(session, request.cookies.get(COOKIE_NAME))
                csrf_ok = user is not None and (not changes_state or _csrf_ok(request, user))
                if user is not None and csrf_ok:
                    scope = await queries.scope_for(session, user.accounts)
                    out = await handler(ConsoleRequest(request, session, user, scope, body))
            if user is None:
                raise ConsoleError(401, "not signed in (or the session ended): sign in again")
            if not csrf_ok:
                raise ConsoleError(403, "missing or wrong X-CSRF-Token")
            response = _json(out)
            if user.renewed:
                set_session_cookie(request, response, request.cookies[COOKIE_NAME])
            return response
        except ConsoleError as exc:
            response = _json({"error": exc.message}, exc.status)
            if exc.status == 401:
                clear_session_cookie(request, response)
            return response
        except ApiError as exc:  # the criteria parser's messages name the exact field
            return _json({"error": exc.message}, exc.status)
        except Exception:
            log.exception("console request failed", extra={"path": request.path})
            return _json({"error": "internal error; the backend's log has the details"}, 500)

    return handle


@api
async def api_session(ctx: ConsoleRequest) -> dict[str, Any]:
    return {
        "username": ctx.user.username,
        "accounts": ctx.user.accounts,
        "csrfToken": ctx.user.csrf_token,
        "expiresAt": ctx.user.expires_at,
        "detectors": [
            {"detectorId": d.id, "accountId": d.account_id, "region": d.region}
            for d in sorted(ctx.scope.detectors.values(), key=lambda d: (d.account_id, d.region))
        ],
    }


@api
async def api_facets(ctx: ConsoleRequest) -> dict[str, Any]:
    return await queries.facets(ctx.session, ctx.scope)


@api
async def api_findings(ctx: ConsoleRequest) -> dict[str, Any]:
    cursor = now_ms()  # taken before the query: what arrives while it runs is a change for the next poll
    out = await queries.list_findings(ctx.session, ctx.scope, ctx.query)
    out["cursor"] = cursor
    return out


@api
async def api_finding_changes(ctx: ConsoleRequest) -> dict[str, Any]:
    return await queries.finding_changes(ctx.session, ctx.scope, ctx.query, now_ms())


@api
async def api_finding(ctx: ConsoleRequest) -> dict[str, Any]:
    detector_id = ctx.request.query.get("detectorId", "")
    finding_id = ctx.request.query.get("id", "")
    row = await queries.get_finding_row(ctx.session, ctx.scope, detector_id, finding_id)
    if row is None:  # another account's finding is as absent as a missing one
        raise ConsoleError(404, "no such finding")
    minutes = queries._int_param(ctx.query, "windowMinutes", lo=1, hi=24 * 60, default=DEFAULT_TIMELINE_MINUTES)
    assert minutes is not None
    return await queries.finding_detail(ctx.session, ctx.scope, row, minutes * 60_000)


def _finding_refs(body: dict[str, Any]) -> list[tuple[str, str]]:
    items = body.get("findings")
    if not isinstance(items, list) or not items or len(items) > MAX_ARCHIVE_ITEMS:
        raise ConsoleError(400, f"findings: a list of 1 to {MAX_ARCHIVE_ITEMS} {{detectorId, id}} objects")
    refs = []
    for item in items:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("detectorId"), str)
            and isinstance(item.get("id"), str)
            and 0 < len(item["id"]) <= 300
        ):
            raise ConsoleError(400, "findings: each item is {detectorId, id}")
        refs.append((item["detectorId"], item["id"]))
    return refs


@api
async def api_archive(ctx: ConsoleRequest) -> dict[str, Any]:
    archived = ctx.body.get("archived")
    if not isinstance(archived, bool):
        raise ConsoleError(400, "archived: true or false")
    refs = _finding_refs(ctx.body)
    if any(not ctx.scope.allows(d) for d, _ in refs):
        raise ConsoleError(404, "no such finding")
    n = await queries.set_archived(ctx.session, ctx.scope, refs, archived, f"user:{ctx.user.username}")
    log.info("console archive", extra={"username": ctx.user.username, "archived": archived, "findings": len(refs)})
    return {"updated": n}


@api
async def api_create_suppression_rule(ctx: ConsoleRequest) -> dict[str, Any]:
    """CreateFilter with action ARCHIVE, through the API's own operation (same validation, same row)."""
    from backend import findings_api
    from backend.api import ApiRequest
    from backend.models import Detector
    from backend.sigv4 import Principal

    detector_id = ctx.body.get("detectorId")
    if not isinstance(detector_id, str) or not ctx.scope.allows(detector_id):
        raise ConsoleError(404, "no such detector")
    detector = await ctx.session.get(Detector, detector_id)
    if detector is None:
        raise ConsoleError(404, "no such detector")
    archive_existing = ctx.body.get("archiveMatching", False)
    if not isinstance(archive_existing, bool):
        raise ConsoleError(400, "archiveMatching: true or false")
    filter_body = {
        "name": ctx.body.get("name"),
        "description": ctx.body.get("description") or f"suppression rule created in the console by {ctx.user.username}",
        "action": "ARCHIVE",
        "findingCriteria": ctx.body.get("findingCriteria"),
    }
    if "rank" in ctx.body:
        filter_body["rank"] = ctx.body["rank"]
    req = ApiRequest(
        operation="CreateFilter",
        principal=Principal(f"console:{ctx.user.username}", detector.account_id, detector.region),
        session=ctx.session,
        body=filter_body,
        params={"DetectorId": detector.id},
        query=MultiDict(),
        app=ctx.request.app,
        detector=detector,
    )
    await findings_api.create_filter(req)
    name = str(filter_body["name"])  # create_filter validated it
    archived = 0
    if archive_existing:
        conditions = parse_finding_criteria(filter_body["findingCriteria"], where="findingCriteria")
        archived = await queries.archive_matching(ctx.session, detector.id, conditions, name)
    log.info(
        "console suppression rule",
        extra={"username": ctx.user.username, "filter": name, "detectorId": detector.id, "archived": archived},
    )
    return {"name": name, "detectorId": detector.id, "archived": archived}


@api
async def api_coverage(ctx: ConsoleRequest) -> dict[str, Any]:
    from backend.app import SETTINGS

    misses = ctx.request.app[SETTINGS].heartbeat_misses
    return await queries.coverage_view(ctx.session, ctx.scope, now_ms(), misses)


@api
async def api_exports(ctx: ConsoleRequest) -> dict[str, Any]:
    """Each exporter's health (backend.exports). Exporters carry every account's findings, and their errors and
    counts are not one account's: only operators of every account see them."""
    if ctx.user.accounts != ["*"]:
        return {"visible": False, "exporters": []}
    try:
        from backend.exports import health
    except ModuleNotFoundError:  # a build without exporters
        return {"visible": True, "exporters": []}
    return {"visible": True, "exporters": health(ctx.request.app)}


@api
async def api_summary(ctx: ConsoleRequest) -> dict[str, Any]:
    return await queries.summary(ctx.session, ctx.scope, ctx.query, now_ms())


async def api_not_found(request: web.Request) -> web.StreamResponse:
    return _json({"error": "no such console API"}, 404)


def add_routes(app: web.Application) -> None:
    app[THROTTLE] = LoginThrottle()
    app.on_response_prepare.append(security_headers)
    r = app.router
    r.add_get("/console", get_index)
    r.add_get("/console/", get_index)
    r.add_get("/console/login", get_login)
    r.add_post("/console/login", post_login)
    r.add_post("/console/logout", post_logout)
    r.add_get("/console/api/session", api_session)
    r.add_get("/console/api/facets", api_facets)
    r.add_get("/console/api/findings", api_findings)
    r.add_get("/console/api/findings/changes", api_finding_changes)
    r.add_get("/console/api/finding", api_finding)
    r.add_post("/console/api/findings/archive", api_archive)
    r.add_post("/console/api/suppression-rules", api_create_suppression_rule)
    r.add_get("/console/api/coverage", api_coverage)
    r.add_get("/console/api/summary", api_summary)
    r.add_get("/console/api/exports", api_exports)
    r.add_route("*", "/console/api/{rest:.*}", api_not_found)
    r.add_static("/console/static", STATIC_DIR, follow_symlinks=False)

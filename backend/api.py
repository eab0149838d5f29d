"""The GuardDuty-compatible REST API: routing, SigV4, the detector check, errors, pagination.

Each operation is one ``@operation(method, path, name)`` coroutine taking an :class:`ApiRequest` and returning
the response body in GuardDuty's wire form (restJson1, camelCase member names of botocore's ``guardduty``
model), so ``boto3.client("guardduty", endpoint_url=...)`` and ``aws guardduty --endpoint-url`` work
unchanged. Modules that add operations (findings, filters, coverage, intel sets) register them here at import;
``backend.app`` imports them all.
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping
from sqlalchemy.ext.asyncio import AsyncSession

from backend.errors import ApiError, BadRequest, InternalServerError, ResourceNotFound
from backend.models import Detector
from backend.sigv4 import Principal

log = logging.getLogger("backend.api")


@dataclass
class ApiRequest:
    """One authenticated API call, inside one database transaction."""

    operation: str
    principal: Principal
    session: AsyncSession
    body: dict[str, Any]
    params: dict[str, str]
    query: MultiMapping[str]
    app: web.Application
    detector: Detector | None = None
    # what the operation's prepare step returned (see ``operation``)
    prepared: Any = None

    @property
    def detector_id(self) -> str:
        assert self.detector is not None, f"{self.operation} has no {{DetectorId}} in its path"
        return self.detector.id


Handler = Callable[[ApiRequest], Awaitable[dict[str, Any] | None]]


Prepare = Callable[[ApiRequest], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    operation: str
    handler: Handler
    prepare: Prepare | None = None


ROUTES: list[Route] = []


def operation(method: str, path: str, name: str, *, prepare: Prepare | None = None) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the operation ``name``.

    ``prepare`` runs first, outside the operation's write transaction, for slow work (fetching a list from a
    URL) that must not hold the database: on SQLite one writer at a time, ingest included. Its session may
    read and must end its transaction (``await req.session.rollback()``) before waiting on anything slow;
    what it returns is ``req.prepared`` in the handler.
    """

    def register(fn: Handler) -> Handler:
        ROUTES.append(Route(method, path, name, fn, prepare))
        return fn

    return register


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


# -- the shared parts of operations ----------------------------------------------------------------------------


def page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"o": offset})).decode().rstrip("=")


def parse_page(req: ApiRequest, *, default: int = 50, maximum: int = 50, in_query: bool = False) -> tuple[int, int]:
    """(offset, limit) from maxResults/nextToken, in the body or (GET operations) the query string."""
    src: Any = req.query if in_query else req.body
    raw_max = src.get("maxResults")
    raw_token = src.get("nextToken")
    limit = default
    if raw_max is not None and raw_max != "":
        try:
            limit = int(raw_max)
        except (TypeError, ValueError):
            raise BadRequest(f"maxResults: expected an integer from 1 to {maximum}, got {raw_max!r}") from None
        if not 1 <= limit <= maximum:
            raise BadRequest(f"maxResults: must be from 1 to {maximum}, got {limit}")
    offset = 0
    if raw_token:
        if not isinstance(raw_token, str) or len(raw_token) > 512:
            raise BadRequest("nextToken: not a token this API returned")
        try:
            pad = "=" * (-len(raw_token) % 4)
            offset = int(orjson.loads(base64.urlsafe_b64decode(raw_token + pad))["o"])
        except (binascii.Error, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            raise BadRequest("nextToken: not a token this API returned") from None
        if offset < 0:
            raise BadRequest("nextToken: not a token this API returned")
    return offset, limit


def next_token(offset: int, limit: int, got: int, total: int | None = None) -> str | None:
    """The token for the page after this one, or None at the end (``got`` is the rows of this page + 1 probe)."""
    if total is not None:
        return page_token(offset + limit) if offset + limit < total else None
    return page_token(offset + limit) if got > limit else None


def str_field(body: dict[str, Any], name: str, *, required: bool = True, max_len: int = 512) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise BadRequest(f"{name}: required")
        return None
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise BadRequest(f"{name}: expected a string of 1 to {max_len} characters")
    return v


def id_list(body: dict[str, Any], name: str, *, maximum: int = 50) -> list[str]:
    v = body.get(name)
    if not isinstance(v, list) or not all(isinstance(x, str) and 0 < len(x) <= 300 for x in v):
        raise BadRequest(f"{name}: expected a list of ids")
    if len(v) > maximum:
        raise BadRequest(f"{name}: at most {maximum} ids per request, got {len(v)}")
    return v


# -- the HTTP side ----------------------------------------------------------------------------------------------


def make_handler(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        response = await _handle(request, request_id)
        # botocore reports it as ResponseMetadata.RequestId; the log line of a failure carries the same id
        response.headers["x-amzn-RequestId"] = request_id
        return response

    async def _handle(request: web.Request, request_id: str) -> web.StreamResponse:
        from backend.app import DB, SETTINGS, VERIFIER

        try:
            settings = request.app[SETTINGS]
            body_bytes = await read_limited(request, settings.max_api_body_bytes)
            principal = await request.app[VERIFIER].verify(
                request.method, request.rel_url.raw_path, request.rel_url.raw_query_string, request.headers, body_bytes
            )
            body: dict[str, Any] = {}
            if body_bytes.strip():
                try:
                    parsed = orjson.loads(body_bytes)
                except orjson.JSONDecodeError as exc:
                    raise BadRequest(f"the request body is not valid JSON: {exc}") from None
                if not isinstance(parsed, dict):
                    raise BadRequest("the request body must be a JSON object")
                body = parsed
            prepared = None
            if route.prepare is not None:
                async with request.app[DB].sessions() as session:
                    req = ApiRequest(
                        route.operation, principal, session, body, dict(request.match_info), request.query, request.app
                    )
                    await _own_detector(req)
                    prepared = await route.prepare(req)
            async with request.app[DB].sessions() as session, session.begin():
                req = ApiRequest(
                    route.operation, principal, session, body, dict(request.match_info), request.query, request.app
                )
                req.prepared = prepared
                await _own_detector(req)
                out = await route.handler(req)
            return json_response(out or {})
        except ApiError as exc:
            if exc.status >= 500:
                log.error(
                    "api error",
                    extra={"operation": route.operation, "error": exc.message, "requestId": request_id},
                )
            return exc.response()
        except web.HTTPException:
            raise
        except Exception:
            log.exception("api operation failed", extra={"operation": route.operation, "requestId": request_id})
            return InternalServerError("internal error; the backend's log has the details").response()

    return handle


async def _own_detector(req: ApiRequest) -> None:
    """A {DetectorId} in the path must be the caller's account's detector in the signed region."""
    did = req.params.get("DetectorId")
    if did is not None:
        det = await req.session.get(Detector, did)
        if det is None or det.account_id != req.principal.account_id or det.region != req.principal.region:
            raise ResourceNotFound()
        req.detector = det


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The body, refusing (413) anything larger than ``limit`` before reading it all."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class PayloadTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__("BadRequestException", f"the request body is larger than {limit} bytes", 413)


def add_routes(app: web.Application) -> None:
    # importing the modules registers their operations
    from backend import coverage, detectors_api, findings_api, intel_sets  # noqa: F401

    seen: set[tuple[str, str]] = set()
    for route in ROUTES:
        if (route.method, route.path) in seen:
            continue
        seen.add((route.method, route.path))
        app.router.add_route(route.method, route.path, make_handler(route), name=route.operation)

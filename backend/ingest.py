"""The agent side of the API: finding batches, heartbeats, configuration (see README, "The agent API").

Every request carries a bearer token bound to one account, region and cluster; a batch that claims anything
else is refused whole (403). A batch is validated whole (pydantic, ``detectors.finding.Finding``) and stored in
one transaction: a rejected batch stores nothing. Bodies are bounded as sent and, for gzip, as decompressed
(a small bomb cannot make the backend inflate gigabytes).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backend.config import BackendSettings
from backend.findings import parse_time_ms, upsert_findings
from backend.tenancy import TokenIdentity, authenticate_token, now_ms
from detectors.finding import Finding

log = logging.getLogger("backend.ingest")


class AgentError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra

    def response(self) -> web.Response:
        return web.Response(
            body=orjson.dumps({"error": self.message, **self.extra}),
            status=self.status,
            content_type="application/json",
        )


class FindingBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batchId: str = Field(min_length=1, max_length=64)
    agentId: str = Field(min_length=1, max_length=128)
    findings: list[dict[str, Any]]


def _loc(parts: tuple[Any, ...], prefix: str = "") -> str:
    out = prefix
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def validation_error(exc: ValidationError, prefix: str = "") -> AgentError:
    err = exc.errors()[0]
    field = _loc(tuple(err["loc"]), prefix)
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return AgentError(400, f"{field}: {err['msg']}{more}", field=field)


async def read_body(request: web.Request, settings: BackendSettings) -> bytes:
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise AgentError(
            413, f"body larger than {limit} bytes", maxBytes=limit, maxFindings=settings.max_batch_findings
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise AgentError(
                413, f"body larger than {limit} bytes", maxBytes=limit, maxFindings=settings.max_batch_findings
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    encoding = request.headers.get("Content-Encoding", "identity").lower()
    if encoding in ("", "identity"):
        return raw
    if encoding != "gzip":
        raise AgentError(415, f"Content-Encoding {encoding!r} is not supported (use gzip or none)")
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(raw, settings.max_decompressed_bytes + 1)
    except zlib.error as exc:
        raise AgentError(400, f"the gzip body is corrupt: {exc}") from None
    if len(out) > settings.max_decompressed_bytes or inflater.unconsumed_tail:
        raise AgentError(
            413,
            f"body larger than {settings.max_decompressed_bytes} bytes once decompressed",
            maxBytes=limit,
            maxFindings=settings.max_batch_findings,
        )
    if not inflater.eof:
        raise AgentError(400, "the gzip body is truncated")
    return out


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise AgentError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AgentError(400, "the body must be a JSON object")
    return data


def check_claims(ident: TokenIdentity, index: int, doc: dict[str, Any]) -> None:
    """A token speaks for one account, region and cluster: a finding claiming another is refused."""
    where = f"findings[{index}]"
    if doc.get("accountId") != ident.account_id:
        raise AgentError(403, f"{where}.accountId: this token may only send findings of account {ident.account_id}")
    if doc.get("region") != ident.region:
        raise AgentError(403, f"{where}.region: this token may only send findings of region {ident.region}")
    cluster = ((doc.get("resource") or {}).get("ecsClusterDetails") or {}).get("name")
    if cluster != ident.cluster_name:
        raise AgentError(
            403,
            f"{where}.resource.ecsClusterDetails.name: this token may only send findings of cluster "
            f"{ident.cluster_name}",
        )


def validate_batch(data: dict[str, Any], ident: TokenIdentity, settings: BackendSettings) -> FindingBatch:
    try:
        batch = FindingBatch.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if len(batch.findings) > settings.max_batch_findings:
        raise AgentError(
            413,
            f"findings: at most {settings.max_batch_findings} per batch, got {len(batch.findings)}",
            maxBytes=settings.max_body_bytes,
            maxFindings=settings.max_batch_findings,
        )
    for i, doc in enumerate(batch.findings):
        try:
            Finding.model_validate(doc)
        except ValidationError as exc:
            raise validation_error(exc, f"findings[{i}]") from None
        for key in ("createdAt", "updatedAt"):
            if parse_time_ms(doc.get(key)) is None:
                raise AgentError(400, f"findings[{i}].{key}: not an ISO 8601 time", field=f"findings[{i}].{key}")
        check_claims(ident, i, doc)
    return batch


AgentHandler = Callable[[web.Request, TokenIdentity], Awaitable[web.StreamResponse]]


def agent_route(fn: AgentHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Bearer authentication and error shaping for the agent routes."""

    async def handle(request: web.Request) -> web.StreamResponse:
        from backend.app import DB

        try:
            auth = request.headers.get("Authorization", "")
            scheme, _, secret = auth.partition(" ")
            if scheme.lower() != "bearer" or not secret.strip():
                raise AgentError(401, "missing bearer token (Authorization: Bearer <agent token>)")
            async with request.app[DB].sessions() as session, session.begin():
                ident = await authenticate_token(session, secret.strip())
            if ident is None:
                raise AgentError(401, "unknown or revoked agent token")
            return await fn(request, ident)
        except AgentError as exc:
            if exc.status in (401, 403):
                log.warning(
                    "agent request refused",
                    extra={"path": request.path, "status": exc.status, "error": exc.message, "peer": request.remote},
                )
            return exc.response()
        except Exception:
            log.exception("agent request failed", extra={"path": request.path})
            return AgentError(500, "internal error; the backend's log has the details").response()

    return handle


@agent_route
async def post_findings(request: web.Request, ident: TokenIdentity) -> web.StreamResponse:
    from backend.app import DB, SETTINGS, on_findings_stored

    settings = request.app[SETTINGS]
    batch = validate_batch(parse_json(await read_body(request, settings)), ident, settings)
    async with request.app[DB].sessions() as session, session.begin():
        result = await upsert_findings(session, ident.detector_id, batch.findings, now_ms())
    await on_findings_stored(request.app, ident, result)
    log.info(
        "batch stored",
        extra={
            "batchId": batch.batchId,
            "agentId": batch.agentId,
            "cluster": ident.cluster_name,
            "new": result.new,
            "updated": result.updated,
            "unchanged": result.unchanged,
            "suppressed": result.archived_by_filter,
        },
    )
    body = {
        "accepted": len(batch.findings),
        "new": result.new,
        "updated": result.updated,
        "unchanged": result.unchanged,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


@agent_route
async def post_heartbeat(request: web.Request, ident: TokenIdentity) -> web.StreamResponse:
    from backend.agent_config import current_etag
    from backend.app import DB, SETTINGS
    from backend.coverage import record_heartbeat

    settings = request.app[SETTINGS]
    data = parse_json(await read_body(request, settings))
    async with request.app[DB].sessions() as session, session.begin():
        await record_heartbeat(session, ident, data)
        etag = await current_etag(session, ident)
    body = {"configEtag": etag, "heartbeatIntervalS": int(data.get("intervalS") or 60)}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


@agent_route
async def get_config(request: web.Request, ident: TokenIdentity) -> web.StreamResponse:
    from backend.agent_config import config_for
    from backend.app import DB

    async with request.app[DB].sessions() as session, session.begin():
        etag, body = await config_for(session, ident)
    quoted = f'"{etag}"'
    tags = {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}
    if quoted in tags or etag in tags or "*" in tags:
        return web.Response(status=304, headers={"ETag": quoted})
    return web.Response(body=body, content_type="application/json", headers={"ETag": quoted})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/agent/v1/findings", post_findings)
    app.router.add_post("/agent/v1/heartbeat", post_heartbeat)
    app.router.add_get("/agent/v1/config", get_config)

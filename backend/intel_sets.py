"""GuardDuty's threat intel sets and IP sets (trusted IP lists): lists the backend fetches, checks and serves to agents.

The ten operations (Create/List/Get/Update/Delete of ThreatIntelSet and IPSet) take and return exactly the members
of botocore's ``guardduty`` model. A threat intel set is stored with kind THREAT, an IP set with kind TRUSTED; the
agents receive the ACTIVE ones in their configuration (``backend.agent_config``).

Where GuardDuty reads an S3 object, this backend reads ``file:///abs/path`` or an absolute path on its own host,
or fetches an ``https://`` (or ``http://``) URL; it has no S3 credentials, so ``s3://`` is refused with a message
saying what to give instead. The content is fetched and checked with the sidecar's own list readers
(``detectors.intel``) when a set is created, when its location changes, when it is (re)activated, and by
:func:`refresh_set`. GuardDuty's formats map onto the readers: TXT -> plain, STIX -> stix (STIX 2.1 JSON),
OTX_CSV -> otx; ALIEN_VAULT, PROOF_POINT and FIRE_EYE are refused.

A list that cannot be fetched, or of which no line can be read, puts the set in status ERROR and is not served.
botocore keeps only the members of its model, so the reason (and, for an ACTIVE set, the lines that were
skipped) is shown in GetThreatIntelSet/GetIPSet as the tag ``runtime-backend:status-reason`` and logged.

The tag ``category`` of a threat intel set names what its indicators are (``c2``, ``mining``, ``tor``, ...; see
``detectors.intel.lists.CATEGORY_TYPES``), which decides the finding type an agent raises on a match.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import secrets
import socket
import stat
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from yarl import URL

from backend.api import ApiRequest, next_token, operation, parse_page
from backend.errors import BadRequest
from backend.models import IntelSet
from backend.tenancy import now_ms
from detectors.intel import ThreatIntel
from detectors.intel.lists import CATEGORY_TYPES, DEFAULT_CATEGORY

log = logging.getLogger("backend.intel_sets")

THREAT = "THREAT"
TRUSTED = "TRUSTED"
# GuardDuty's format -> the detectors.intel reader that reads it
FORMATS = {"TXT": "plain", "STIX": "stix", "OTX_CSV": "otx"}
UNSUPPORTED_FORMATS = ("ALIEN_VAULT", "PROOF_POINT", "FIRE_EYE")
STATUS_TAG = "runtime-backend:status-reason"
CATEGORY_TAG = "category"
NAME_RE = re.compile(r"^[A-Za-z0-9 _-]{1,300}$")  # GuardDuty: alphanumeric, whitespace, '-' and '_'
TAG_KEY_RE = re.compile(r"^(?!aws:)[A-Za-z0-9+\-=._:/ ]{1,128}$")
MAX_LOCATION_CHARS = 300
MAX_TAGS = 200
MAX_LIST_BYTES = 32 << 20
FETCH_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
# how much of the reasons a set's status carries (a tag value holds 256 characters)
MAX_REASON_CHARS = 256
NOT_FOUND = "The request is rejected since no such resource found"


@dataclass(frozen=True)
class SetKind:
    """What differs between the two operations families."""

    kind: str  # THREAT | TRUSTED
    label: str  # for messages
    id_param: str  # the path parameter
    id_member: str  # Create's response member
    list_member: str  # List's response member
    limit: int  # GuardDuty's quota per detector


THREAT_SETS = SetKind(THREAT, "threat intel set", "ThreatIntelSetId", "threatIntelSetId", "threatIntelSetIds", 6)
IP_SETS = SetKind(TRUSTED, "IP set", "IpSetId", "ipSetId", "ipSetIds", 1)


@dataclass(frozen=True)
class FetchLimits:
    """How far the backend goes to read a list: size, time, and which files it may read.

    ``file_roots`` None lets any absolute path be read: on a backend shared by several accounts, set it, since
    whoever holds an access key could otherwise have the backend read its own files into a list.
    """

    max_bytes: int = MAX_LIST_BYTES
    timeout_s: float = FETCH_TIMEOUT_S
    file_roots: tuple[str, ...] | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> FetchLimits:
        # the settings fields are optional: a backend without them gets the defaults
        roots = getattr(settings, "intel_file_roots", None)
        if isinstance(roots, str):  # the setting: empty means no file may be read
            roots = [r for r in roots.split(os.pathsep) if r]
        return cls(
            max_bytes=int(getattr(settings, "intel_max_bytes", None) or MAX_LIST_BYTES),
            timeout_s=float(getattr(settings, "intel_fetch_timeout_s", None) or FETCH_TIMEOUT_S),
            file_roots=tuple(str(Path(r).resolve()) for r in roots) if roots is not None else None,
        )


class ListFetchError(Exception):
    """The list could not be read from its location; the message says why, for the set's status."""


# -- locations ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    scheme: str  # "file" | "http"
    target: str  # the absolute path, or the URL


def parse_location(location: str) -> Location:
    """Where a list lives, or BadRequest saying what this backend can read instead."""
    loc = location.strip()
    lowered = loc.lower()
    if lowered.startswith("s3://"):
        raise BadRequest(
            "location: this backend has no access to S3 and cannot read s3:// objects; give an https:// URL the "
            "backend can fetch, file:///absolute/path or an absolute path on the backend's host"
        )
    if lowered.startswith("file://"):
        parts = urlsplit(loc)
        if parts.netloc not in ("", "localhost"):
            raise BadRequest(
                f"location: a file:// URL must name a file on the backend's host, got host {parts.netloc!r}"
            )
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise BadRequest("location: a file:// URL needs an absolute path (file:///path/to/list.txt)")
        return Location("file", path)
    if loc.startswith("/"):
        return Location("file", loc)
    if lowered.startswith(("https://", "http://")):
        parts = urlsplit(loc)
        if not parts.hostname:
            raise BadRequest(f"location: no host in the URL {loc!r}")
        return Location("http", loc)
    raise BadRequest(
        f"location: expected https://..., http://..., file:///absolute/path or an absolute path, got {loc[:80]!r}"
    )


def _refused_address(host: str) -> str | None:
    """Why the backend will not connect to this address, or None.

    Link-local addresses hold cloud metadata services (EC2's 169.254.169.254 and fd00:ec2::254, ECS's
    169.254.170.2 with the task role's credentials): a list location must never make the backend read them.
    """
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_link_local or ip == ipaddress.ip_address("fd00:ec2::254"):
        return f"{host} is a link-local (metadata service) address"
    if ip.is_multicast or ip.is_unspecified:
        return f"{host} is not a unicast address"
    return None


class _GuardedResolver(AbstractResolver):
    """DNS resolution that drops the addresses of :func:`_refused_address`, so a name cannot point there."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        allowed = [r for r in found if _refused_address(r["host"]) is None]
        if not allowed:
            raise OSError(f"{host} resolves only to addresses the backend does not fetch lists from")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


async def fetch_location(location: Location, limits: FetchLimits) -> bytes:
    """The list's bytes, or ListFetchError with the reason."""
    if location.scheme == "file":
        return await asyncio.to_thread(_read_file, location.target, limits)
    return await _fetch_url(location.target, limits)


def _read_file(path: str, limits: FetchLimits) -> bytes:
    real = os.path.realpath(path)
    if limits.file_roots == ():
        raise ListFetchError(
            "this backend reads lists from http(s) locations only; an operator can allow directories with"
            " RUNTIME_BACKEND_INTEL_FILE_ROOTS"
        )
    if limits.file_roots is not None and not any(
        real == root or real.startswith(root.rstrip("/") + "/") for root in limits.file_roots
    ):
        raise ListFetchError(f"{path} is outside the directories this backend reads lists from")
    try:
        # O_NONBLOCK: a FIFO must not hang the read; regular files ignore it
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ListFetchError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise ListFetchError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ListFetchError(f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > limits.max_bytes:
            raise ListFetchError(f"{path} is {st.st_size} bytes, over the {limits.max_bytes} byte limit")
        data = f.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise ListFetchError(f"{path} is over the {limits.max_bytes} byte limit")
    return data


async def _fetch_url(url: str, limits: FetchLimits) -> bytes:
    timeout = aiohttp.ClientTimeout(total=limits.timeout_s)
    connector = aiohttp.TCPConnector(resolver=_GuardedResolver(), limit=4)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            # redirects are followed here, not by aiohttp, so that each hop's address is checked
            for _ in range(MAX_REDIRECTS + 1):
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise ListFetchError(f"redirected to {url[:200]!r}, which is not an http(s) URL")
                why = _refused_address(parts.hostname)
                if why is not None:
                    raise ListFetchError(f"refused to fetch {url[:200]}: {why}")
                async with http.get(url, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        url = str(resp.url.join(URL(resp.headers["Location"])))
                        continue
                    if resp.status != 200:
                        raise ListFetchError(f"GET {url[:200]} answered HTTP {resp.status} {resp.reason or ''}".strip())
                    if resp.content_length is not None and resp.content_length > limits.max_bytes:
                        raise ListFetchError(
                            f"GET {url[:200]}: {resp.content_length} bytes, over the {limits.max_bytes} byte limit"
                        )
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in resp.content.iter_chunked(65536):
                        size += len(chunk)
                        if size > limits.max_bytes:
                            raise ListFetchError(f"GET {url[:200]}: over the {limits.max_bytes} byte limit")
                        chunks.append(chunk)
                    return b"".join(chunks)
            raise ListFetchError(f"more than {MAX_REDIRECTS} redirects from {url[:200]}")
    except TimeoutError:
        raise ListFetchError(f"GET {url[:200]}: no complete answer within {limits.timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise ListFetchError(f"GET {url[:200]}: {exc}") from None
    except OSError as exc:
        raise ListFetchError(f"GET {url[:200]}: {exc.strerror or exc}") from None


# -- checking a list with the sidecar's readers ------------------------------------------------------------------


@dataclass(frozen=True)
class ListCheck:
    indicators: int
    problems: list[str]


def check_list(text: str, fmt: str, *, name: str, kind: str, category: str | None) -> ListCheck:
    """Read ``text`` as an agent will (``detectors.intel``): how many indicators load, and what is skipped."""
    reader_fmt = FORMATS[fmt]
    if reader_fmt == "stix" and text.lstrip().startswith("<"):
        return ListCheck(0, ["STIX 1.x XML is not supported: give a STIX 2.1 JSON bundle"])
    intel = ThreatIntel()
    where = f"<{name}>"
    trusted = kind == TRUSTED
    problems = intel.add_text(
        where, text, fmt=reader_fmt, name=name, category="trusted" if trusted else (category or DEFAULT_CATEGORY),
        trusted=trusted,
    )  # fmt: skip
    return ListCheck(int(intel.lists.get(name, {}).get("entries", 0)), [str(p) for p in problems])


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ListFetchError(f"the list is not UTF-8 text (byte {exc.start})") from None


def _clip_reason(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


async def load_content(row: IntelSet, limits: FetchLimits) -> tuple[str | None, str | None]:
    """Fetch and check the set's list: (content, None) when it loads, else (None, the reason)."""
    try:
        text = _decode(await fetch_location(parse_location(row.location), limits))
        # a large list takes a while to read; off the event loop, like the file read
        check = await asyncio.to_thread(
            check_list, text, row.format, name=row.name, kind=row.kind, category=_category_of(row)
        )
    except ListFetchError as exc:
        return None, str(exc)
    except BadRequest as exc:  # a location stored before the rules changed
        return None, exc.message
    if check.indicators == 0:
        first = "; ".join(check.problems[:3]) or "the list is empty"
        return None, f"no indicator could be read: {first}"
    if check.problems:
        return text, f"{check.indicators} indicators loaded; skipped: " + "; ".join(check.problems[:3])
    return text, None


async def refresh_set(
    session: AsyncSession,
    row: IntelSet,
    limits: FetchLimits,
    *,
    keep_last_good: bool,
    loaded: tuple[str | None, str | None] | None = None,
) -> None:
    """Fetch and check ``row``'s list again and record the outcome in ``row`` (the caller's transaction commits).

    With ``keep_last_good`` (a periodic refresh), a set whose list loaded before keeps serving that content when
    the new fetch fails, and its status reason says the refresh failed: an unreachable feed must not silently
    strip every agent of the list. Without it (the user gave a new location), a failure is status ERROR.
    """
    # ``loaded``: load_content's result, fetched before the caller's transaction began (see ``prefetch``)
    content, reason = loaded if loaded is not None else await load_content(row, limits)
    t = now_ms()
    if content is None and keep_last_good and row.content and row.status != "ERROR":
        row.error = _clip_reason(f"refresh failed, serving the list loaded before: {reason}")
        log.warning("intel set refresh failed", extra={"intelSet": row.id, "setName": row.name, "error": reason})
    elif content is None:
        row.content, row.content_sha256 = "", ""
        row.status, row.error = "ERROR", _clip_reason(reason or "unknown error")
        log.warning("intel set in error", extra={"intelSet": row.id, "setName": row.name, "error": reason})
    else:
        digest = sha256(content.encode()).hexdigest()
        row.content, row.content_sha256 = content, digest
        row.status = "ACTIVE" if row.activate else "INACTIVE"
        row.error = _clip_reason(reason) if reason else None
    row.updated_at = t
    await session.flush()


# -- the request's parts -----------------------------------------------------------------------------------------


def _category_of(row: IntelSet) -> str | None:
    tags = orjson.loads(row.tags or "{}")
    value = tags.get(CATEGORY_TAG) if isinstance(tags, dict) else None
    return value.lower() if isinstance(value, str) and value else None


def _name(body: dict[str, Any], *, required: bool) -> str | None:
    v = body.get("name")
    if v is None:
        if required:
            raise BadRequest("name: required")
        return None
    if not isinstance(v, str) or not NAME_RE.match(v):
        raise BadRequest("name: 1 to 300 characters: letters, digits, spaces, '-' and '_'")
    return v


def _format(body: dict[str, Any]) -> str:
    v = body.get("format")
    if v is None:
        raise BadRequest("format: required")
    if v in UNSUPPORTED_FORMATS:
        raise BadRequest(
            f"format: {v} is not supported by this backend; give the list as TXT (one IP, CIDR or domain a line), "
            "STIX (a STIX 2.1 JSON bundle) or OTX_CSV"
        )
    if v not in FORMATS:
        raise BadRequest(f"format: one of {', '.join(FORMATS)}, got {v!r}")
    return str(v)


def _location(body: dict[str, Any], *, required: bool) -> str | None:
    v = body.get("location")
    if v is None:
        if required:
            raise BadRequest("location: required")
        return None
    if not isinstance(v, str) or not v.strip() or len(v) > MAX_LOCATION_CHARS:
        raise BadRequest(f"location: a string of 1 to {MAX_LOCATION_CHARS} characters")
    parse_location(v)
    return v.strip()


def _activate(body: dict[str, Any], *, required: bool) -> bool | None:
    v = body.get("activate")
    if v is None:
        if required:
            raise BadRequest("activate: required")
        return None
    if not isinstance(v, bool):
        raise BadRequest(f"activate: true or false, got {v!r}")
    return v


def _tags(body: dict[str, Any], kind: SetKind) -> dict[str, str]:
    tags = body.get("tags")
    if tags is None:
        return {}
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise BadRequest("tags: a map of strings to strings")
    if len(tags) > MAX_TAGS:
        raise BadRequest(f"tags: at most {MAX_TAGS} tags, got {len(tags)}")
    for k, v in tags.items():
        if not TAG_KEY_RE.match(k):
            raise BadRequest(f"tags: {k!r} is not a valid tag key (1-128 characters, not starting with 'aws:')")
        if len(v) > 256:
            raise BadRequest(f"tags.{k}: a value holds at most 256 characters")
    if STATUS_TAG in tags:
        raise BadRequest(f"tags: {STATUS_TAG} is set by the backend (the reason of the set's status)")
    category = tags.get(CATEGORY_TAG)
    if category is not None:
        if kind.kind == TRUSTED:
            raise BadRequest(f"tags.{CATEGORY_TAG}: an IP set is trusted: it has no category")
        if category.lower() not in CATEGORY_TYPES:
            raise BadRequest(f"tags.{CATEGORY_TAG}: one of {', '.join(CATEGORY_TYPES)}, got {category!r}")
    return dict(tags)


async def _check_name_free(session: AsyncSession, detector_id: str, kind: SetKind, name: str, own_id: str = "") -> None:
    taken = (
        await session.execute(
            select(IntelSet.id).where(
                IntelSet.detector_id == detector_id, IntelSet.kind == kind.kind, IntelSet.name == name,
                IntelSet.id != own_id,
            )
        )
    ).first()  # fmt: skip
    if taken is not None:
        raise BadRequest(f"name: a {kind.label} named {name!r} already exists in this detector")


async def _get_row(req: ApiRequest, kind: SetKind) -> IntelSet:
    set_id = req.params[kind.id_param]
    row = await req.session.get(IntelSet, set_id) if re.fullmatch(r"[0-9a-f]{32}", set_id) else None
    if row is None or row.detector_id != req.detector_id or row.kind != kind.kind:
        raise BadRequest(f"{NOT_FOUND}: {kind.label} {set_id!r}")
    return row


def _limits(req: ApiRequest) -> FetchLimits:
    from backend.app import SETTINGS

    return FetchLimits.from_settings(req.app[SETTINGS])


async def _flush(session: AsyncSession, kind: SetKind, name: str) -> None:
    try:
        await session.flush()
    except IntegrityError:
        # two requests creating the same name at once: the unique constraint decides
        raise BadRequest(f"name: a {kind.label} named {name!r} already exists in this detector") from None


# -- the operations ---------------------------------------------------------------------------------------------


async def prefetch(req: ApiRequest, kind: SetKind) -> tuple[str | None, str | None] | None:
    """Create/Update's slow part, run by backend.api before the write transaction: fetch and check the list.

    Fetching a URL can take up to the fetch timeout; inside the transaction it would hold SQLite's one write
    lock (and stall ingest) for that long. Validation errors here are the same the handler would raise.
    """
    b = req.body
    if "ThreatIntelSetId" in req.params or "IpSetId" in req.params:  # Update
        row = await _get_row(req, kind)
        location = _location(b, required=False)
        activate = _activate(b, required=False)
        if location is None and not activate:
            return None  # nothing to fetch
        probe = IntelSet(
            name=_name(b, required=False) or row.name, kind=row.kind, format=row.format,
            location=location or row.location, tags=row.tags,
        )  # fmt: skip
    else:
        probe = IntelSet(
            name=_name(b, required=True), kind=kind.kind, format=_format(b),
            location=_location(b, required=True), tags=orjson.dumps(_tags(b, kind)).decode(),
        )  # fmt: skip
    await req.session.rollback()  # end the read before waiting on the network
    return await load_content(probe, _limits(req))


async def create_set(req: ApiRequest, kind: SetKind) -> dict[str, Any]:
    b = req.body
    name = _name(b, required=True)
    fmt = _format(b)
    location = _location(b, required=True)
    activate = _activate(b, required=True)
    tags = _tags(b, kind)
    assert name is not None and location is not None and activate is not None
    count = (
        await req.session.execute(
            select(func.count()).where(IntelSet.detector_id == req.detector_id, IntelSet.kind == kind.kind)
        )
    ).scalar_one()
    if count >= kind.limit:
        raise BadRequest(
            f"this detector already has {count} {kind.label}s, GuardDuty's limit is {kind.limit} per detector: "
            f"delete one or update it (UpdateThreatIntelSet/UpdateIPSet) to a new location"
        )
    await _check_name_free(req.session, req.detector_id, kind, name)
    t = now_ms()
    row = IntelSet(
        id=secrets.token_hex(16),
        detector_id=req.detector_id,
        kind=kind.kind,
        name=name,
        format=fmt,
        location=location,
        activate=activate,
        status="ERROR",
        error=None,
        content="",
        content_sha256="",
        tags=orjson.dumps(tags).decode(),
        created_at=t,
        updated_at=t,
    )
    req.session.add(row)
    await _flush(req.session, kind, name)
    await refresh_set(req.session, row, _limits(req), keep_last_good=False, loaded=req.prepared)
    log.info(
        "intel set created",
        extra={
            "intelSet": row.id,
            "kind": kind.kind,
            "setName": name,
            "status": row.status,
            "detector": row.detector_id,
        },
    )
    return {kind.id_member: row.id}


async def list_sets(req: ApiRequest, kind: SetKind) -> dict[str, Any]:
    offset, limit = parse_page(req, default=50, maximum=50, in_query=True)
    ids = list(
        (
            await req.session.execute(
                select(IntelSet.id)
                .where(IntelSet.detector_id == req.detector_id, IntelSet.kind == kind.kind)
                .order_by(IntelSet.created_at, IntelSet.id)
                .offset(offset)
                .limit(limit + 1)
            )
        ).scalars()
    )
    return {kind.list_member: ids[:limit], "nextToken": next_token(offset, limit, len(ids))}


def describe(row: IntelSet) -> dict[str, Any]:
    """GetThreatIntelSet/GetIPSet's response for ``row``."""
    tags: dict[str, str] = orjson.loads(row.tags or "{}")
    if row.error:
        tags[STATUS_TAG] = row.error
    return {"name": row.name, "format": row.format, "location": row.location, "status": row.status, "tags": tags}


async def get_set(req: ApiRequest, kind: SetKind) -> dict[str, Any]:
    return describe(await _get_row(req, kind))


async def update_set(req: ApiRequest, kind: SetKind) -> dict[str, Any]:
    row = await _get_row(req, kind)
    b = req.body
    name = _name(b, required=False)
    location = _location(b, required=False)
    activate = _activate(b, required=False)
    if name is not None and name != row.name:
        await _check_name_free(req.session, req.detector_id, kind, name, row.id)
        row.name = name
        row.updated_at = now_ms()
        await _flush(req.session, kind, name)
    if location is not None:
        row.location = location
    if activate is not None:
        row.activate = activate
    # activating reads the list again, as GuardDuty does; so does a new location
    if location is not None or activate:
        await refresh_set(req.session, row, _limits(req), keep_last_good=False, loaded=req.prepared)
    elif activate is False:
        row.status = "INACTIVE"
        row.updated_at = now_ms()
    return {}


async def delete_set(req: ApiRequest, kind: SetKind) -> dict[str, Any]:
    row = await _get_row(req, kind)
    await req.session.execute(delete(IntelSet).where(IntelSet.id == row.id))
    log.info("intel set deleted", extra={"intelSet": row.id, "kind": kind.kind, "setName": row.name})
    return {}


async def _prefetch_threat(req: ApiRequest) -> Any:
    return await prefetch(req, THREAT_SETS)


async def _prefetch_ip(req: ApiRequest) -> Any:
    return await prefetch(req, IP_SETS)


@operation("POST", "/detector/{DetectorId}/threatintelset", "CreateThreatIntelSet", prepare=_prefetch_threat)
async def create_threat_intel_set(req: ApiRequest) -> dict[str, Any]:
    return await create_set(req, THREAT_SETS)


@operation("GET", "/detector/{DetectorId}/threatintelset", "ListThreatIntelSets")
async def list_threat_intel_sets(req: ApiRequest) -> dict[str, Any]:
    return await list_sets(req, THREAT_SETS)


@operation("GET", "/detector/{DetectorId}/threatintelset/{ThreatIntelSetId}", "GetThreatIntelSet")
async def get_threat_intel_set(req: ApiRequest) -> dict[str, Any]:
    return await get_set(req, THREAT_SETS)


@operation(
    "POST", "/detector/{DetectorId}/threatintelset/{ThreatIntelSetId}", "UpdateThreatIntelSet", prepare=_prefetch_threat
)
async def update_threat_intel_set(req: ApiRequest) -> dict[str, Any]:
    return await update_set(req, THREAT_SETS)


@operation("DELETE", "/detector/{DetectorId}/threatintelset/{ThreatIntelSetId}", "DeleteThreatIntelSet")
async def delete_threat_intel_set(req: ApiRequest) -> dict[str, Any]:
    return await delete_set(req, THREAT_SETS)


@operation("POST", "/detector/{DetectorId}/ipset", "CreateIPSet", prepare=_prefetch_ip)
async def create_ip_set(req: ApiRequest) -> dict[str, Any]:
    return await create_set(req, IP_SETS)


@operation("GET", "/detector/{DetectorId}/ipset", "ListIPSets")
async def list_ip_sets(req: ApiRequest) -> dict[str, Any]:
    return await list_sets(req, IP_SETS)


@operation("GET", "/detector/{DetectorId}/ipset/{IpSetId}", "GetIPSet")
async def get_ip_set(req: ApiRequest) -> dict[str, Any]:
    return await get_set(req, IP_SETS)


@operation("POST", "/detector/{DetectorId}/ipset/{IpSetId}", "UpdateIPSet", prepare=_prefetch_ip)
async def update_ip_set(req: ApiRequest) -> dict[str, Any]:
    return await update_set(req, IP_SETS)


@operation("DELETE", "/detector/{DetectorId}/ipset/{IpSetId}", "DeleteIPSet")
async def delete_ip_set(req: ApiRequest) -> dict[str, Any]:
    return await delete_set(req, IP_SETS)


async def refresh_sets(
    sessions: async_sessionmaker[AsyncSession], limits: FetchLimits, detector_id: str | None = None
) -> list[IntelSet]:
    """Re-fetch every active set (of one detector, or all): the periodic job and ``runtime-backend intel refresh``.

    Each list is fetched with no transaction open and recorded in a short one of its own, so a slow feed never
    holds the database; a set changed or deleted meanwhile is left as the user left it.
    """
    async with sessions() as session:
        stmt = select(IntelSet).where(IntelSet.activate.is_(True))
        if detector_id is not None:
            stmt = stmt.where(IntelSet.detector_id == detector_id)
        snapshots = list((await session.execute(stmt.order_by(IntelSet.created_at))).scalars())
    done: list[IntelSet] = []
    for snap in snapshots:
        loaded = await load_content(snap, limits)
        async with sessions() as session, session.begin():
            row = await session.get(IntelSet, snap.id)
            if row is None or (row.location, row.format, row.updated_at) != (
                snap.location,
                snap.format,
                snap.updated_at,
            ):
                continue
            await refresh_set(session, row, limits, keep_last_good=True, loaded=loaded)
            done.append(row)
    return done

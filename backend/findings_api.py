"""ListFindings, GetFindings, GetFindingsStatistics, Archive/UnarchiveFindings and filters (suppression rules)."""

from __future__ import annotations

import re
from typing import Any

import orjson
from sqlalchemy import ColumnElement, and_, delete, func, select, true, update

from backend.api import ApiRequest, id_list, next_token, operation, parse_page, str_field
from backend.criteria import FINDING_FIELDS, compile_conditions, parse_finding_criteria, parse_sort
from backend.errors import BadRequest
from backend.findings import document_of
from backend.models import FilterRow, FindingRow
from backend.tenancy import now_ms


def _where(req: ApiRequest, key: str = "findingCriteria") -> ColumnElement[bool]:
    conditions = parse_finding_criteria(req.body.get(key), where=key)
    base = FindingRow.detector_id == req.detector_id
    return and_(base, compile_conditions(conditions, FindingRow)) if conditions else base


def _order(req: ApiRequest) -> list[Any]:
    sort = parse_sort(req.body.get("sortCriteria"), fields=FINDING_FIELDS, where="sortCriteria")
    if sort is None:
        return [FindingRow.updated_at.desc(), FindingRow.id.desc()]
    column, descending = sort
    col = getattr(FindingRow, column)
    # ties broken by id in the same direction: the (column, updated_at, id) indexes serve it in one scan
    return [col.desc(), FindingRow.id.desc()] if descending else [col.asc(), FindingRow.id.asc()]


@operation("POST", "/detector/{DetectorId}/findings", "ListFindings")
async def list_findings(req: ApiRequest) -> dict[str, Any]:
    offset, limit = parse_page(req, default=50, maximum=50)
    stmt = select(FindingRow.id).where(_where(req)).order_by(*_order(req)).offset(offset).limit(limit + 1)
    ids = list((await req.session.execute(stmt)).scalars())
    return {"findingIds": ids[:limit], "nextToken": next_token(offset, limit, len(ids))}


@operation("POST", "/detector/{DetectorId}/findings/get", "GetFindings")
async def get_findings(req: ApiRequest) -> dict[str, Any]:
    ids = id_list(req.body, "findingIds", maximum=50)
    if not ids:
        return {"findings": []}
    sort = parse_sort(req.body.get("sortCriteria"), fields=FINDING_FIELDS, where="sortCriteria")
    stmt = select(FindingRow).where(FindingRow.detector_id == req.detector_id, FindingRow.id.in_(ids))
    rows = list((await req.session.execute(stmt)).scalars())
    # at most 50 rows: sorted here, since an ORDER BY tempts SQLite into walking a sort index instead of the ids
    column, descending = sort or ("updated_at", True)
    present = [r for r in rows if getattr(r, column) is not None]
    present.sort(key=lambda r: (getattr(r, column), r.id), reverse=descending)
    rows = present + [r for r in rows if getattr(r, column) is None]
    return {"findings": [document_of(r) for r in rows]}


async def _set_archived(req: ApiRequest, archived: bool) -> dict[str, Any]:
    ids = id_list(req.body, "findingIds", maximum=50)
    if ids:
        await req.session.execute(
            update(FindingRow)
            .where(FindingRow.detector_id == req.detector_id, FindingRow.id.in_(ids))
            .values(archived=archived, archived_by="user" if archived else None)
            .execution_options(synchronize_session=False)
        )
        from backend.exports import archive_changed

        # exporters that mirror the workflow state (Security Hub) hear of it once this transaction commits
        archive_changed(req.session, req.app, req.detector_id, ids)
    return {}


@operation("POST", "/detector/{DetectorId}/findings/archive", "ArchiveFindings")
async def archive_findings(req: ApiRequest) -> dict[str, Any]:
    return await _set_archived(req, True)


@operation("POST", "/detector/{DetectorId}/findings/unarchive", "UnarchiveFindings")
async def unarchive_findings(req: ApiRequest) -> dict[str, Any]:
    return await _set_archived(req, False)


# -- statistics ------------------------------------------------------------------------------------------------

_GROUPS = {  # groupBy -> the response member holding the groups
    "ACCOUNT": "groupedByAccount",
    "DATE": "groupedByDate",
    "FINDING_TYPE": "groupedByFindingType",
    "RESOURCE": "groupedByResource",
    "SEVERITY": "groupedBySeverity",
}
DAY_MS = 86_400_000


@operation("POST", "/detector/{DetectorId}/findings/statistics", "GetFindingsStatistics")
async def get_findings_statistics(req: ApiRequest) -> dict[str, Any]:
    where = _where(req)
    types = req.body.get("findingStatisticTypes")
    group = req.body.get("groupBy")
    if (types is None) == (group is None):
        raise BadRequest("give exactly one of findingStatisticTypes (COUNT_BY_SEVERITY) or groupBy")
    if types is not None:
        if types != ["COUNT_BY_SEVERITY"]:
            raise BadRequest(f"findingStatisticTypes: only COUNT_BY_SEVERITY exists, got {types!r}")
        rows = await req.session.execute(
            select(FindingRow.severity, func.count()).where(where).group_by(FindingRow.severity)
        )
        return {"findingStatistics": {"countBySeverity": {str(float(sev)): n for sev, n in rows}}}
    if group not in _GROUPS:
        raise BadRequest(f"groupBy: one of {', '.join(_GROUPS)}, got {group!r}")
    order = req.body.get("orderBy", "DESC")
    if order not in ("ASC", "DESC"):
        raise BadRequest(f"orderBy: ASC or DESC, got {order!r}")
    limit = req.body.get("maxResults", 25)
    if not isinstance(limit, int) or not 1 <= limit <= 100:
        raise BadRequest(f"maxResults: an integer from 1 to 100, got {limit!r}")
    total = func.count().label("total")
    last = func.max(FindingRow.updated_at).label("last")
    keys: list[Any]
    if group == "ACCOUNT":
        keys = [FindingRow.account_id]
    elif group == "DATE":
        keys = [(FindingRow.updated_at // DAY_MS).label("day")]  # SQLAlchemy's floor division, on both engines
    elif group == "FINDING_TYPE":
        keys = [FindingRow.type]
    elif group == "RESOURCE":
        keys = [FindingRow.account_id, FindingRow.cluster_arn, FindingRow.cluster_name]
    else:
        keys = [FindingRow.severity]
    extra = [func.max(FindingRow.severity).label("maxsev")] if group == "DATE" else []
    stmt = (
        select(*keys, total, last, *extra)
        .where(where)
        .group_by(*keys)
        .order_by(total.desc() if order == "DESC" else total.asc(), *keys)
        .limit(limit)
    )
    out: list[dict[str, Any]] = []
    for row in await req.session.execute(stmt):
        item: dict[str, Any] = {"totalFindings": row.total, "lastGeneratedAt": row.last / 1000}
        if group == "ACCOUNT":
            item["accountId"] = row.account_id
        elif group == "DATE":
            item["date"] = int(row.day) * DAY_MS / 1000
            item["severity"] = float(row.maxsev)
        elif group == "FINDING_TYPE":
            item["findingType"] = row.type
        elif group == "RESOURCE":
            item.update(
                accountId=row.account_id, resourceId=row.cluster_arn or row.cluster_name, resourceType="ECSCluster"
            )
        else:
            item["severity"] = float(row.severity)
        out.append(item)
    return {"findingStatistics": {_GROUPS[group]: out}}


# -- filters (action ARCHIVE: suppression rules) ------------------------------------------------------------

FILTER_NAME = re.compile(r"^[A-Za-z0-9_.-]{3,64}$")


def _filter_fields(req: ApiRequest, row: FilterRow | None) -> dict[str, Any]:
    b = req.body
    out: dict[str, Any] = {}
    if "action" in b or row is None:
        action = b.get("action", "NOOP")
        if action not in ("NOOP", "ARCHIVE"):
            raise BadRequest(f"action: NOOP or ARCHIVE, got {action!r}")
        out["action"] = action
    if "rank" in b or row is None:
        rank = b.get("rank", 1)
        if not isinstance(rank, int) or not 1 <= rank <= 100:
            raise BadRequest(f"rank: an integer from 1 to 100, got {rank!r}")
        out["rank"] = rank
    if "description" in b or row is None:
        desc = b.get("description", "")
        if not isinstance(desc, str) or len(desc) > 512:
            raise BadRequest("description: a string of at most 512 characters")
        out["description"] = desc
    if "findingCriteria" in b or row is None:
        criteria = b.get("findingCriteria")
        if not parse_finding_criteria(criteria, where="findingCriteria"):
            raise BadRequest("findingCriteria: a filter needs at least one criterion")
        out["criteria"] = orjson.dumps(criteria).decode()
    return out


@operation("POST", "/detector/{DetectorId}/filter", "CreateFilter")
async def create_filter(req: ApiRequest) -> dict[str, Any]:
    name = str_field(req.body, "name", max_len=64)
    assert name is not None
    if not FILTER_NAME.match(name):
        raise BadRequest("name: 3 to 64 letters, digits, '-', '_' or '.'")
    if await req.session.get(FilterRow, (req.detector_id, name)) is not None:
        raise BadRequest(f"a filter named {name!r} already exists")
    tags = req.body.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise BadRequest("tags: a map of strings")
    t = now_ms()
    req.session.add(
        FilterRow(
            detector_id=req.detector_id,
            name=name,
            tags=orjson.dumps(tags).decode(),
            created_at=t,
            updated_at=t,
            **_filter_fields(req, None),
        )
    )
    await req.session.flush()
    return {"name": name}


async def _filter(req: ApiRequest) -> FilterRow:
    row = await req.session.get(FilterRow, (req.detector_id, req.params["FilterName"]))
    if row is None:
        raise BadRequest(f"The request is rejected since no such resource found: filter {req.params['FilterName']!r}")
    return row


@operation("GET", "/detector/{DetectorId}/filter/{FilterName}", "GetFilter")
async def get_filter(req: ApiRequest) -> dict[str, Any]:
    row = await _filter(req)
    return {
        "name": row.name,
        "description": row.description,
        "action": row.action,
        "rank": row.rank,
        "findingCriteria": orjson.loads(row.criteria),
        "tags": orjson.loads(row.tags),
    }


@operation("POST", "/detector/{DetectorId}/filter/{FilterName}", "UpdateFilter")
async def update_filter(req: ApiRequest) -> dict[str, Any]:
    row = await _filter(req)
    for k, v in _filter_fields(req, row).items():
        setattr(row, k, v)
    row.updated_at = now_ms()
    return {"name": row.name}


@operation("DELETE", "/detector/{DetectorId}/filter/{FilterName}", "DeleteFilter")
async def delete_filter(req: ApiRequest) -> dict[str, Any]:
    row = await _filter(req)
    await req.session.execute(
        delete(FilterRow).where(FilterRow.detector_id == row.detector_id, FilterRow.name == row.name)
    )
    return {}


@operation("GET", "/detector/{DetectorId}/filter", "ListFilters")
async def list_filters(req: ApiRequest) -> dict[str, Any]:
    offset, limit = parse_page(req, default=50, maximum=50, in_query=True)
    names = list(
        (
            await req.session.execute(
                select(FilterRow.name)
                .where(FilterRow.detector_id == req.detector_id, true())
                .order_by(FilterRow.rank, FilterRow.name)
                .offset(offset)
                .limit(limit + 1)
            )
        ).scalars()
    )
    return {"filterNames": names[:limit], "nextToken": next_token(offset, limit, len(names))}

"""FindingCriteria and SortCriteria: parsing, every validation message, and the SQL they compile to.

The queries run on real databases, SQLite and PostgreSQL (tests/db_fixtures.py starts the latter), over a handful
of findings chosen so that each operator's edge shows: NULL attributes, values differing only in case, and
values holding LIKE's own wildcards (``%``, ``_``) and GLOB's (``[``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from db_fixtures import PostgresServer
from sqlalchemy import BigInteger, Boolean, Float, Integer, String, Text, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import aliased

from backend.criteria import (
    FINDING_FIELDS,
    Condition,
    FieldSpec,
    compile_conditions,
    parse_finding_criteria,
    parse_sort,
)
from backend.errors import BadRequest
from backend.models import Base, FindingRow

DETECTOR = "d1"
IMAGE = "resource.ecsClusterDetails.taskDetails.containers.image"
CLUSTER = "resource.ecsClusterDetails.name"
EXE = "service.runtimeDetails.process.executablePath"
PROCESS = "service.runtimeDetails.process.name"
IPV4 = "service.action.networkConnectionAction.remoteIpDetails.ipAddressV4"
IPV6 = "service.action.networkConnectionAction.remoteIpDetails.ipAddressV6"

BASE: dict[str, Any] = {
    "detector_id": DETECTOR,
    "account_id": "111111111111",
    "region": "us-east-1",
    "resource_type": "ECSCluster",
    "feature_name": "RuntimeMonitoring",
    "received_at": 0,
    "document": "{}",
}
ROWS: list[dict[str, Any]] = [
    {
        "id": "f1",
        "type": "Execution:Runtime/ReverseShell",
        "severity": 8.0,
        "created_at": 1000,
        "updated_at": 5000,
        "first_seen": 900,
        "last_seen": 5000,
        "count": 1,
        "archived": False,
        "cluster_name": "prod",
        "task_family": "web",
        "container_name": "app",
        "image": "nginx:1.25",
        "executable_path": "/usr/bin/bash",
        "process_name": "bash",
        "remote_ip": "203.0.113.5",
    },
    {
        "id": "f2",
        "type": "Discovery:Runtime/SuspiciousCommand",
        "severity": 5.0,
        "created_at": 2000,
        "updated_at": 6000,
        "first_seen": 1500,
        "last_seen": 6000,
        "count": 3,
        "archived": True,
        "cluster_name": "prod",
        "task_family": "worker",
        "container_name": "worker",
        "image": "python:3.11",
        "executable_path": "/usr/local/bin/python3.11",
        "process_name": "python3.11",
        "action_type": "DNS_REQUEST",
        "domain": "evil.example.com",
        "threat_list_name": "ProofPoint",
        "remote_ip": "2001:db8::1",
    },
    {
        "id": "f3",
        "type": "CryptoCurrency:Runtime/BitcoinTool.B!DNS",
        "severity": 8.5,
        "created_at": 3000,
        "updated_at": 7000,
        "first_seen": 2500,
        "last_seen": 7000,
        "count": 10,
        "archived": False,
        "cluster_name": "staging",
        "task_family": "web",
        "container_name": "app",
        "executable_path": "/tmp/x%_y",
        "process_name": "x%_y",
        "action_type": "DNS_REQUEST",
        "domain": "pool.minexmr.com",
        "threat_list_name": "Expedition",
    },
    {  # the attributes a finding may lack are NULL here
        "id": "f4",
        "type": "Execution:Runtime/NewBinaryExecuted",
        "severity": 2.0,
        "created_at": 4000,
        "updated_at": 8000,
        "count": 2,
        "archived": False,
        "executable_path": "/tmp/xAby",
        "process_name": "xAby",
    },
    {
        "id": "f5",
        "type": "Execution:Runtime/NewBinaryExecuted",
        "severity": 5.5,
        "created_at": 4500,
        "updated_at": 8500,
        "first_seen": 8000,
        "last_seen": 8500,
        "count": 1,
        "archived": False,
        "cluster_name": "PROD",
        "container_name": "side",
        "image": "registry/[x]:1",
        "executable_path": "/TMP/X%_Y",
        "process_name": "X%_Y",
    },
]
ALL = {r["id"] for r in ROWS}
on_db = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgresql"])
async def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AsyncEngine]:
    """The findings above, on each engine in turn (read-only: shared by the module's tests)."""
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("criteria") / "findings.sqlite3"
        async for e in _loaded(f"sqlite+aiosqlite:///{path}"):
            yield e
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        with server.fresh_database() as url:
            async for e in _loaded(url.replace("postgresql://", "postgresql+asyncpg://", 1)):
                yield e


async def _loaded(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            unset = {c.name: None for c in FindingRow.__table__.c if c.nullable}
            await conn.execute(insert(FindingRow), [{**unset, **BASE, **r} for r in ROWS])
            # another detector's finding, which would match most criteria: only the detector filter excludes it
            await conn.execute(insert(FindingRow), [{**unset, **BASE, **ROWS[0], "detector_id": "other"}])
        yield engine
    finally:
        await engine.dispose()


async def matching(engine: AsyncEngine, criteria: Any, table: Any = FindingRow) -> set[str]:
    conditions = parse_finding_criteria(criteria)
    cols = table.c if hasattr(table, "c") else table
    stmt = select(cols.id).where(cols.detector_id == DETECTOR, compile_conditions(conditions, table))
    async with engine.connect() as conn:
        return set((await conn.execute(stmt)).scalars())


def crit(**fields: Any) -> dict[str, Any]:
    return {"criterion": fields}


# (criterion, the ids it selects); "spelled" cases run once per spelling of their operator
CASES: list[tuple[str, dict[str, Any], set[str]]] = [
    ("severity eq", {"severity": {"eq": ["8"]}}, {"f1"}),
    ("severity eq several", {"severity": {"eq": ["8", "5.5"]}}, {"f1", "f5"}),
    ("severity neq", {"severity": {"neq": ["8", "5"]}}, {"f3", "f4", "f5"}),
    ("severity gt", {"severity": {"gt": 5}}, {"f1", "f3", "f5"}),
    ("severity gte", {"severity": {"gte": 5}}, {"f1", "f2", "f3", "f5"}),
    ("severity lt", {"severity": {"lt": 5}}, {"f4"}),
    ("severity lte", {"severity": {"lte": 5}}, {"f2", "f4"}),
    ("severity range", {"severity": {"gte": 5, "lt": 8}}, {"f2", "f5"}),
    ("updatedAt gte", {"updatedAt": {"gte": 7000}}, {"f3", "f4", "f5"}),
    ("updatedAt eq", {"updatedAt": {"eq": ["6000"]}}, {"f2"}),
    ("createdAt lt", {"createdAt": {"lt": 2000}}, {"f1"}),
    ("a NULL time never compares", {"service.eventLastSeen": {"lt": 6000}}, {"f1"}),
    ("a NULL time is not excluded by neq", {"service.eventLastSeen": {"neq": ["5000"]}}, {"f2", "f3", "f4", "f5"}),
    ("eventFirstSeen gt", {"service.eventFirstSeen": {"gt": 1000}}, {"f2", "f3", "f5"}),
    ("archived eq true", {"service.archived": {"eq": ["true"]}}, {"f2"}),
    ("archived eq false", {"service.archived": {"eq": ["false"]}}, {"f1", "f3", "f4", "f5"}),
    ("archived neq true", {"service.archived": {"neq": ["true"]}}, {"f1", "f3", "f4", "f5"}),
    ("count gt", {"service.count": {"gt": 2}}, {"f2", "f3"}),
    ("count eq", {"service.count": {"eq": ["3"]}}, {"f2"}),
    ("count eq a fraction (float bound to an integer column)", {"service.count": {"eq": ["2.5"]}}, set()),
    ("count neq a fraction", {"service.count": {"neq": ["2.5"]}}, ALL),
    ("cluster eq is case-sensitive", {CLUSTER: {"eq": ["prod"]}}, {"f1", "f2"}),
    ("cluster neq keeps NULLs", {CLUSTER: {"neq": ["prod"]}}, {"f3", "f4", "f5"}),
    ("cluster matches is case-sensitive", {CLUSTER: {"matches": ["pr*"]}}, {"f1", "f2"}),
    ("cluster notMatches keeps NULLs", {CLUSTER: {"notMatches": ["pr*"]}}, {"f3", "f4", "f5"}),
    ("% and _ are literal in patterns", {EXE: {"matches": ["/tmp/x%_y"]}}, {"f3"}),
    ("? is one character", {EXE: {"matches": ["/tmp/x?_y"]}}, {"f3"}),
    ("?? on names", {PROCESS: {"matches": ["x??y"]}}, {"f3", "f4"}),
    ("* alone matches any present value", {IMAGE: {"matches": ["*"]}}, {"f1", "f2", "f5"}),
    ("[ is literal in patterns", {IMAGE: {"matches": ["registry/[x]*"]}}, {"f5"}),
    ("patterns are anchored", {IMAGE: {"matches": ["nginx"]}}, set()),
    ("matches ORs its patterns", {IMAGE: {"matches": ["nginx:*", "python:*"]}}, {"f1", "f2"}),
    ("notMatches excludes every pattern", {IMAGE: {"notMatches": ["nginx:*", "python:*"]}}, {"f3", "f4", "f5"}),
    ("% and _ are literal in eq", {PROCESS: {"eq": ["x%_y"]}}, {"f3"}),
    ("containerDetails.image is the same column", {"resource.containerDetails.image": {"eq": ["nginx:1.25"]}}, {"f1"}),
    ("containerDetails.name", {"resource.containerDetails.name": {"eq": ["app"]}}, {"f1", "f3"}),
    (
        "container name",
        {"resource.ecsClusterDetails.taskDetails.containers.name": {"neq": ["app"]}},
        {"f2", "f4", "f5"},
    ),
    ("ipv4", {IPV4: {"eq": ["203.0.113.5"]}}, {"f1"}),
    ("ipv6 is the same column", {IPV6: {"eq": ["2001:db8::1"]}}, {"f2"}),
    ("domain", {"service.action.dnsRequestAction.domain": {"matches": ["*.com"]}}, {"f2", "f3"}),
    ("actionType", {"service.action.actionType": {"eq": ["DNS_REQUEST"]}}, {"f2", "f3"}),
    (
        "threat list (two attributes, one column)",
        {
            "service.additionalInfo.threatListName": {"neq": ["ProofPoint"]},
            "service.evidence.threatIntelligenceDetails.threatListName": {"matches": ["*e*"]},
        },
        {"f3"},
    ),
    ("family (our extension)", {"resource.ecsClusterDetails.taskDetails.family": {"eq": ["web"]}}, {"f1", "f3"}),
    (
        "type eq ORs",
        {"type": {"eq": ["Execution:Runtime/ReverseShell", "Discovery:Runtime/SuspiciousCommand"]}},
        {"f1", "f2"},
    ),
    ("attributes AND", {"type": {"eq": ["Execution:Runtime/NewBinaryExecuted"]}, "severity": {"gte": 5}}, {"f5"}),
    ("id", {"id": {"eq": ["f1", "f3", "nope"]}}, {"f1", "f3"}),
    ("accountId and region", {"accountId": {"eq": ["111111111111"]}, "region": {"neq": ["us-east-1"]}}, set()),
    ("resourceType", {"resource.resourceType": {"eq": ["ECSCluster"]}}, ALL),
    ("featureName", {"service.featureName": {"eq": ["RuntimeMonitoring"]}}, ALL),
]
SPELLINGS = {
    "eq": "equals",
    "neq": "notEquals",
    "gt": "greaterThan",
    "gte": "greaterThanOrEqual",
    "lt": "lessThan",
    "lte": "lessThanOrEqual",
}


def respelled(criterion: dict[str, Any]) -> dict[str, Any] | None:
    out = {f: {SPELLINGS.get(op, op): v for op, v in cond.items()} for f, cond in criterion.items()}
    return out if out != criterion else None


@on_db
@pytest.mark.parametrize(("criterion", "expected"), [(c, e) for _, c, e in CASES], ids=[n for n, _, _ in CASES])
async def test_operator_selects_exactly(engine: AsyncEngine, criterion: dict[str, Any], expected: set[str]) -> None:
    assert await matching(engine, {"criterion": criterion}) == expected
    other = respelled(criterion)
    if other is not None:  # GuardDuty's long spelling of the same operators selects the same findings
        assert await matching(engine, {"criterion": other}) == expected


@on_db
@pytest.mark.parametrize("criteria", [None, {}, {"criterion": {}}, {"criterion": None}])
async def test_no_criteria_selects_everything(engine: AsyncEngine, criteria: Any) -> None:
    assert parse_finding_criteria(criteria) == []
    assert await matching(engine, criteria) == ALL


@on_db
async def test_same_query_shape_with_new_values_is_not_served_from_a_stale_cache(engine: AsyncEngine) -> None:
    # SQLAlchemy caches compiled statements by shape; the pattern constructs carry two binds, of which each
    # database uses one, and a reused statement must still bind this call's values
    assert await matching(engine, crit(**{CLUSTER: {"matches": ["pr*"]}})) == {"f1", "f2"}
    assert await matching(engine, crit(**{CLUSTER: {"matches": ["st*"]}})) == {"f3"}
    assert await matching(engine, crit(**{CLUSTER: {"notMatches": ["st*"]}})) == {"f1", "f2", "f4", "f5"}
    assert await matching(engine, crit(**{CLUSTER: {"notMatches": ["pr*"]}})) == {"f3", "f4", "f5"}


@on_db
async def test_compiles_over_an_alias_and_a_table(engine: AsyncEngine) -> None:
    criteria = crit(severity={"gte": 5}, **{CLUSTER: {"matches": ["pr*"]}})
    assert await matching(engine, criteria, aliased(FindingRow)) == {"f1", "f2"}
    assert await matching(engine, criteria, FindingRow.__table__) == {"f1", "f2"}


@on_db
@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ({"attributeName": "severity", "orderBy": "DESC"}, ["f3", "f1", "f5", "f2", "f4"]),
        ({"attributeName": "updatedAt", "orderBy": "ASC"}, ["f1", "f2", "f3", "f4", "f5"]),
        ({"attributeName": "service.count"}, ["f1", "f5", "f4", "f2", "f3"]),
    ],
)
async def test_sort_orders_findings(engine: AsyncEngine, sort: dict[str, Any], expected: list[str]) -> None:
    parsed = parse_sort(sort)
    assert parsed is not None
    column, descending = parsed
    col = getattr(FindingRow, column)
    stmt = (
        select(FindingRow.id)
        .where(FindingRow.detector_id == DETECTOR)
        .order_by(col.desc() if descending else col.asc(), FindingRow.id)
    )
    async with engine.connect() as conn:
        assert list((await conn.execute(stmt)).scalars()) == expected


# -- what parsing produces ----------------------------------------------------------------------------------------


def test_values_are_typed_by_the_attribute_kind() -> None:
    got = parse_finding_criteria(
        crit(
            severity={"equals": ["8", 7, "5.5"], "greaterThan": 4},
            updatedAt={"eq": ["1700000000000"], "lte": 1800000000000.0},
            **{
                "service.archived": {"eq": ["true", "FALSE", True]},
                CLUSTER: {"notMatches": ["a*"], "neq": None},
            },
        )
    )
    assert got == [
        Condition("severity", "eq", (8.0, 7.0, 5.5)),
        Condition("severity", "gt", (4,)),
        Condition("updatedAt", "eq", (1700000000000,)),
        Condition("updatedAt", "lte", (1800000000000,)),
        Condition("service.archived", "eq", (True, False, True)),
        Condition(CLUSTER, "not_matches", ("a*",)),
    ]
    assert all(isinstance(v, float) for v in got[0].values)
    assert isinstance(got[2].values[0], int) and isinstance(got[3].values[0], int)


def test_every_attribute_maps_to_a_findings_column_of_its_kind() -> None:
    kinds = {"str": (String, Text), "num": (Float, Integer), "time": (BigInteger,), "bool": (Boolean,)}
    columns = FindingRow.__table__.c
    for name, spec in FINDING_FIELDS.items():
        assert spec.column in columns, name
        assert isinstance(columns[spec.column].type, kinds[spec.kind]), (name, columns[spec.column].type)


def test_compiles_to_portable_sql_for_postgresql_and_glob_for_sqlite() -> None:
    criteria = crit(
        severity={"eq": ["8", "5"], "neq": ["2", "3"], "gt": 1, "gte": 2, "lt": 9, "lte": 10},
        **{IMAGE: {"matches": ["a%b_c/*"], "notMatches": ["x?"]}, "service.archived": {"eq": ["false"]}},
    )
    stmt = select(FindingRow.id).where(compile_conditions(parse_finding_criteria(criteria), FindingRow))
    pg_compiled = stmt.compile(dialect=postgresql.dialect())  # type: ignore[no-untyped-call]
    pg = str(pg_compiled)
    for fragment in (" IN (", " NOT IN (", "IS NULL", " > ", " >= ", " < ", " <= ", " LIKE ", "ESCAPE '/'", "NOT ("):
        assert fragment in pg, (fragment, pg)
    assert "GLOB" not in pg
    # one value is '=' / '!=': planners read an index in order for '=', not for IN
    one = str(
        select(FindingRow.id)
        .where(compile_conditions(parse_finding_criteria(crit(type={"eq": ["A"]}, region={"neq": ["B"]})), FindingRow))
        .compile(dialect=postgresql.dialect())  # type: ignore[no-untyped-call]
    )
    assert "findings.type = " in one and "findings.region != " in one and " IN (" not in one
    pg_values = pg_compiled.params
    # LIKE's wildcards in the value are escaped, GuardDuty's are translated
    assert "a/%b/_c//%" in pg_values.values()
    assert "x_" in pg_values.values()
    lite_compiled = stmt.compile(dialect=sqlite.dialect())
    lite = str(lite_compiled)
    assert " GLOB " in lite and " LIKE " not in lite
    assert "a%b_c/*" in lite_compiled.params.values()
    assert "a/%b/_c//%" not in lite_compiled.params.values()  # each database binds only its own pattern
    assert "a%b_c/*" not in pg_values.values()


# -- parse_sort -----------------------------------------------------------------------------------------------


def test_parse_sort() -> None:
    assert parse_sort(None) is None
    assert parse_sort({}) is None
    assert parse_sort({"attributeName": "severity", "orderBy": "DESC"}) == ("severity", True)
    assert parse_sort({"attributeName": "updatedAt", "orderBy": "ASC"}) == ("updated_at", False)
    assert parse_sort({"attributeName": IMAGE}) == ("image", False)
    fields = {"resources.ecsCluster.name": FieldSpec("cluster_name", "str")}
    assert parse_sort({"attributeName": "resources.ecsCluster.name"}, fields=fields) == ("cluster_name", False)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "sortCriteria: expected an object with attributeName and orderBy, got an empty list"),
        ({"orderBy": "ASC"}, "sortCriteria.attributeName: required to sort"),
        ({"attributeName": 3}, "sortCriteria.attributeName: expected a string, got the number 3"),
        (
            {"attributeName": "severty"},
            "sortCriteria.attributeName: cannot sort by 'severty' (did you mean 'severity'?)",
        ),
        (
            {"attributeName": "severity", "orderBy": "desc"},
            'sortCriteria.orderBy: expected "ASC" or "DESC", got \'desc\'',
        ),
        (
            {"attributeName": "severity", "OrderBy": "ASC"},
            "sortCriteria: unknown member 'OrderBy' (did you mean 'orderBy'?)",
        ),
    ],
)
def test_parse_sort_errors(obj: Any, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_sort(obj)
    assert info.value.message.startswith(message), info.value.message


def test_parse_sort_error_names_the_callers_place_and_fields() -> None:
    fields = {"resources.ecsCluster.name": FieldSpec("cluster_name", "str")}
    with pytest.raises(BadRequest) as info:
        parse_sort({"attributeName": "severity"}, fields=fields, where="sortBy")
    assert info.value.message == (
        "sortBy.attributeName: cannot sort by 'severity'; supported: resources.ecsCluster.name"
    )


# -- every validation message ---------------------------------------------------------------------------------

ERRORS: list[tuple[Any, str]] = [
    ([], 'findingCriteria: expected an object like {"criterion": {...}}, got an empty list'),
    (
        {"Criterion": {}},
        "findingCriteria: unknown member 'Criterion' (did you mean 'criterion'?); expected 'criterion'",
    ),
    ({"criterion": []}, "findingCriteria.criterion: expected an object of attribute -> condition, got an empty list"),
    (
        {"criterion": {f"a{i}": {"eq": ["x"]} for i in range(51)}},
        "findingCriteria.criterion: at most 50 attributes, got 51",
    ),
    (
        crit(severty={"gte": 7}),
        "findingCriteria.criterion: unknown attribute 'severty' (did you mean 'severity'?); "
        "supported: id, type, severity,",
    ),
    (
        crit(**{"resource.ecsClusterDetails.taskDetails.container.image": {"eq": ["x"]}}),
        f"findingCriteria.criterion: unknown attribute 'resource.ecsClusterDetails.taskDetails.container.image' "
        f"(did you mean '{IMAGE}'?)",
    ),
    (crit(nothingLikeIt={"eq": ["x"]}), "findingCriteria.criterion: unknown attribute 'nothingLikeIt'; supported: id,"),
    (crit(severity=7), "findingCriteria.criterion.severity: expected an object of operator -> value, got the number 7"),
    (crit(severity={}), "findingCriteria.criterion.severity: no operator; give one of eq, equals, neq,"),
    (crit(severity={"gte": None}), "findingCriteria.criterion.severity: no operator"),
    (
        crit(severity={"Gte": 7}),
        "findingCriteria.criterion.severity: unknown operator 'Gte' (did you mean 'gte'?); supported: eq,",
    ),
    (
        crit(severity={"greaterThen": 7}),
        "findingCriteria.criterion.severity: unknown operator 'greaterThen' (did you mean 'greaterThan'?)",
    ),
    (
        crit(severity={"eq": ["8"], "equals": ["9"]}),
        "findingCriteria.criterion.severity: 'eq' and 'equals' are the same operator; give it once",
    ),
    (crit(severity={"gte": "7"}), "findingCriteria.criterion.severity.gte: expected an integer, got '7'"),
    (crit(severity={"gte": 7.5}), "findingCriteria.criterion.severity.gte: expected an integer, got the number 7.5"),
    (crit(severity={"lt": True}), "findingCriteria.criterion.severity.lt: expected an integer, got a boolean"),
    (
        crit(updatedAt={"greaterThan": "2024-01-01T00:00:00Z"}),
        "findingCriteria.criterion.updatedAt.greaterThan: expected an integer (epoch milliseconds), "
        "got '2024-01-01T00:00:00Z'",
    ),
    (
        crit(updatedAt={"eq": ["1700000000000", "2024-01-01T00:00:00Z"]}),
        "findingCriteria.criterion.updatedAt.eq[1]: times are compared as epoch milliseconds "
        "(an integer such as \"1700000000000\"), got '2024-01-01T00:00:00Z'",
    ),
    (crit(updatedAt={"eq": [1.5]}), "findingCriteria.criterion.updatedAt.eq[0]: times are compared as epoch"),
    (crit(severity={"eq": ["high"]}), "findingCriteria.criterion.severity.eq[0]: expected a number, got 'high'"),
    (crit(severity={"eq": ["nan"]}), "findingCriteria.criterion.severity.eq[0]: expected a number, got 'nan'"),
    (crit(severity={"neq": [None]}), "findingCriteria.criterion.severity.neq[0]: expected a number, got null"),
    (
        crit(**{"service.archived": {"eq": ["yes"]}}),
        'findingCriteria.criterion.service.archived.eq[0]: expected "true" or "false", got \'yes\'',
    ),
    (
        crit(**{"service.archived": {"gt": 0}}),
        "findingCriteria.criterion.service.archived.gt: 'service.archived' is true or false; comparisons apply to "
        "numbers and times (use eq or neq)",
    ),
    (crit(type={"lessThan": 3}), "findingCriteria.criterion.type.lessThan: 'type' is text; comparisons apply to"),
    (
        crit(severity={"matches": ["8*"]}),
        "findingCriteria.criterion.severity.matches: wildcard patterns apply to text attributes; "
        "'severity' is a number",
    ),
    (
        crit(updatedAt={"notMatches": ["1*"]}),
        "findingCriteria.criterion.updatedAt.notMatches: wildcard patterns apply to text attributes; "
        "'updatedAt' is a time",
    ),
    (
        crit(type={"eq": "x"}),
        "findingCriteria.criterion.type.eq: expected a non-empty list of strings, got the string 'x'",
    ),
    (
        crit(type={"neq": []}),
        "findingCriteria.criterion.type.neq: expected a non-empty list of strings, got an empty list",
    ),
    (
        crit(accountId={"eq": [111111111111]}),
        "findingCriteria.criterion.accountId.eq[0]: expected a string, got the number",
    ),
    (crit(type={"eq": ["x"] * 51}), "findingCriteria.criterion.type.eq: at most 50 values, got 51"),
    (crit(type={"eq": ["x" * 1025]}), "findingCriteria.criterion.type.eq[0]: at most 1024 characters"),
    (crit(type={"matches": [""]}), "findingCriteria.criterion.type.matches[0]: an empty pattern matches nothing"),
]


@pytest.mark.parametrize(("criteria", "message"), ERRORS, ids=[re.sub(r"\W+", "-", m[:60]) for _, m in ERRORS])
def test_invalid_criteria_are_refused_naming_the_place(criteria: Any, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_finding_criteria(criteria)
    assert info.value.message.startswith(message), info.value.message
    assert (info.value.code, info.value.status) == ("BadRequestException", 400)


def test_error_place_starts_with_the_callers_name() -> None:
    with pytest.raises(BadRequest) as info:
        parse_finding_criteria(crit(severity={"gte": "x"}), where="findingStatisticTypes.findingCriteria")
    assert info.value.message.startswith("findingStatisticTypes.findingCriteria.criterion.severity.gte: ")


def test_unknown_attribute_message_lists_every_supported_attribute() -> None:
    with pytest.raises(BadRequest) as info:
        parse_finding_criteria(crit(bogus={"eq": ["x"]}))
    listed = info.value.message.split("supported: ", 1)[1].split(", ")
    assert listed == list(FINDING_FIELDS)

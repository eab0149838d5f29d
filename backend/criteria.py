"""GuardDuty's FindingCriteria and SortCriteria: parsed, validated and compiled to SQL over ``FindingRow``.

The wire form (restJson1) is ``{"criterion": {<attribute>: {<operator>: <value>, ...}, ...}}``. Operators come
in two spellings (``eq``/``equals``, ``gt``/``greaterThan`` ...); ``eq``/``neq``/``matches``/``notMatches`` take
lists of strings, the comparisons an integer (epoch milliseconds for times). Attributes are ANDed, the values
of one ``eq`` or ``matches`` are ORed.

Semantics where GuardDuty leaves room:
- A finding without the attribute (NULL column) never equals, matches or compares to a value, and is never
  excluded by ``neq``/``notMatches``: "not this value" holds for a finding that has no value.
- ``matches`` patterns take ``*`` (any run of characters) and ``?`` (one character); everything else is
  literal. Matching is case-sensitive on every database, as ``eq`` is (SQLite's LIKE is not, so SQLite runs
  GLOB; PostgreSQL runs LIKE with an escape character).
- Times are epoch milliseconds, in ``eq`` too (as strings: ``["1700000000000"]``).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import BigInteger, Boolean, ColumnElement, Float, String, and_, literal, not_, or_, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from backend.errors import BadRequest

Kind = Literal["str", "num", "time", "bool"]
Op = Literal["eq", "neq", "gt", "gte", "lt", "lte", "matches", "not_matches"]
Value = str | float | int | bool

# GuardDuty: at most 50 attributes per criteria and 50 values per Eq/Neq.
MAX_ATTRIBUTES = 50
MAX_VALUES = 50
MAX_VALUE_CHARS = 1024
EPOCH_MS_RE = re.compile(r"-?[0-9]{1,19}")


@dataclass(frozen=True)
class FieldSpec:
    """Where a GuardDuty finding attribute is stored, and how its values compare."""

    column: str
    kind: Kind


FINDING_FIELDS: dict[str, FieldSpec] = {
    "id": FieldSpec("id", "str"),
    "type": FieldSpec("type", "str"),
    "severity": FieldSpec("severity", "num"),
    "accountId": FieldSpec("account_id", "str"),
    "region": FieldSpec("region", "str"),
    "createdAt": FieldSpec("created_at", "time"),
    "updatedAt": FieldSpec("updated_at", "time"),
    "service.archived": FieldSpec("archived", "bool"),
    "service.count": FieldSpec("count", "num"),
    "service.eventFirstSeen": FieldSpec("first_seen", "time"),
    "service.eventLastSeen": FieldSpec("last_seen", "time"),
    "service.featureName": FieldSpec("feature_name", "str"),
    "service.action.actionType": FieldSpec("action_type", "str"),
    "service.action.networkConnectionAction.remoteIpDetails.ipAddressV4": FieldSpec("remote_ip", "str"),
    "service.action.networkConnectionAction.remoteIpDetails.ipAddressV6": FieldSpec("remote_ip", "str"),
    "service.action.dnsRequestAction.domain": FieldSpec("domain", "str"),
    "service.runtimeDetails.process.executablePath": FieldSpec("executable_path", "str"),
    "service.runtimeDetails.process.name": FieldSpec("process_name", "str"),
    "service.runtimeDetails.process.executableSha256": FieldSpec("executable_sha256", "str"),
    "service.evidence.threatIntelligenceDetails.threatListName": FieldSpec("threat_list_name", "str"),
    "service.additionalInfo.threatListName": FieldSpec("threat_list_name", "str"),
    "resource.resourceType": FieldSpec("resource_type", "str"),
    "resource.ecsClusterDetails.name": FieldSpec("cluster_name", "str"),
    "resource.ecsClusterDetails.arn": FieldSpec("cluster_arn", "str"),
    "resource.ecsClusterDetails.taskDetails.arn": FieldSpec("task_arn", "str"),
    "resource.ecsClusterDetails.taskDetails.definitionArn": FieldSpec("task_definition_arn", "str"),
    # Our extension: GuardDuty has no family attribute, but "all tasks of this service" is the common filter.
    "resource.ecsClusterDetails.taskDetails.family": FieldSpec("task_family", "str"),
    "resource.ecsClusterDetails.taskDetails.containers.name": FieldSpec("container_name", "str"),
    "resource.ecsClusterDetails.taskDetails.containers.image": FieldSpec("image", "str"),
    "resource.containerDetails.name": FieldSpec("container_name", "str"),
    "resource.containerDetails.image": FieldSpec("image", "str"),
}

# wire name -> operator; both of GuardDuty's spellings
OPERATORS: dict[str, Op] = {
    "eq": "eq",
    "equals": "eq",
    "neq": "neq",
    "notEquals": "neq",
    "gt": "gt",
    "greaterThan": "gt",
    "gte": "gte",
    "greaterThanOrEqual": "gte",
    "lt": "lt",
    "lessThan": "lt",
    "lte": "lte",
    "lessThanOrEqual": "lte",
    "matches": "matches",
    "notMatches": "not_matches",
}
LIST_OPS: frozenset[Op] = frozenset({"eq", "neq", "matches", "not_matches"})
WILDCARD_OPS: frozenset[Op] = frozenset({"matches", "not_matches"})


@dataclass(frozen=True)
class Condition:
    """One operator on one attribute: ``field`` is the GuardDuty attribute name, ``values`` typed by its kind."""

    field: str
    op: Op
    values: tuple[Value, ...]


# -- parsing ------------------------------------------------------------------------------------------------------


def parse_finding_criteria(obj: Any, *, where: str = "findingCriteria") -> list[Condition]:
    """The conditions of a wire-form FindingCriteria (None or empty: none), or BadRequest naming the exact place."""
    if obj is None:
        return []
    if not isinstance(obj, dict):
        raise BadRequest(f'{where}: expected an object like {{"criterion": {{...}}}}, got {_kind_of(obj)}')
    for key in obj:
        if key != "criterion":
            raise BadRequest(f"{where}: unknown member {key!r}{_suggest(key, ['criterion'])}; expected 'criterion'")
    criterion = obj.get("criterion")
    if criterion is None:
        return []
    where = f"{where}.criterion"
    if not isinstance(criterion, dict):
        raise BadRequest(f"{where}: expected an object of attribute -> condition, got {_kind_of(criterion)}")
    if len(criterion) > MAX_ATTRIBUTES:
        raise BadRequest(f"{where}: at most {MAX_ATTRIBUTES} attributes, got {len(criterion)}")
    conditions: list[Condition] = []
    for name, condition in criterion.items():
        spec = FINDING_FIELDS.get(name)
        if spec is None:
            raise BadRequest(
                f"{where}: unknown attribute {name!r}{_suggest(name, FINDING_FIELDS)}; "
                f"supported: {', '.join(FINDING_FIELDS)}"
            )
        conditions.extend(_parse_condition(name, spec, condition, f"{where}.{name}"))
    return conditions


def _parse_condition(name: str, spec: FieldSpec, condition: Any, where: str) -> list[Condition]:
    if not isinstance(condition, dict):
        raise BadRequest(f"{where}: expected an object of operator -> value, got {_kind_of(condition)}")
    out: list[Condition] = []
    seen: dict[Op, str] = {}
    for wire_op, raw in condition.items():
        op = OPERATORS.get(wire_op)
        if op is None:
            raise BadRequest(
                f"{where}: unknown operator {wire_op!r}{_suggest(wire_op, OPERATORS)}; "
                f"supported: {', '.join(OPERATORS)}"
            )
        if raw is None:  # some clients send every member, unset ones as null
            continue
        if op in seen:
            raise BadRequest(f"{where}: {seen[op]!r} and {wire_op!r} are the same operator; give it once")
        seen[op] = wire_op
        here = f"{where}.{wire_op}"
        if op in WILDCARD_OPS and spec.kind != "str":
            raise BadRequest(
                f"{here}: wildcard patterns apply to text attributes; {name!r} is {_KIND_NAMES[spec.kind]}"
            )
        if op in LIST_OPS:
            out.append(Condition(name, op, _parse_list(spec, raw, here, wildcard=op in WILDCARD_OPS)))
        else:
            if spec.kind in ("str", "bool"):
                instead = "eq or neq" if spec.kind == "bool" else "eq, neq, matches or notMatches"
                raise BadRequest(
                    f"{here}: {name!r} is {_KIND_NAMES[spec.kind]}; comparisons apply to numbers and times "
                    f"(use {instead})"
                )
            out.append(Condition(name, op, (_parse_integer(raw, here, spec.kind),)))
    if not out:
        raise BadRequest(f"{where}: no operator; give one of {', '.join(OPERATORS)}")
    return out


def _parse_list(spec: FieldSpec, raw: Any, where: str, *, wildcard: bool) -> tuple[Value, ...]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"{where}: expected a non-empty list of strings, got {_kind_of(raw)}")
    if len(raw) > MAX_VALUES:
        raise BadRequest(f"{where}: at most {MAX_VALUES} values, got {len(raw)}")
    values: list[Value] = []
    for i, v in enumerate(raw):
        values.append(_parse_value(spec, v, f"{where}[{i}]", wildcard=wildcard))
    return tuple(values)


def _parse_value(spec: FieldSpec, v: Any, where: str, *, wildcard: bool) -> Value:
    if isinstance(v, str) and len(v) > MAX_VALUE_CHARS:
        raise BadRequest(f"{where}: at most {MAX_VALUE_CHARS} characters")
    if spec.kind == "str":
        if not isinstance(v, str):
            raise BadRequest(f"{where}: expected a string, got {_kind_of(v)}")
        if wildcard and not v:
            raise BadRequest(f"{where}: an empty pattern matches nothing; use '*' to match any value")
        return v
    if spec.kind == "bool":
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise BadRequest(f'{where}: expected "true" or "false", got {_show(v)}')
    if spec.kind == "time":
        if isinstance(v, str) and EPOCH_MS_RE.fullmatch(v.strip()):
            return int(v.strip())
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise BadRequest(
            f'{where}: times are compared as epoch milliseconds (an integer such as "1700000000000"), got {_show(v)}'
        )
    # num
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            number = float(v)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    raise BadRequest(f"{where}: expected a number, got {_show(v)}")


def _parse_integer(raw: Any, where: str, kind: Kind) -> int:
    if isinstance(raw, bool) or not (isinstance(raw, int) or (isinstance(raw, float) and raw.is_integer())):
        unit = " (epoch milliseconds)" if kind == "time" else ""
        raise BadRequest(f"{where}: expected an integer{unit}, got {_show(raw)}")
    return int(raw)


def parse_sort(
    obj: Any, *, fields: Mapping[str, FieldSpec] = FINDING_FIELDS, where: str = "sortCriteria"
) -> tuple[str, bool] | None:
    """(column, descending) from ``{"attributeName": ..., "orderBy": "ASC"|"DESC"}``; None when not given."""
    if obj is None or obj == {}:
        return None
    if not isinstance(obj, dict):
        raise BadRequest(f"{where}: expected an object with attributeName and orderBy, got {_kind_of(obj)}")
    for key in obj:
        if key not in ("attributeName", "orderBy"):
            raise BadRequest(
                f"{where}: unknown member {key!r}{_suggest(key, ['attributeName', 'orderBy'])}; "
                "expected attributeName and orderBy"
            )
    name = obj.get("attributeName")
    order = obj.get("orderBy")
    if name is None:
        raise BadRequest(f"{where}.attributeName: required to sort")
    if not isinstance(name, str):
        raise BadRequest(f"{where}.attributeName: expected a string, got {_kind_of(name)}")
    spec = fields.get(name)
    if spec is None:
        raise BadRequest(
            f"{where}.attributeName: cannot sort by {name!r}{_suggest(name, fields)}; supported: {', '.join(fields)}"
        )
    if order is None:
        return spec.column, False
    if order not in ("ASC", "DESC"):
        raise BadRequest(f'{where}.orderBy: expected "ASC" or "DESC", got {_show(order)}')
    return spec.column, order == "DESC"


# -- compiling ----------------------------------------------------------------------------------------------------


def compile_conditions(conditions: Sequence[Condition], table: Any) -> ColumnElement[bool]:
    """The SQL condition for ``conditions`` over ``table`` (the FindingRow class, an alias of it, or a Table)."""
    if not conditions:
        return true()
    return and_(*(_compile(c, _column(table, FINDING_FIELDS[c.field].column)) for c in conditions))


def _column(table: Any, name: str) -> Any:
    columns = getattr(table, "c", None)  # a Table or subquery; ORM classes and aliases have attributes
    return columns[name] if columns is not None else getattr(table, name)


def _compile(c: Condition, col: Any) -> ColumnElement[bool]:
    values = [_bind(v) for v in c.values]
    if c.op == "eq":
        # one value: '=' lets the planners read the (column, updated_at, id) indexes in order; IN does not
        return (col == values[0]) if len(values) == 1 else col.in_(values)  # type: ignore[no-any-return]
    if c.op == "neq":
        return or_(col.is_(None), col != values[0] if len(values) == 1 else col.not_in(values))
    if c.op == "gt":
        return col > values[0]  # type: ignore[no-any-return]
    if c.op == "gte":
        return col >= values[0]  # type: ignore[no-any-return]
    if c.op == "lt":
        return col < values[0]  # type: ignore[no-any-return]
    if c.op == "lte":
        return col <= values[0]  # type: ignore[no-any-return]
    matches = [WildcardMatch(col, str(v)) for v in c.values]
    if c.op == "matches":
        return or_(*matches)
    return or_(col.is_(None), and_(*(not_(m) for m in matches)))


def _bind(v: Value) -> ColumnElement[Any]:
    # Each value is bound with its own type, not the column's: asyncpg refuses a float for an integer column
    # (service.count gt 2.5 is a fair question), while PostgreSQL compares integer and float columns freely.
    if isinstance(v, bool):
        return literal(v, Boolean())
    if isinstance(v, int):
        return literal(v, BigInteger())
    if isinstance(v, float):
        return literal(v, Float())
    return literal(v, String())


class WildcardMatch(FunctionElement[bool]):
    """``column`` matches a GuardDuty pattern (``*``, ``?``), case-sensitively: GLOB on SQLite, LIKE elsewhere."""

    type = Boolean()
    inherit_cache = True
    name = "wildcard_match"

    def __init__(self, column: Any, pattern: str) -> None:
        super().__init__(column, literal(to_like(pattern), String()), literal(to_glob(pattern), String()))


LIKE_ESCAPE = "/"


def to_like(pattern: str) -> str:
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in ("%", "_", LIKE_ESCAPE):
            out.append(LIKE_ESCAPE + ch)
        else:
            out.append(ch)
    return "".join(out)


def to_glob(pattern: str) -> str:
    # GLOB's own wildcards are * and ?, as GuardDuty's; only '[' (a character class) must be made literal.
    return pattern.replace("[", "[[]")


@compiles(WildcardMatch)
def _compile_like(element: WildcardMatch, compiler: SQLCompiler, **kw: Any) -> str:
    column, like, _ = list(element.clauses)
    return f"({compiler.process(column, **kw)} LIKE {compiler.process(like, **kw)} ESCAPE '{LIKE_ESCAPE}')"


@compiles(WildcardMatch, "sqlite")
def _compile_glob(element: WildcardMatch, compiler: SQLCompiler, **kw: Any) -> str:
    column, _, glob = list(element.clauses)
    return f"({compiler.process(column, **kw)} GLOB {compiler.process(glob, **kw)})"


# -- messages -----------------------------------------------------------------------------------------------------

_KIND_NAMES: dict[Kind, str] = {"str": "text", "num": "a number", "time": "a time", "bool": "true or false"}


def _suggest(name: str, choices: Any) -> str:
    options = list(choices)
    # a wrong case is the commonest slip (boto3's "Gte" sent as is): it wins over any near spelling
    lowered = {o.lower(): o for o in options}
    close = [lowered[name.lower()]] if name.lower() in lowered else []
    close = close or difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind_of(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {v[:80]!r}"
    if isinstance(v, list):
        return "an empty list" if not v else "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _show(v: Any) -> str:
    if isinstance(v, str):
        return repr(v[:80])
    return _kind_of(v)

"""User rules: conditions on event fields, compiled once, that emit a catalog type or a custom one.

A rule (see detectors/policy.py for the document) names the event kinds it
reads and a condition: ``all``/``any``/``not`` nodes over leaves
``{field: process.name, in: [curl, wget]}``. Conditions compile to closures:
each leaf holds its field getter and a matcher built once (a frozenset for
``in``, one regex for a list of globs, parsed networks for ``cidr``, a suffix
set for ``domain``), so an event costs a dict lookup of its kind plus the
leaves of the rules that read that kind.

The same fields and operators serve the policy's exceptions, which match a
:class:`~detectors.base.Detection` instead of an event: each field has two
getters, one per subject (:data:`EVENT_FIELDS`, :data:`DETECTION_FIELDS`).

Missing values (a DNS query nobody could be tied to has no process) never
match a positive operator, so ``not`` of such a leaf is true.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from detectors import catalog
from detectors.base import Detection, Detector, DetectorContext, dns_action, network_action, normalize_domain

# The event kinds the collectors produce (the brief's list; a rule naming another kind would never run).
EVENT_KINDS = frozenset(
    {
        "process.exec",
        "process.exit",
        "process.stdio_socket",
        "net.connect",
        "net.accept",
        "net.listen",
        "net.udp",
        "net.close",
        "net.unix_connect",
        "net.syn",
        "dns.query",
        "dns.response",
        "file.modify",
        "proc.ptrace",
        "proc.fileless",
        "proc.mem_write",
        "proc.userfaultfd",
        "proc.library",
        "proc.uid_change",
        "mount.add",
        "mount.remove",
        "kernel.module",
    }
)
_ENDPOINT_KINDS = frozenset(
    {"net.connect", "net.accept", "net.listen", "net.udp", "net.close", "net.syn", "process.stdio_socket"}
)
_DNS_KINDS = frozenset({"dns.query", "dns.response"})

OPERATORS = (
    "equals",
    "in",
    "contains",
    "startswith",
    "endswith",
    "glob",
    "regex",
    "cidr",
    "domain",
    "gt",
    "lt",
)
# Longest regex a rule may hold, and the shape of the nested quantifiers that backtrack exponentially
# ("(a+)+", "(.*)*", "(x|y+)*"): Python's re has no time limit, and a rule runs on every command line.
MAX_REGEX_CHARS = 1000
_ATOM = re.compile(r"\\.|\[\^?\]?(?:\\.|[^\]])*\]|.", re.S)
_QUANT = re.compile(r"[?*+]|\{\d*(?:,\d*)?\}")


class ConditionError(ValueError):
    """One problem in a rule or exception, at ``loc`` (like ``rules[2].condition.all[1]``)."""

    def __init__(self, loc: str, message: str) -> None:
        super().__init__(f"{loc}: {message}")
        self.loc = loc
        self.message = message


# -- fields ---------------------------------------------------------------------------------------------------

EventGetter = Callable[[RuntimeEvent, DetectorContext | None], Any]
DetectionGetter = Callable[[Detection, DetectorContext | None], Any]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    # "str", "int", "ip", "domain"
    kind: str
    # event kinds that carry the field (None: every kind with a process)
    kinds: frozenset[str] | None
    # the getter returns a tuple of values, any of which may match (ancestor.name)
    multi: bool = False


def _proc_attr(attr: str) -> EventGetter:
    def get(ev: RuntimeEvent, ctx: DetectorContext | None) -> Any:
        p = ev.process
        return getattr(p, attr) if p is not None else None

    return get


def _parent_attr(attr: str) -> EventGetter:
    def get(ev: RuntimeEvent, ctx: DetectorContext | None) -> Any:
        p = ev.process
        if p is None or ctx is None:
            return None
        parent = ctx.parent(p)
        return getattr(parent, attr) if parent is not None else None

    return get


def _ancestor_names(p: ProcessInfo | None, ctx: DetectorContext | None) -> tuple[str, ...] | None:
    if p is None or ctx is None:
        return None
    return tuple(a.name for a in ctx.lineage(p))


def _event_container(ev: RuntimeEvent) -> ContainerRef | None:
    if ev.process is not None and ev.process.container is not None:
        return ev.process.container
    data = ev.data
    if data and (data.get("containerName") or data.get("containerId")):
        return ContainerRef(name=data.get("containerName"), id=data.get("containerId"), source="event")
    return None


def _event_data(key: str, kinds: frozenset[str] | None = None) -> EventGetter:
    def get(ev: RuntimeEvent, ctx: DetectorContext | None) -> Any:
        if kinds is not None and ev.kind not in kinds:
            return None
        return ev.data.get(key) if ev.data else None

    return get


def _event_domain(ev: RuntimeEvent, ctx: DetectorContext | None) -> str | None:
    if ev.kind not in _DNS_KINDS or not ev.data:
        return None
    return normalize_domain(ev.data.get("queryName")) or None


def _event_container_attr(attr: str) -> EventGetter:
    def get(ev: RuntimeEvent, ctx: DetectorContext | None) -> Any:
        c = _event_container(ev)
        return getattr(c, attr) if c is not None else None

    return get


_DATA_KINDS = _ENDPOINT_KINDS | _DNS_KINDS
FIELDS: dict[str, FieldSpec] = {
    f.name: f
    for f in (
        FieldSpec("event.kind", "str", frozenset(EVENT_KINDS)),
        FieldSpec("process.name", "str", None),
        FieldSpec("process.executable", "str", None),
        FieldSpec("process.command_line", "str", None),
        FieldSpec("process.uid", "int", None),
        FieldSpec("process.euid", "int", None),
        FieldSpec("process.user", "str", None),
        FieldSpec("parent.name", "str", None),
        FieldSpec("parent.executable", "str", None),
        FieldSpec("parent.command_line", "str", None),
        FieldSpec("ancestor.name", "str", None, multi=True),
        FieldSpec("container.name", "str", None),
        FieldSpec("container.image", "str", None),
        FieldSpec("remote.ip", "ip", _DATA_KINDS),
        FieldSpec("remote.port", "int", _DATA_KINDS),
        FieldSpec("local.port", "int", _DATA_KINDS),
        FieldSpec("dns.domain", "domain", _DNS_KINDS),
        FieldSpec("file.path", "str", frozenset({"file.modify"})),
        FieldSpec("file.operation", "str", frozenset({"file.modify"})),
        FieldSpec("file.category", "str", frozenset({"file.modify"})),
    )
}

EVENT_FIELDS: dict[str, EventGetter] = {
    "event.kind": lambda ev, ctx: ev.kind,
    "process.name": _proc_attr("name"),
    "process.executable": _proc_attr("executable_path"),
    "process.command_line": _proc_attr("command_line"),
    "process.uid": _proc_attr("uid"),
    "process.euid": _proc_attr("euid"),
    "process.user": _proc_attr("user"),
    "parent.name": _parent_attr("name"),
    "parent.executable": _parent_attr("executable_path"),
    "parent.command_line": _parent_attr("command_line"),
    "ancestor.name": lambda ev, ctx: _ancestor_names(ev.process, ctx),
    "container.name": _event_container_attr("name"),
    "container.image": _event_container_attr("image"),
    "remote.ip": _event_data("remoteIp", _DATA_KINDS),
    "remote.port": _event_data("remotePort", _DATA_KINDS),
    "local.port": _event_data("localPort", _DATA_KINDS),
    "dns.domain": _event_domain,
    "file.path": _event_data("filePath", frozenset({"file.modify"})),
    "file.operation": _event_data("fileOperation", frozenset({"file.modify"})),
    "file.category": _event_data("category", frozenset({"file.modify"})),
}


# What a detection carries: its process, its container, and the endpoint/domain/file in its action,
# context or template facts (detectors put them in one of those, depending on the type).
def _det_proc(attr: str) -> DetectionGetter:
    def get(d: Detection, ctx: DetectorContext | None) -> Any:
        return getattr(d.process, attr) if d.process is not None else None

    return get


def _det_parent(attr: str) -> DetectionGetter:
    def get(d: Detection, ctx: DetectorContext | None) -> Any:
        if d.process is None or ctx is None:
            return None
        parent = ctx.parent(d.process)
        return getattr(parent, attr) if parent is not None else None

    return get


def _det_container(attr: str) -> DetectionGetter:
    def get(d: Detection, ctx: DetectorContext | None) -> Any:
        where = d.where
        return getattr(where, attr) if where is not None else None

    return get


def _conn(d: Detection) -> dict[str, Any]:
    act = d.action
    if act and isinstance(act.get("networkConnectionAction"), dict):
        conn: dict[str, Any] = act["networkConnectionAction"]
        return conn
    return {}


def _det_remote_ip(d: Detection, ctx: DetectorContext | None) -> Any:
    ipd = _conn(d).get("remoteIpDetails") or {}
    return ipd.get("ipAddressV4") or ipd.get("ipAddressV6") or d.facts.get("remoteIp") or d.context.get("remoteIp")


def _det_port(which: str, fact: str) -> DetectionGetter:
    def get(d: Detection, ctx: DetectorContext | None) -> Any:
        port = (_conn(d).get(which) or {}).get("port")
        return port if port is not None else d.facts.get(fact, d.context.get(fact))

    return get


def _det_domain(d: Detection, ctx: DetectorContext | None) -> Any:
    act = d.action
    dom = None
    if act and isinstance(act.get("dnsRequestAction"), dict):
        dom = act["dnsRequestAction"].get("domain")
    dom = dom or d.facts.get("domain") or d.context.get("domain")
    return (normalize_domain(dom) or None) if isinstance(dom, str) else None


def _det_fact(key: str) -> DetectionGetter:
    def get(d: Detection, ctx: DetectorContext | None) -> Any:
        v = d.context.get(key)
        return v if v is not None else d.facts.get(key)

    return get


DETECTION_FIELDS: dict[str, DetectionGetter] = {
    "process.name": _det_proc("name"),
    "process.executable": _det_proc("executable_path"),
    "process.command_line": _det_proc("command_line"),
    "process.uid": _det_proc("uid"),
    "process.euid": _det_proc("euid"),
    "process.user": _det_proc("user"),
    "parent.name": _det_parent("name"),
    "parent.executable": _det_parent("executable_path"),
    "parent.command_line": _det_parent("command_line"),
    "ancestor.name": lambda d, ctx: _ancestor_names(d.process, ctx),
    "container.name": _det_container("name"),
    "container.image": _det_container("image"),
    "remote.ip": _det_remote_ip,
    "remote.port": _det_port("remotePortDetails", "remotePort"),
    "local.port": _det_port("localPortDetails", "localPort"),
    "dns.domain": _det_domain,
    "file.path": _det_fact("filePath"),
    "file.operation": _det_fact("fileOperation"),
    "file.category": _det_fact("category"),
}


# -- operators ------------------------------------------------------------------------------------------------

Predicate = Callable[[Any], bool]
Lists = Mapping[str, Sequence[Any]]


def _group_end(pattern: str, start: int) -> int:
    """Index of the ')' closing the group opened at ``start`` (or len(pattern))."""
    depth, i = 0, start
    while i < len(pattern):
        m = _ATOM.match(pattern, i)
        assert m is not None
        tok = m.group()
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
            if depth == 0:
                return i
        i = m.end()
    return len(pattern)


def _branch_can_be_empty_and_repeats(branch: str) -> bool:
    """A branch whose every atom is optional or repeated (``\\w+\\s?``): nothing anchors an iteration."""
    i, mandatory, repeated = 0, False, False
    while i < len(branch):
        if branch[i] == "(":
            end = _group_end(branch, i)
            tok_end = end + 1
        else:
            m = _ATOM.match(branch, i)
            assert m is not None
            tok_end = m.end()
        q = _QUANT.match(branch, tok_end)
        if q is None:
            if branch[i] not in "^$":
                mandatory = True
        else:
            repeated = repeated or q.group() in ("*", "+") or "," in q.group()
            tok_end = q.end()
            if tok_end < len(branch) and branch[tok_end] in "?+":  # lazy/possessive marker
                tok_end += 1
        i = tok_end
    return repeated and not mandatory


def _split_branches(inner: str) -> list[str]:
    out, depth, start, i = [], 0, 0, 0
    while i < len(inner):
        m = _ATOM.match(inner, i)
        assert m is not None
        tok = m.group()
        depth += tok == "("
        depth -= tok == ")"
        if tok == "|" and depth == 0:
            out.append(inner[start:i])
            start = m.end()
        i = m.end()
    out.append(inner[start:])
    return out


def nested_quantifier(pattern: str) -> bool:
    """A repeated group whose body can match in many ways with nothing mandatory in it: ``(a+)+``, ``(\\w+\\s?)*``,
    ``(.*)*``. ``(\\w+\\.)+`` is fine: each iteration must end with a dot."""
    i = 0
    while i < len(pattern):
        m = _ATOM.match(pattern, i)
        assert m is not None
        if m.group() == "(":
            end = _group_end(pattern, i)
            q = _QUANT.match(pattern, end + 1)
            if q is not None and (q.group() in ("*", "+") or "," in q.group()):
                inner = pattern[i + 1 : end]
                if inner.startswith("?"):  # (?:...), (?P<name>...), lookarounds
                    inner = re.sub(r"^\?(?:P<\w+>|[:=!]|<[=!])", "", inner)
                if any(_branch_can_be_empty_and_repeats(b) for b in _split_branches(inner)):
                    return True
        i = m.end()
    return False


def check_regex(pattern: str, loc: str) -> re.Pattern[str]:
    if len(pattern) > MAX_REGEX_CHARS:
        raise ConditionError(loc, f"regex longer than {MAX_REGEX_CHARS} characters")
    if nested_quantifier(pattern):
        raise ConditionError(
            loc,
            f"regex {pattern!r} nests a quantifier inside a repeated group, which can backtrack "
            "catastrophically on long command lines; rewrite it without the outer repetition",
        )
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConditionError(loc, f"bad regex {pattern!r}: {exc}") from None


def _values(value: Any, lists: Lists, loc: str, op: str) -> list[Any]:
    """An operand as a list: a scalar, a list, or "@name" (a named list), lists may mix both."""
    raw = value if isinstance(value, list) else [value]
    out: list[Any] = []
    for v in raw:
        if isinstance(v, str) and v.startswith("@"):
            name = v[1:]
            if name not in lists:
                known = ", ".join(sorted(lists)) or "none defined"
                raise ConditionError(loc, f"unknown named list {v!r} (lists: {known})")
            out.extend(lists[name])
        elif isinstance(v, dict | list) or v is None:
            raise ConditionError(loc, f"{op}: expected a string or number or a list of them, got {v!r}")
        else:
            out.append(v)
    if not out:
        raise ConditionError(loc, f"{op}: empty list")
    return out


def _strings(vals: list[Any], loc: str, op: str) -> list[str]:
    for v in vals:
        if not isinstance(v, str):
            raise ConditionError(loc, f"{op}: expected strings, got {v!r}")
    return vals


def _ints(vals: list[Any], loc: str, op: str) -> list[int]:
    out = []
    for v in vals:
        if isinstance(v, bool):
            raise ConditionError(loc, f"{op}: expected a number, got {v!r}")
        if isinstance(v, int):
            out.append(v)
        elif isinstance(v, str) and v.strip().lstrip("-").isdigit():
            out.append(int(v))
        else:
            raise ConditionError(loc, f"{op}: expected a number, got {v!r}")
    return out


def _domain_suffixes(vals: list[str]) -> tuple[frozenset[str], frozenset[str]]:
    """(names matched with their subdomains, names matched only below them: "*.corp.example")."""
    with_self, below = set(), set()
    for v in vals:
        d = normalize_domain(v)
        if d.startswith("*."):
            below.add(d[2:])
        else:
            with_self.add(d)
    return frozenset(with_self), frozenset(below)


def compile_operator(spec: FieldSpec, op: str, value: Any, lists: Lists, loc: str) -> Predicate:
    """A predicate on one value of the field (never None: the caller handles missing values)."""
    if op not in OPERATORS:
        raise ConditionError(loc, f"unknown operator {op!r} (known: {', '.join(OPERATORS)})")
    if op in ("gt", "lt"):
        if spec.kind != "int":
            raise ConditionError(loc, f"{op} needs a numeric field, {spec.name!r} is not one")
        if isinstance(value, list) or (isinstance(value, str) and value.startswith("@")):
            raise ConditionError(loc, f"{op}: expected one number, got {value!r}")
        (n,) = _ints([value], loc, op)
        return (lambda v: isinstance(v, int) and v > n) if op == "gt" else (lambda v: isinstance(v, int) and v < n)
    if op == "cidr":
        if spec.kind != "ip":
            raise ConditionError(loc, f"cidr needs an IP field (remote.ip), {spec.name!r} is not one")
        nets = []
        for v in _strings(_values(value, lists, loc, op), loc, op):
            try:
                net = ipaddress.ip_network(v, strict=False)
            except ValueError as exc:
                raise ConditionError(loc, f"bad CIDR {v!r}: {exc}") from None
            nets.append((net.version, int(net.network_address), int(net.netmask)))
        frozen = tuple(nets)
        return lambda v: _in_networks(v, frozen)
    if op == "domain":
        if spec.kind != "domain":
            raise ConditionError(loc, f"domain needs a domain field (dns.domain), {spec.name!r} is not one")
        with_self, below = _domain_suffixes(_strings(_values(value, lists, loc, op), loc, op))
        return lambda v: _domain_match(v, with_self, below)
    if op == "equals":
        if isinstance(value, list) or (isinstance(value, str) and value.startswith("@")):
            raise ConditionError(loc, "equals: expected one value (use 'in' for a list)")
    elif op == "in" and not (isinstance(value, list) or (isinstance(value, str) and value.startswith("@"))):
        raise ConditionError(loc, "in: expected a list or a named list ('@name')")
    vals = _values(value, lists, loc, op)
    if op in ("equals", "in"):
        if spec.kind == "int":
            ints = frozenset(_ints(vals, loc, op))
            return lambda v: v in ints
        if spec.kind == "domain":
            names = frozenset(normalize_domain(str(x)) for x in vals)
            return lambda v: v in names
        strs = frozenset(str(x) for x in vals)
        return lambda v: str(v) in strs if spec.kind == "ip" else v in strs
    if spec.kind == "int":
        raise ConditionError(loc, f"{op} needs a text field, {spec.name!r} is numeric (use equals/in/gt/lt)")
    svals = _strings(vals, loc, op)
    if spec.kind == "domain":
        svals = [normalize_domain(s) for s in svals]
    if op == "regex":
        rx = re.compile("|".join(f"(?:{check_regex(s, loc).pattern})" for s in svals))
        return lambda v: rx.search(str(v)) is not None
    if op == "glob":
        return glob_predicate(svals)
    if op == "contains":
        if len(svals) == 1:
            (needle,) = svals
            return lambda v: needle in str(v)
        return lambda v: any(s in str(v) for s in svals)
    prefixes = tuple(svals)
    if op == "startswith":
        return lambda v: str(v).startswith(prefixes)
    return lambda v: str(v).endswith(prefixes)


def glob_predicate(patterns: Sequence[str]) -> Predicate:
    """Shell globs (``*``, ``?``, ``[...]``) as one regex; plain strings go to a set (exact paths, names)."""
    exact = frozenset(p for p in patterns if not any(c in p for c in "*?["))
    wild = [p for p in patterns if p not in exact]
    if not wild:
        return lambda v: v in exact
    rx = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in wild))
    return lambda v: v in exact or rx.match(str(v)) is not None


@functools.lru_cache(maxsize=8192)
def parse_ip(text: str) -> tuple[int, int] | None:
    """(version, integer) of an address, v4-mapped v6 as v4; None when it is not one. Cached: addresses repeat."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.version, int(ip)


def _in_networks(v: Any, nets: tuple[tuple[int, int, int], ...]) -> bool:
    parsed = parse_ip(v if isinstance(v, str) else str(v))
    if parsed is None:
        return False
    version, n = parsed
    return any(version == ver and n & mask == net for ver, net, mask in nets)


def _domain_match(v: Any, with_self: frozenset[str], below: frozenset[str]) -> bool:
    d = str(v)
    if d in with_self:
        return True
    i = d.find(".")
    while i >= 0:
        parent = d[i + 1 :]
        if parent in with_self or parent in below:
            return True
        i = d.find(".", i + 1)
    return False


# -- conditions -----------------------------------------------------------------------------------------------

Getter = Callable[[Any, DetectorContext | None], Any]
Test = Callable[[Any, DetectorContext | None], bool]


def suggest(word: str, known: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def unknown_field(name: Any, loc: str, known: Iterable[str] = FIELDS) -> ConditionError:
    names = list(known)
    return ConditionError(loc, f"unknown field {name!r} ({suggest(str(name), names)}known: {', '.join(names)})")


def leaf_test(spec: FieldSpec, getter: Getter, pred: Predicate) -> Test:
    if spec.multi:

        def test_multi(subject: Any, ctx: DetectorContext | None) -> bool:
            vals = getter(subject, ctx)
            return bool(vals) and any(v is not None and pred(v) for v in vals)

        return test_multi

    def test(subject: Any, ctx: DetectorContext | None) -> bool:
        v = getter(subject, ctx)
        return v is not None and pred(v)

    return test


def _never(subject: Any, ctx: DetectorContext | None) -> bool:
    return False


def compile_condition(
    node: Any,
    lists: Lists,
    loc: str,
    getters: Mapping[str, Getter],
    *,
    events: frozenset[str] | None = None,
    errors: list[ConditionError] | None = None,
) -> Test:
    """A condition tree as nested closures; each problem is a ConditionError at its exact location.

    ``errors``: where to collect every problem of the tree (None: raise the first one).
    ``events``: the event kinds the rule reads; a field none of them carries is an error (the leaf could
    never match).
    """
    try:
        return _compile_node(node, lists, loc, getters, events=events, errors=errors)
    except ConditionError as exc:
        if errors is None:
            raise
        errors.append(exc)
        return _never


def _compile_node(
    node: Any,
    lists: Lists,
    loc: str,
    getters: Mapping[str, Getter],
    *,
    events: frozenset[str] | None,
    errors: list[ConditionError] | None,
) -> Test:
    if not isinstance(node, dict):
        raise ConditionError(loc, f"expected a mapping (all/any/not or {{field, <operator>}}), got {node!r}")
    if "field" not in node:
        if len(node) != 1 or next(iter(node)) not in ("all", "any", "not"):
            keys = ", ".join(map(str, node)) or "none"
            raise ConditionError(loc, f"expected exactly one of all/any/not, or a leaf with 'field' (got keys: {keys})")
        (key, sub) = next(iter(node.items()))
        if key == "not":
            inner = compile_condition(sub, lists, f"{loc}.not", getters, events=events, errors=errors)
            return lambda s, ctx: not inner(s, ctx)
        if not isinstance(sub, list) or not sub:
            raise ConditionError(f"{loc}.{key}", "expected a non-empty list of conditions")
        parts = [
            compile_condition(c, lists, f"{loc}.{key}[{i}]", getters, events=events, errors=errors)
            for i, c in enumerate(sub)
        ]
        if len(parts) == 1:
            return parts[0]
        if key == "all":
            return lambda s, ctx: all(p(s, ctx) for p in parts)
        return lambda s, ctx: any(p(s, ctx) for p in parts)
    name = node["field"]
    if not isinstance(name, str) or name not in FIELDS or name not in getters:
        raise unknown_field(name, loc, getters)
    ops = [k for k in node if k != "field"]
    if len(ops) != 1:
        got = ", ".join(map(str, ops)) or "none"
        raise ConditionError(loc, f"a leaf needs exactly one operator ({', '.join(OPERATORS)}); got: {got}")
    spec = FIELDS[name]
    if events is not None and spec.kinds is not None and not (spec.kinds & events):
        raise ConditionError(
            loc,
            f"field {name!r} is never set on events {', '.join(sorted(events))} "
            f"(it is on: {', '.join(sorted(spec.kinds))})",
        )
    pred = compile_operator(spec, str(ops[0]), node[ops[0]], lists, loc)
    return leaf_test(spec, getters[name], pred)


# -- the rule detector ----------------------------------------------------------------------------------------

# Fields a custom type's description template may use (the detector fills them in before the finding is built).
DESCRIPTION_FIELDS = (
    "process",
    "exe",
    "container",
    "commandLine",
    "user",
    "remoteIp",
    "remotePort",
    "domain",
    "filePath",
)


def check_template(text: str, loc: str) -> None:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConditionError(loc, f"bad template {text!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    for _, fname, _, _ in parsed:
        if fname is not None and fname not in DESCRIPTION_FIELDS:
            raise ConditionError(
                loc,
                f"unknown template field {{{fname}}} (known: {', '.join('{' + f + '}' for f in DESCRIPTION_FIELDS)})",
            )


@dataclass(slots=True)
class CompiledRule:
    id: str
    description: str
    type: str
    level: str | None
    events: frozenset[str]
    test: Test
    custom: bool
    # (field, values): the rule can only match when the field's value is one of these (see anchor_of)
    anchor: tuple[str, frozenset[Any]] | None = None
    order: int = 0


def anchor_of(node: Any, lists: Lists) -> tuple[str, frozenset[Any]] | None:
    """An exact-value leaf (equals/in on a text or number field) that the whole condition requires, if any.

    Rules with one are indexed by that value, so that an event is tested only against the rules that
    name its process (or its container, its file category...): a policy of hundreds of rules costs little
    more per event than one of ten. Only called on a condition that compiled.
    """
    leaves = [node] if "field" in node else node.get("all") if isinstance(node.get("all"), list) else []
    for leaf in leaves:
        if not isinstance(leaf, dict) or "field" not in leaf:
            continue
        spec = FIELDS[leaf["field"]]
        if spec.multi or spec.kind not in ("str", "int"):
            continue
        op = next(k for k in leaf if k != "field")
        if op not in ("equals", "in"):
            continue
        vals = _values(leaf[op], lists, "", op)
        if spec.kind == "int":
            return spec.name, frozenset(_ints(vals, "", op))
        return spec.name, frozenset(str(v) for v in vals)
    return None


@dataclass(slots=True)
class KindIndex:
    """The rules of one event kind: those tested on every event, and those found by an anchor field's value."""

    always: list[CompiledRule] = field(default_factory=list)
    anchored: dict[str, dict[Any, list[CompiledRule]]] = field(default_factory=dict)

    def all_rules(self) -> list[CompiledRule]:
        seen = {id(r): r for r in self.always}
        for table in self.anchored.values():
            for rules in table.values():
                seen.update((id(r), r) for r in rules)
        return sorted(seen.values(), key=lambda r: r.order)


@dataclass(slots=True)
class RuleSet:
    rules: list[CompiledRule] = field(default_factory=list)

    def by_kind(self) -> dict[str, KindIndex]:
        out: dict[str, KindIndex] = defaultdict(KindIndex)
        for i, r in enumerate(self.rules):
            r.order = i
            for k in sorted(r.events):
                idx = out[k]
                if r.anchor is None:
                    idx.always.append(r)
                else:
                    table = idx.anchored.setdefault(r.anchor[0], {})
                    for v in r.anchor[1]:
                        table.setdefault(v, []).append(r)
        return dict(out)


class UserRulesDetector(Detector):
    """Every user rule of the policy in one detector: rules indexed by event kind and anchor value, conditions
    precompiled.

    The policy builds a subclass per rule set (``types`` and ``kinds`` are class attributes the engine reads).
    """

    name = "user_rules"
    types: ClassVar[tuple[str, ...]] = ()
    kinds: ClassVar[tuple[str, ...]] = ()
    ruleset: ClassVar[RuleSet] = RuleSet()

    def __init__(self, ctx: DetectorContext) -> None:
        super().__init__(ctx)
        self._index = self.ruleset.by_kind()
        self.matches: Counter[str] = Counter()

    def rules_for(self, kind: str) -> list[CompiledRule]:
        idx = self._index.get(kind)
        return idx.all_rules() if idx is not None else []

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        idx = self._index.get(event.kind)
        if idx is None:
            return ()
        rules = idx.always
        for fname, table in idx.anchored.items():
            value = EVENT_FIELDS[fname](event, self.ctx)
            if value is None:
                continue
            found = table.get(value if isinstance(value, int) else str(value))
            if found:
                rules = sorted({id(r): r for r in (*rules, *found)}.values(), key=lambda r: r.order)
        out = []
        for r in rules:
            if r.test(event, self.ctx):
                self.matches[r.id] += 1
                out.append(self._detection(r, event))
        return out

    def _detection(self, r: CompiledRule, event: RuntimeEvent) -> Detection:
        p = event.process
        data = event.data or {}
        where = _event_container(event)
        facts: dict[str, Any] = {
            "container": (where.name or where.id) if where is not None else "(host)",
            "user": p.user if p is not None else None,
            "remoteIp": data.get("remoteIp"),
            "remotePort": data.get("remotePort"),
            "domain": _event_domain(event, None),
            "filePath": data.get("filePath"),
        }
        if p is not None:
            facts.update(process=f"{p.name}[{p.nspid}]", exe=p.executable_path, commandLine=p.command_line)
        description = catalog.render(r.description, facts) if r.custom else r.description
        facts.update(
            ruleId=r.id,
            ruleDescription=description,
            # for the catalog types' templates: what matched, as their detectors would say it
            pattern=f"the user rule {r.id}",
            toolName=p.name if p is not None else None,
            toolCategory="user-listed",
        )
        context: dict[str, Any] = {"ruleId": r.id, "ruleDescription": description}
        if p is not None and p.command_line:
            context["commandLineExample"] = p.command_line
        action = None
        if event.kind in _DNS_KINDS and facts["domain"]:
            action = dns_action(facts["domain"], data)
        elif event.kind in _ENDPOINT_KINDS and data.get("remoteIp"):
            action = network_action(data)
        return Detection(
            r.type,
            p,
            context=context,
            key=(r.id,),
            level=r.level,
            action=action,
            facts={k: v for k, v in facts.items() if v is not None and k != "container"},
            time=event.time,
            container=where if p is None else None,
        )

    def snapshot(self) -> dict[str, Any]:
        return {"matches": dict(self.matches)} if self.matches else {}


def rules_detector_class(ruleset: RuleSet) -> type[UserRulesDetector]:
    types = tuple(sorted({r.type for r in ruleset.rules}))
    kinds = tuple(sorted({k for r in ruleset.rules for k in r.events}))
    return type("UserRulesDetector", (UserRulesDetector,), {"types": types, "kinds": kinds, "ruleset": ruleset})

"""The user's detection policy: threat and trusted lists, named lists, exceptions and user rules.

One document (YAML, JSON or TOML, by the file's extension), validated in full
at load: every problem is reported with the file and its location
(``policy.yaml: rules[2].condition.all[1]: unknown field 'proc.nam' ...``;
indexes count from 0), and a policy with any problem does not load.

- ``threat_lists`` / ``trusted_lists``: files for detectors.intel (:class:`ListSpec`).
- ``lists``: named lists, referred to as ``"@name"`` in exceptions and rules.
- ``exceptions``: a detection that matches every field given in one entry is
  dropped; the entry's ``reason`` is what the engine counts it under.
  Values are globs (exact when they have no ``*?[``), lists of them,
  ``"@name"``, or ``{<operator>: value}`` (``{regex: ...}``); ``remote_ip`` takes
  CIDRs, ``domain`` takes names that cover their subdomains (``*.x`` only
  the subdomains). Fields that need the parent (``parent_name``) use the
  process table the policy is bound to by :meth:`Policy.rule_detectors`.
- ``rules``: see detectors/rules.py. A rule emits a catalog type or a custom
  one (any ``Family:Runtime/Name`` not in the catalog). A custom type needs
  ``severity``; its description is the rule's, a template that may use
  {process}, {exe}, {container}, {commandLine} and a few more. A rule cannot
  change a catalog type's severity (other detectors' findings of that type
  would change meaning): for a catalog type with levels it picks a ``level``,
  and a ``severity`` is accepted only when it is one of the type's own
  numbers (it then selects that level).

The document's canonical JSON (keys sorted, defaults filled in) and its
sha256 (``digest``) identify a policy: the backend serves the same document
to agents and compares digests.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from detectors import catalog
from detectors.base import Detection, Detector, DetectorContext, ListSpec
from detectors.rules import (
    DETECTION_FIELDS,
    EVENT_FIELDS,
    EVENT_KINDS,
    FIELDS,
    CompiledRule,
    ConditionError,
    RuleSet,
    Test,
    anchor_of,
    check_template,
    compile_condition,
    compile_operator,
    leaf_test,
    rules_detector_class,
    suggest,
)


class PolicyError(ValueError):
    """Every problem of a policy document, one per line, each with its file and location."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


# -- the document ---------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListSpecModel(_Model):
    path: str = Field(min_length=1)
    format: Literal["auto", "plain", "stix", "otx"] = "auto"
    category: str | None = None
    name: str | None = None


# exception keys -> the field each one matches (see detectors.rules.FIELDS)
EXCEPTION_FIELDS = {
    "image": "container.image",
    "container": "container.name",
    "executable": "process.executable",
    "process_name": "process.name",
    "command_line": "process.command_line",
    "user": "process.user",
    "parent_name": "parent.name",
    "parent_executable": "parent.executable",
    "ancestor_name": "ancestor.name",
    "remote_ip": "remote.ip",
    "remote_port": "remote.port",
    "domain": "dns.domain",
    "file_path": "file.path",
}
# the operator a plain value means, by the field's kind
_DEFAULT_OP = {"str": "glob", "ip": "cidr", "domain": "domain", "int": "in"}
# cheap fields first: parent and ancestor lookups walk the process table
_COST = {"parent.name": 1, "parent.executable": 1, "ancestor.name": 2}


class ExceptionModel(_Model):
    type: Any = None
    image: Any = None
    container: Any = None
    executable: Any = None
    process_name: Any = None
    command_line: Any = None
    user: Any = None
    parent_name: Any = None
    parent_executable: Any = None
    ancestor_name: Any = None
    remote_ip: Any = None
    remote_port: Any = None
    domain: Any = None
    file_path: Any = None
    reason: str = Field(min_length=1)


RULE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
CUSTOM_TYPE = re.compile(r"^[A-Z][A-Za-z]*:[A-Za-z]+/[A-Za-z0-9][A-Za-z0-9._&!-]*$")
MITRE_ID = re.compile(r"^T\d{4}(?:\.\d{3})?$")


class RuleModel(_Model):
    id: str = Field(pattern=RULE_ID)
    description: str = Field(min_length=1)
    type: str
    severity: float | None = None
    level: str | None = None
    mitre: list[str] = Field(default_factory=list)
    tactic: str | None = None
    events: list[str] = Field(min_length=1)
    condition: dict[str, Any]
    enabled: bool = True


class PolicyModel(_Model):
    version: Literal[1] = 1
    threat_lists: list[ListSpecModel] = Field(default_factory=list)
    trusted_lists: list[ListSpecModel] = Field(default_factory=list)
    lists: dict[str, list[Any]] = Field(default_factory=dict)
    # validated entry by entry (ExceptionModel, RuleModel) so that one bad entry does not hide the others'
    exceptions: list[dict[str, Any]] = Field(default_factory=list)
    rules: list[dict[str, Any]] = Field(default_factory=list)


def _loc(parts: Sequence[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(document)"


def _pydantic_problems(exc: ValidationError, model: type[BaseModel], prefix: Sequence[Any]) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = _loc([*prefix, *loc[:-1]]) if err["type"] in ("extra_forbidden", "missing") else _loc([*prefix, *loc])
        if err["type"] == "extra_forbidden":
            owner: type[BaseModel] = model
            if len(loc) == 3 and loc[0] in ("threat_lists", "trusted_lists"):
                owner = ListSpecModel
            out.append((where, f"unknown key {loc[-1]!r} (known: {', '.join(owner.model_fields)})"))
        elif err["type"] == "missing":
            out.append((where, f"missing required key {loc[-1]!r}"))
        else:
            out.append((where, f"{err['msg']} (got {err['input']!r})"))
    return out


# -- compiled parts -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CompiledException:
    index: int
    reason: str
    types: tuple[str, ...]  # empty: every type; may hold globs
    tests: tuple[Test, ...]
    hits: int = 0

    def applies_to(self, type_name: str) -> bool:
        return not self.types or any(fnmatch.fnmatchcase(type_name, t) for t in self.types)


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


class _Builder:
    """Semantic validation and compilation of a pydantic-valid document; collects every problem."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, loc: str, message: str) -> None:
        self.problems.append(f"{self.source}: {loc}: {message}")

    def lists(self, raw: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for name, values in raw.items():
            if not re.match(r"^[A-Za-z0-9_.-]+$", name):
                self.problem(f"lists.{name}", "a list name may hold letters, digits, '_', '.', '-'")
                continue
            ok = True
            for i, v in enumerate(values):
                if isinstance(v, bool) or not isinstance(v, str | int):
                    self.problem(f"lists.{name}[{i}]", f"expected a string or a number, got {v!r}")
                    ok = False
            if ok:
                out[name] = list(values)
        return out

    def rules(
        self, raw: list[dict[str, Any]], lists: Mapping[str, list[Any]]
    ) -> tuple[list[RuleModel], RuleSet, dict[str, catalog.FindingType]]:
        known = catalog.catalog()
        models: list[RuleModel] = []
        compiled: list[CompiledRule] = []
        custom: dict[str, tuple[catalog.FindingType, str]] = {}
        seen_ids: dict[str, int] = {}
        for i, entry in enumerate(raw):
            loc = f"rules[{i}]"
            try:
                m = RuleModel.model_validate(entry)
            except ValidationError as exc:
                for where, msg in _pydantic_problems(exc, RuleModel, ["rules", i]):
                    self.problem(where, msg)
                continue
            models.append(m)
            if m.id in seen_ids:
                self.problem(f"{loc}.id", f"duplicate rule id {m.id!r} (also rules[{seen_ids[m.id]}])")
            seen_ids.setdefault(m.id, i)
            n_before = len(self.problems)
            events = self._events(m, loc)
            level = self._type(m, loc, known, custom)
            for j, t in enumerate(m.mitre):
                if not MITRE_ID.match(t):
                    self.problem(f"{loc}.mitre[{j}]", f"not a MITRE ATT&CK technique id (T1234 or T1234.001): {t!r}")
            errors: list[ConditionError] = []
            test = compile_condition(
                m.condition, lists, f"{loc}.condition", EVENT_FIELDS, events=events or None, errors=errors
            )
            for err in errors:
                self.problem(err.loc, err.message)
            if len(self.problems) == n_before and m.enabled:
                compiled.append(
                    CompiledRule(
                        id=m.id,
                        description=m.description,
                        type=m.type,
                        level=level,
                        events=events,
                        test=test,
                        custom=m.type not in known,
                        anchor=anchor_of(m.condition, lists),
                    )
                )
        return models, RuleSet(compiled), {name: ft for name, (ft, _) in custom.items()}

    def _events(self, m: RuleModel, loc: str) -> frozenset[str]:
        ok = set()
        for j, k in enumerate(m.events):
            if k in EVENT_KINDS:
                ok.add(k)
            else:
                kinds = sorted(EVENT_KINDS)
                self.problem(
                    f"{loc}.events[{j}]", f"unknown event kind {k!r} ({suggest(k, kinds)}known: {', '.join(kinds)})"
                )
        return frozenset(ok)

    def _type(
        self,
        m: RuleModel,
        loc: str,
        known: Mapping[str, catalog.FindingType],
        custom: dict[str, tuple[catalog.FindingType, str]],
    ) -> str | None:
        """Check the rule's type/severity/level; register custom types. Returns the level detections carry."""
        ft = known.get(m.type)
        if ft is not None:
            level = m.level
            if level is not None and level not in ft.levels:
                have = ", ".join(f"{k}={v}" for k, v in ft.levels.items()) or "none"
                self.problem(f"{loc}.level", f"{m.type} has no severity level {level!r} (levels: {have})")
                return None
            if m.severity is not None:
                by_value = [k for k, v in ft.levels.items() if v == m.severity]
                fixed = ft.severity_for(level)
                if level is not None and m.severity != fixed:
                    self.problem(f"{loc}.severity", f"severity {m.severity} contradicts level {level!r} ({fixed})")
                elif level is None and by_value:
                    level = by_value[0]
                elif level is None and m.severity != ft.severity:
                    levels = ", ".join(f"{k}={v}" for k, v in ft.levels.items())
                    self.problem(
                        f"{loc}.severity",
                        f"a rule cannot change the severity of the catalog type {m.type} ({ft.severity}): "
                        + (f"pick a level ({levels}) " if levels else "")
                        + "or emit a custom type",
                    )
            return level
        if not CUSTOM_TYPE.match(m.type):
            self.problem(
                f"{loc}.type",
                f"{m.type!r} is neither a catalog type nor a custom type of the form 'Family:Runtime/Name' "
                f"({suggest(m.type, known)}see `runtime-sidecar finding-types`)",
            )
            return None
        if m.level is not None:
            self.problem(f"{loc}.level", f"levels exist only for catalog types; {m.type} is a custom type")
        if m.severity is None:
            hint = suggest(m.type, known)
            self.problem(
                f"{loc}.severity",
                f"missing severity for the custom type {m.type!r}" + (f" ({hint.rstrip()})" if hint else ""),
            )
            return None
        try:
            check_template(m.description, f"{loc}.description")
        except ConditionError as exc:
            self.problem(exc.loc, exc.message)
        if not any(low <= m.severity <= high for _, low, high in catalog.SEVERITY_BANDS):
            self.problem(
                f"{loc}.severity",
                f"severity {m.severity} is outside GuardDuty's bands (Low 1.0-3.9, Medium 4.0-6.9, High 7.0-8.9)",
            )
            return None
        prior = custom.get(m.type)
        if prior is not None:
            if prior[0].severity != m.severity:
                self.problem(
                    f"{loc}.severity",
                    f"{m.type} has severity {prior[0].severity} in {prior[1]}: one type, one severity",
                )
            return None
        custom[m.type] = (
            catalog.FindingType(
                name=m.type,
                severity=float(m.severity),
                mitre=tuple(m.mitre),
                tactic=m.tactic or "Custom",
                sources=("user_rule",),
                title="User rule {ruleId} matched in container {container}.",
                description="{ruleDescription}",
            ),
            loc,
        )
        return None

    def exceptions(
        self, raw: list[dict[str, Any]], lists: Mapping[str, list[Any]], types: set[str]
    ) -> tuple[list[ExceptionModel], list[CompiledException]]:
        models: list[ExceptionModel] = []
        out: list[CompiledException] = []
        for i, entry in enumerate(raw):
            loc = f"exceptions[{i}]"
            try:
                m = ExceptionModel.model_validate(entry)
            except ValidationError as exc:
                for where, msg in _pydantic_problems(exc, ExceptionModel, ["exceptions", i]):
                    self.problem(where, msg)
                continue
            models.append(m)
            n_before = len(self.problems)
            names = self._exception_types(m.type, f"{loc}.type", types)
            tests: list[tuple[int, Test]] = []
            for key, fname in EXCEPTION_FIELDS.items():
                value = getattr(m, key)
                if value is None:
                    continue
                spec = FIELDS[fname]
                op, operand = _DEFAULT_OP[spec.kind], value
                if op == "in" and not isinstance(value, list) and not str(value).startswith("@"):
                    op = "equals"  # remote_port: 443
                if isinstance(value, dict):
                    if len(value) != 1:
                        self.problem(f"{loc}.{key}", f"expected one {{operator: value}}, got {value!r}")
                        continue
                    ((op, operand),) = value.items()
                try:
                    pred = compile_operator(spec, str(op), operand, lists, f"{loc}.{key}")
                except ConditionError as exc:
                    self.problem(exc.loc, exc.message)
                    continue
                tests.append((_COST.get(fname, 0), leaf_test(spec, DETECTION_FIELDS[fname], pred)))
            if m.type is None and all(getattr(m, key) is None for key in EXCEPTION_FIELDS):
                self.problem(loc, "matches every detection of every type: give a type or a field to match")
            if len(self.problems) == n_before:
                ordered = tuple(t for _, t in sorted(tests, key=lambda ct: ct[0]))
                out.append(CompiledException(index=i, reason=m.reason, types=names, tests=ordered))
        return models, out

    def _exception_types(self, value: Any, loc: str, types: set[str]) -> tuple[str, ...]:
        if value is None:
            return ()
        raw = value if isinstance(value, list) else [value]
        out = []
        for j, t in enumerate(raw):
            where = f"{loc}[{j}]" if isinstance(value, list) else loc
            if not isinstance(t, str):
                self.problem(where, f"expected a finding type name, got {t!r}")
            elif _is_glob(t):
                if not any(fnmatch.fnmatchcase(name, t) for name in types):
                    self.problem(where, f"the pattern {t!r} matches no finding type")
                out.append(t)
            elif t not in types:
                self.problem(
                    where, f"unknown finding type {t!r} ({suggest(t, types)}see `runtime-sidecar finding-types`)"
                )
            else:
                out.append(t)
        return tuple(out)


# -- the policy -----------------------------------------------------------------------------------------------


def _spec(m: ListSpecModel) -> ListSpec:
    return ListSpec(path=m.path, format=m.format, category=m.category, name=m.name)


class _NoDuplicateKeysLoader(yaml.SafeLoader):  # type: ignore[misc,unused-ignore]
    """YAML silently keeps the last of two equal keys; in a policy that hides a mistake."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class Policy:
    def __init__(
        self,
        document: dict[str, Any],
        *,
        threat_lists: list[ListSpec],
        trusted_lists: list[ListSpec],
        exceptions: list[CompiledException],
        ruleset: RuleSet,
        custom: dict[str, catalog.FindingType],
        source: str,
    ) -> None:
        self.document = document
        self.source = source
        self.threat_lists = threat_lists
        self.trusted_lists = trusted_lists
        self.exceptions = exceptions
        self.ruleset = ruleset
        self._custom = custom
        self._ctx: DetectorContext | None = None
        self._by_type: dict[str, tuple[CompiledException, ...]] = {}
        self._canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
        self.digest = hashlib.sha256(self._canonical).hexdigest()

    # -- loading --------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> Policy:
        p = Path(path)
        ext = p.suffix.lower()
        if ext not in (".yaml", ".yml", ".json", ".toml"):
            raise PolicyError(
                [f"{path}: unknown policy format {ext or '(no extension)'!r} (use .yaml, .json or .toml)"]
            )
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError([f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"]) from None
        try:
            if ext in (".yaml", ".yml"):
                data = yaml.load(text, Loader=_NoDuplicateKeysLoader)  # a SafeLoader subclass
            elif ext == ".json":
                data = json.loads(text)
            else:
                data = tomllib.loads(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            what = getattr(exc, "problem", None) or str(exc)
            raise PolicyError([f"{path}: {where}invalid YAML: {what}"]) from None
        except json.JSONDecodeError as exc:
            raise PolicyError([f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError([f"{path}: invalid TOML: {exc}"]) from None
        if data is None:  # an empty YAML file
            data = {}
        if not isinstance(data, dict):
            raise PolicyError([f"{path}: expected a mapping at the top, got {type(data).__name__}"])
        return cls.parse(data, source=path)

    @classmethod
    def parse(cls, data: Mapping[str, Any], source: str = "<policy>") -> Policy:
        try:
            doc = PolicyModel.model_validate(dict(data))
        except ValidationError as exc:
            raise PolicyError([f"{source}: {w}: {m}" for w, m in _pydantic_problems(exc, PolicyModel, [])]) from None
        b = _Builder(source)
        lists = b.lists(doc.lists)
        rule_models, ruleset, custom = b.rules(doc.rules, lists)
        types = set(catalog.catalog()) | set(custom)
        exc_models, exceptions = b.exceptions(doc.exceptions, lists, types)
        if b.problems:
            raise PolicyError(b.problems)
        document = {
            "version": doc.version,
            "threat_lists": [m.model_dump(mode="json") for m in doc.threat_lists],
            "trusted_lists": [m.model_dump(mode="json") for m in doc.trusted_lists],
            "lists": {k: list(v) for k, v in doc.lists.items()},
            "exceptions": [m.model_dump(mode="json", exclude_none=True) for m in exc_models],
            "rules": [m.model_dump(mode="json", exclude_none=True) for m in rule_models],
        }
        return cls(
            document,
            threat_lists=[_spec(m) for m in doc.threat_lists],
            trusted_lists=[_spec(m) for m in doc.trusted_lists],
            exceptions=exceptions,
            ruleset=ruleset,
            custom=custom,
            source=source,
        )

    @classmethod
    def empty(cls) -> Policy:
        return cls.parse({}, source="<empty policy>")

    # -- the document -----------------------------------------------------------------------------------------
    def canonical_json(self) -> bytes:
        """The document as the backend serves it: sorted keys, defaults filled in; ``digest`` is its sha256."""
        return self._canonical

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = orjson.loads(self._canonical)
        return out

    # -- the engine's hooks -----------------------------------------------------------------------------------
    def bind(self, ctx: DetectorContext) -> None:
        """The context exceptions read parents and ancestors from (rule_detectors() binds it)."""
        self._ctx = ctx

    def _exceptions_for(self, type_name: str) -> tuple[CompiledException, ...]:
        found = self._by_type.get(type_name)
        if found is None:
            found = tuple(e for e in self.exceptions if e.applies_to(type_name))
            self._by_type[type_name] = found
        return found

    def suppressed(self, detection: Detection, finding_type: catalog.FindingType) -> str | None:
        for exc in self._exceptions_for(finding_type.name):
            ctx = self._ctx
            if all(t(detection, ctx) for t in exc.tests):
                exc.hits += 1
                return exc.reason
        return None

    def custom_types(self) -> dict[str, catalog.FindingType]:
        return dict(self._custom)

    def rule_detectors(self, ctx: DetectorContext) -> list[Detector]:
        self.bind(ctx)
        if not self.ruleset.rules:
            return []
        return [rules_detector_class(self.ruleset)(ctx)]

    def snapshot(self) -> dict[str, Any]:
        return {
            "digest": self.digest[:12],
            "rules": len(self.ruleset.rules),
            "exceptions": len(self.exceptions),
            "exceptionHits": {e.reason: e.hits for e in self.exceptions if e.hits},
        }

"""The finding-type catalog (``catalog.toml``), loaded once into typed entries.

Severity, MITRE technique, event sources and the wording of titles and
descriptions live in the TOML file, not in detector code: a reader finds a
type's whole definition there, and `runtime-sidecar finding-types` prints it.
"""

from __future__ import annotations

import functools
import string
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

SEVERITY_BANDS = (("High", 7.0, 8.9), ("Medium", 4.0, 6.9), ("Low", 1.0, 3.9))
# How long a filled-in template field may be: command lines can be megabytes.
MAX_FIELD_CHARS = 512


class CatalogError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class FindingType:
    name: str
    severity: float
    mitre: tuple[str, ...]
    tactic: str
    sources: tuple[str, ...]
    title: str
    description: str
    varies: str | None = None
    levels: dict[str, float] = field(default_factory=dict)
    # Why no source of this agent can see the activity (None: a detector emits it).
    unseen: str | None = None

    @property
    def family(self) -> str:
        """GuardDuty's threat purpose: the part before the colon (Execution, Backdoor, ...)."""
        return self.name.split(":", 1)[0]

    def severity_for(self, level: str | None) -> float:
        if level is None:
            return self.severity
        try:
            return self.levels[level]
        except KeyError:
            raise CatalogError(f"{self.name}: no severity level {level!r} (has {sorted(self.levels)})") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.name,
            "severity": self.severity,
            "severityLabel": severity_label(self.severity),
            "severityVaries": self.varies,
            "severityLevels": self.levels or None,
            "mitreTechniques": list(self.mitre),
            "mitreTactic": self.tactic,
            "eventSources": list(self.sources),
            "title": self.title,
            "description": self.description,
            "unseen": self.unseen,
        }


def severity_label(severity: float) -> str:
    for label, low, high in SEVERITY_BANDS:
        if low <= severity <= high + 0.0999:
            return label
    return "Critical" if severity >= 9 else "Low"


def _check(entry: dict[str, Any], index: int) -> FindingType:
    where = f"catalog.toml type #{index + 1} ({entry.get('name', '?')})"
    required = {"name", "severity", "mitre", "tactic", "sources", "title", "description"}
    missing = required - entry.keys()
    if missing:
        raise CatalogError(f"{where}: missing {', '.join(sorted(missing))}")
    unknown = entry.keys() - required - {"varies", "levels", "unseen"}
    if unknown:
        raise CatalogError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    levels = {str(k): float(v) for k, v in entry.get("levels", {}).items()}
    for sev in (float(entry["severity"]), *levels.values()):
        if not any(low <= sev <= high for _, low, high in SEVERITY_BANDS):
            raise CatalogError(f"{where}: severity {sev} is outside GuardDuty's bands")
    if levels and not entry.get("varies"):
        raise CatalogError(f"{where}: levels given without 'varies' saying what they depend on")
    for key in ("title", "description"):
        try:
            list(string.Formatter().parse(entry[key]))
        except ValueError as exc:
            raise CatalogError(f"{where}: bad {key} template: {exc}") from None
    return FindingType(
        name=entry["name"],
        severity=float(entry["severity"]),
        mitre=tuple(entry["mitre"]),
        tactic=entry["tactic"],
        sources=tuple(entry["sources"]),
        title=entry["title"],
        description=entry["description"],
        varies=entry.get("varies"),
        levels=levels,
        unseen=entry.get("unseen"),
    )


def parse_catalog(text: str) -> dict[str, FindingType]:
    data = tomllib.loads(text)
    out: dict[str, FindingType] = {}
    for i, entry in enumerate(data.get("type", [])):
        ft = _check(entry, i)
        if ft.name in out:
            raise CatalogError(f"catalog.toml: {ft.name} is listed twice")
        out[ft.name] = ft
    return out


@functools.cache
def catalog() -> dict[str, FindingType]:
    text = resources.files("detectors").joinpath("catalog.toml").read_text(encoding="utf-8")
    return parse_catalog(text)


def get(name: str) -> FindingType:
    try:
        return catalog()[name]
    except KeyError:
        raise CatalogError(f"{name!r} is not in the finding catalog") from None


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "unknown"


def render(template: str, fields: dict[str, Any]) -> str:
    """Fill a title/description template; missing fields read "unknown", long values are cut."""
    clean = _Fields()
    for k, v in fields.items():
        if v is None:
            continue
        s = ", ".join(str(x) for x in v) if isinstance(v, list | tuple) else str(v)
        clean[k] = s if len(s) <= MAX_FIELD_CHARS else s[: MAX_FIELD_CHARS - 1] + "…"
    return template.format_map(clean)

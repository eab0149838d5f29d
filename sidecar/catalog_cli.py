"""`runtime-sidecar finding-types`: the catalog, as a table or JSON, with which detector emits each type."""

from __future__ import annotations

import sys

import orjson

from detectors import catalog, registry


def coverage() -> dict[str, list[str]]:
    """Type -> names of the detectors that can emit it."""
    out: dict[str, list[str]] = {name: [] for name in catalog.catalog()}
    for cls in registry.detector_classes():
        for t in cls.types:
            out.setdefault(t, []).append(cls.name)
    return out


def print_catalog(*, as_json: bool = False) -> int:
    cov = coverage()
    entries = []
    for ft in catalog.catalog().values():
        entry = ft.to_json()
        entry["detectors"] = cov.get(ft.name, [])
        entries.append(entry)
    if as_json:
        sys.stdout.write(orjson.dumps(entries, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    rows = [("type", "sev", "MITRE", "sources", "detector (or why unseen)")]
    for e in entries:
        levels = e["severityLevels"]
        sev = "/".join(f"{v:g}" for v in levels.values()) if levels else f"{e['severity']:g}"
        who = ", ".join(e["detectors"]) or f"unseen: {(e['unseen'] or 'no detector')[:60]}"
        rows.append((e["type"], sev, ",".join(e["mitreTechniques"]), ",".join(e["eventSources"]), who))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] + "\n")
    return 0

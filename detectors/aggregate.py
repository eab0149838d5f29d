"""FindingAggregator: repeats of one activity update one finding instead of flooding.

Key: (type, container, executable, the detection's own key). The first
detection emits the finding at once (it is news); repeats raise ``count``,
move ``updatedAt``/``eventLastSeen``, and are emitted at most once every
``update_interval`` seconds per finding (``flush`` emits what is due; the
agent calls it every second and with ``force`` when it stops). Bounded: the
least recently updated finding is forgotten past ``max_findings`` (after
its pending update is emitted); a later repeat starts again from the same
id, since ids are derived from the key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collectors.events import iso_time

Emit = Callable[[dict[str, Any]], None]
AggKey = tuple[Any, ...]


@dataclass(slots=True)
class _Entry:
    finding: dict[str, Any]
    last_emit: float
    dirty: bool = False


class FindingAggregator:
    def __init__(self, emit: Emit, *, update_interval: float = 30.0, max_findings: int = 10_000) -> None:
        self.emit = emit
        self.update_interval = update_interval
        self.max_findings = max_findings
        self._entries: OrderedDict[AggKey, _Entry] = OrderedDict()
        self.stats = {"new": 0, "repeats": 0, "updates_emitted": 0, "forgotten": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: AggKey) -> bool:
        return key in self._entries

    def add_new(self, key: AggKey, finding: dict[str, Any], now: float) -> None:
        self._entries[key] = _Entry(finding, now)
        self.stats["new"] += 1
        self.emit(finding)
        while len(self._entries) > self.max_findings:
            _, old = self._entries.popitem(last=False)
            self.stats["forgotten"] += 1
            if old.dirty:
                self._emit_update(old)

    def repeat(self, key: AggKey, event_time: float, now: float) -> bool:
        """Count one more occurrence; False if the key is unknown (call add_new)."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        self._entries.move_to_end(key)
        self.stats["repeats"] += 1
        f = entry.finding
        service = f["service"]
        service["count"] += 1
        last = iso_time(event_time)
        service["eventLastSeen"] = max(service["eventLastSeen"], last)
        f["updatedAt"] = iso_time(now)
        entry.dirty = True
        if now - entry.last_emit >= self.update_interval:
            entry.last_emit = now
            self._emit_update(entry)
        return True

    def _emit_update(self, entry: _Entry) -> None:
        entry.dirty = False
        self.stats["updates_emitted"] += 1
        self.emit(entry.finding)

    def flush(self, now: float, *, force: bool = False) -> int:
        """Emit the pending updates that are due (all of them with ``force``); returns how many."""
        n = 0
        for entry in self._entries.values():
            if entry.dirty and (force or now - entry.last_emit >= self.update_interval):
                entry.last_emit = now
                self._emit_update(entry)
                n += 1
        return n

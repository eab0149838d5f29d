"""ProcessTable: live processes plus recently exited ones, with lineage.

Keyed by (pid, start ticks) so that pid reuse is harmless: a reused pid has a
different start time and so a different key and uuid. Bounded in memory: the
live set by ``max_live`` (oldest entries evicted if a storm overflows it; the
kernel would have to hold more processes than that) and the exited set by
``max_exited`` in exit order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from collectors.events import ProcessInfo

Key = tuple[int, int]


class ProcessTable:
    def __init__(self, max_live: int = 65536, max_exited: int = 4096) -> None:
        self.max_live = max_live
        self.max_exited = max_exited
        self._live: OrderedDict[int, ProcessInfo] = OrderedDict()  # pid -> current image
        self._by_uuid: dict[str, ProcessInfo] = {}
        self._exited: OrderedDict[str, ProcessInfo] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, pid: int) -> bool:
        return pid in self._live

    def get(self, pid: int) -> ProcessInfo | None:
        return self._live.get(pid)

    def by_uuid(self, uuid: str) -> ProcessInfo | None:
        return self._by_uuid.get(uuid)

    def live(self) -> Iterator[ProcessInfo]:
        return iter(list(self._live.values()))

    def pids(self) -> list[int]:
        return list(self._live)

    def add(self, info: ProcessInfo) -> ProcessInfo | None:
        """Insert the current image of a pid; return the image it replaces, if any.

        A replaced image of the same process (exec in place) stays findable by
        uuid for lineage; a replaced image of an older process with the same
        pid (reuse we missed the exit of) is moved to the exited set.
        """
        old = self._live.pop(info.pid, None)
        if old is not None:
            self._retire(old)
        self._live[info.pid] = info
        self._by_uuid[info.uuid] = info
        while len(self._live) > self.max_live:
            _, victim = self._live.popitem(last=False)
            self.evicted += 1
            self._retire(victim)
        return old

    def remove(self, pid: int) -> ProcessInfo | None:
        info = self._live.pop(pid, None)
        if info is not None:
            self._retire(info)
        return info

    def _retire(self, info: ProcessInfo) -> None:
        self._exited[info.uuid] = info
        self._by_uuid[info.uuid] = info
        while len(self._exited) > self.max_exited:
            uuid, _ = self._exited.popitem(last=False)
            if uuid in self._by_uuid and self._by_uuid[uuid] is not self._live.get(self._by_uuid[uuid].pid):
                del self._by_uuid[uuid]

    def parent_of(self, info: ProcessInfo) -> ProcessInfo | None:
        if info.parent_uuid is None:
            return None
        return self._by_uuid.get(info.parent_uuid)

    def lineage(
        self,
        info: ProcessInfo,
        max_depth: int = 64,
        parent: Callable[[ProcessInfo], ProcessInfo | None] | None = None,
    ) -> list[ProcessInfo]:
        """Ancestors of ``info``, nearest first (its parent, grandparent, ...); ``parent`` finds each one
        (default: by parent uuid)."""
        up = parent or self.parent_of
        out: list[ProcessInfo] = []
        seen = {info.uuid}
        cur = up(info)
        while cur is not None and len(out) < max_depth and cur.uuid not in seen:
            out.append(cur)
            seen.add(cur.uuid)
            cur = up(cur)
        return out

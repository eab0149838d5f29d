"""User names as each container sees them: its own /etc/passwd, through /proc/<pid>/root."""

from __future__ import annotations

import os
import time


class UserNames:
    """uid -> name per mount namespace, re-read when the passwd file changes."""

    def __init__(self, ttl: float = 30.0, max_namespaces: int = 256) -> None:
        self.ttl = ttl
        self.max_namespaces = max_namespaces
        self._cache: dict[int | None, tuple[float, int, dict[int, str]]] = {}

    def name(self, uid: int, pid: int, mnt_ns: int | None) -> str | None:
        now = time.monotonic()
        entry = self._cache.get(mnt_ns)
        if entry is None or now - entry[0] > self.ttl:
            entry = self._load(pid, mnt_ns, now, entry)
        return entry[2].get(uid)

    def _load(
        self, pid: int, mnt_ns: int | None, now: float, old: tuple[float, int, dict[int, str]] | None
    ) -> tuple[float, int, dict[int, str]]:
        path = f"/proc/{pid}/root/etc/passwd"
        names: dict[int, str] = {}
        mtime = -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                mtime = os.fstat(fd).st_mtime_ns
                if old is not None and old[1] == mtime:
                    names = old[2]
                else:
                    data = os.read(fd, 1 << 20)
                    for line in data.decode("utf-8", "replace").splitlines():
                        parts = line.split(":")
                        if len(parts) >= 3 and parts[2].isdigit():
                            names.setdefault(int(parts[2]), parts[0])
            finally:
                os.close(fd)
        except OSError:
            if old is not None:
                names = old[2]
        if len(self._cache) >= self.max_namespaces and mnt_ns not in self._cache:
            self._cache.pop(next(iter(self._cache)))
        entry = (now, mtime, names)
        self._cache[mnt_ns] = entry
        return entry

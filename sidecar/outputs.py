"""JSON-lines outputs (--events-out, --findings-out): buffered, bounded, never blocking the loop for long.

Writes go through a bounded in-memory buffer flushed every ``flush_interval``
or when it grows past ``flush_bytes``. If the disk is full or the path
unwritable, lines are counted as dropped and the sidecar goes on: an output
must never take the task down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import deque
from typing import Any

import orjson

log = logging.getLogger(__name__)


class JsonLinesOutput:
    def __init__(self, path: str, *, max_queue: int = 100_000, flush_interval: float = 0.1, flush_bytes: int = 1 << 18):
        self.path = path
        self.max_queue = max_queue
        self.flush_interval = flush_interval
        self.flush_bytes = flush_bytes
        self._buf: deque[bytes] = deque()
        self._size = 0
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self._fd: int | None = None
        # A flush is scheduled only when something is buffered: an idle sidecar
        # has no timer of its own here (every wake-up is CPU of someone's task).
        self._flush_handle: asyncio.TimerHandle | None = None
        if path == "-":
            self._fd = sys.stdout.fileno()
        else:
            # O_APPEND: a restarted sidecar adds to the file instead of truncating it.
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def write(self, obj: Any) -> None:
        self.write_raw(orjson.dumps(obj, default=_default))

    def write_raw(self, line: bytes) -> None:
        """Write one already-serialized JSON object (without the newline)."""
        if len(self._buf) >= self.max_queue:
            self.dropped += 1
            return
        self._buf.append(line + b"\n")
        self._size += len(line) + 1
        if self._size >= self.flush_bytes:
            self.flush()
        elif self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (synchronous use): flushed on close
            self._flush_handle = loop.call_later(self.flush_interval, self.flush)

    def start(self) -> None:
        """Kept for symmetry with other outputs: this one needs no task of its own."""

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._buf or self._fd is None:
            return
        data = b"".join(self._buf)
        count = len(self._buf)
        self._buf.clear()
        self._size = 0
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self.written += count
        except OSError as exc:
            self.errors += 1
            self.dropped += count
            if self.errors == 1 or self.errors % 1000 == 0:
                log.error("output write failed, lines dropped", extra={"path": self.path, "error": str(exc)})

    async def close(self) -> None:
        self.flush()
        if self._fd is not None and self.path != "-":
            os.close(self._fd)
        self._fd = None

    def snapshot(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped, "errors": self.errors, "queued": len(self._buf)}


def _default(obj: Any) -> Any:
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if hasattr(obj, "to_json"):
        return obj.to_json()
    raise TypeError(type(obj).__name__)

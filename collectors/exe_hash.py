"""SHA-256 of executables, computed once per file content.

Cached by (device, inode, size, mtime): a binary run a thousand times is hashed
once, and a binary rewritten in place (same inode, new mtime) is hashed again.
Hashing runs in one worker thread (hashlib releases the GIL), so a 100 MB
binary never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import OrderedDict
from concurrent.futures import Executor, ThreadPoolExecutor

from collectors.procfs import ExeFile

CacheKey = tuple[int, int, int, int]


def _hash_fd(fd: int, size_limit: int) -> str | None:
    try:
        h = hashlib.sha256()
        offset = 0
        while True:
            chunk = os.pread(fd, 1 << 20, offset)
            if not chunk:
                break
            offset += len(chunk)
            if offset > size_limit:
                return None
            h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


class ExeHasher:
    def __init__(self, max_entries: int = 4096, size_limit: int = 256 << 20, executor: Executor | None = None) -> None:
        self.max_entries = max_entries
        self.size_limit = size_limit
        self._cache: OrderedDict[CacheKey, str | None] = OrderedDict()
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="exe-hash")
        self._inflight: dict[CacheKey, asyncio.Future[str | None]] = {}
        self.hashed = 0
        self.cache_hits = 0

    @staticmethod
    def key(f: ExeFile) -> CacheKey:
        return (f.dev, f.ino, f.size, f.mtime_ns)

    def cached(self, f: ExeFile) -> tuple[bool, str | None]:
        k = self.key(f)
        if k in self._cache:
            self._cache.move_to_end(k)
            self.cache_hits += 1
            return True, self._cache[k]
        return False, None

    def hash_async(self, f: ExeFile, fd: int) -> asyncio.Future[str | None]:
        """Hash the file behind ``fd`` (which this call takes ownership of)."""
        k = self.key(f)
        inflight = self._inflight.get(k)
        if inflight is not None:
            os.close(fd)
            return inflight
        if f.size > self.size_limit:
            os.close(fd)
            fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            self._store(k, None)
            return fut
        fut = asyncio.wrap_future(self._executor.submit(_hash_fd, fd, self.size_limit))
        self._inflight[k] = fut

        def done(f_: asyncio.Future[str | None]) -> None:
            self._inflight.pop(k, None)
            if not f_.cancelled() and f_.exception() is None:
                self.hashed += 1
                self._store(k, f_.result())

        fut.add_done_callback(done)
        return fut

    def _store(self, k: CacheKey, value: str | None) -> None:
        self._cache[k] = value
        self._cache.move_to_end(k)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

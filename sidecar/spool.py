"""Spool: the bounded on-disk queue of findings between detection and the backend.

Findings reach the spool first and are sent from it, so neither a backend outage
nor a sidecar crash loses them. The spool is a directory (default under the
task's ephemeral storage) of append-only segment files ``seg-<n>.spool``. Each
record is framed ``<u32 body length><u32 crc32(body)><body>`` and the body is

- ``P`` put: ``<u64 seq><f64 severity><u16 id length><id><finding JSON>``
- ``A`` remove: ``<u64 seq>`` (acknowledged by the backend, or dropped)

Replaying the segments in order rebuilds the index: a later put of the same
finding id supersedes the earlier one (an aggregated finding's update carries
the whole finding, so only the latest needs sending), a remove deletes that seq.

Durability: every record is one ``write(2)`` as it happens, so a SIGKILL loses
nothing (the kernel has it); ``sync()`` (fsync, at most about once a second,
called by the shipper) covers a host crash, which on Fargate takes the
ephemeral storage with it anyway. A torn or corrupt record (a crash mid-write,
bit rot) ends the replay of its segment: it is counted, not fatal, and new
records always go to a fresh segment.

Bounded: by live findings (count) and their bytes. When full, the lowest
severity, oldest findings are dropped first (the new one itself, if it is the
lowest) and counted per severity label. Dead bytes on disk (acknowledged,
superseded, dropped) are reclaimed by deleting segments oldest first once
nothing in them is live, and by copying the live records of the oldest segment
forward when the files grow past twice the live bound. Segments are only ever
deleted oldest first: a remove record then never outlives the put it cancels.

Memory: the index holds one small entry per live finding; the finding's bytes
stay on disk (read back with ``pread`` when a batch is built). When the
directory cannot be used (read-only root file system, a file in the way,
another sidecar holding it) the spool keeps findings in memory only, within
``memory_max_bytes``, and says why once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import itertools
import logging
import os
import re
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("sidecar.spool")

SEVERITY_LABELS = ("LOW", "MEDIUM", "HIGH", "CRITICAL")
DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_MAX_FINDINGS = 20_000
DEFAULT_MEMORY_MAX_BYTES = 8 << 20

_HEADER = struct.Struct("<II")
_PUT = struct.Struct("<QdH")
_REMOVE = struct.Struct("<Q")
_SEGMENT_RE = re.compile(r"^seg-(\d{12})\.spool$")
# A record this large is not ours (framing lost): stop reading the segment.
_MAX_RECORD = 64 << 20


def severity_label(severity: float) -> str:
    """GuardDuty's bands as the heartbeat counts them: LOW < 4 <= MEDIUM < 7 <= HIGH < 9 <= CRITICAL."""
    if severity >= 9:
        return "CRITICAL"
    if severity >= 7:
        return "HIGH"
    if severity >= 4:
        return "MEDIUM"
    return "LOW"


@dataclass(slots=True)
class _Entry:
    seq: int
    fid: str
    severity: float
    size: int
    added: float  # monotonic time it was spooled (replayed entries: when the spool opened, minus a day)
    segment: int | None = None  # segment number holding its put record; None: in memory only
    offset: int = 0  # of the finding's JSON in that segment
    data: bytes | None = None


@dataclass(slots=True)
class _Segment:
    number: int
    path: Path
    fd: int
    size: int = 0
    live: int = 0


@dataclass(frozen=True, slots=True)
class SpoolItem:
    """One spooled finding handed to the shipper: ``seq`` is what acknowledges it."""

    seq: int
    fid: str
    data: bytes


class Spool:
    """Bounded, restart-proof queue of findings (see the module docstring).

    Not thread-safe: the agent's event loop is its only user.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_findings: int = DEFAULT_MAX_FINDINGS,
        memory_max_bytes: int = DEFAULT_MEMORY_MAX_BYTES,
        segment_bytes: int | None = None,
    ) -> None:
        self.max_findings = max_findings
        self._disk_max_bytes = max_bytes
        self.memory_max_bytes = memory_max_bytes
        self.segment_bytes = segment_bytes or max(64 << 10, min(4 << 20, max_bytes // 8))
        self.directory = Path(directory) if directory is not None else None
        self.memory_only_reason: str | None = None
        self._by_seq: dict[int, _Entry] = {}
        self._by_id: dict[str, int] = {}
        self._heap: list[tuple[float, int]] = []  # (severity, seq) of live entries, lazily cleaned
        self._segments: list[_Segment] = []
        self._next_seq = 1
        self._lock_fd: int | None = None
        self._dirty = False
        self._rolled = False
        self.bytes = 0
        self.counters: Counter[str] = Counter()
        self.dropped_by_severity: Counter[str] = Counter({label: 0 for label in SEVERITY_LABELS})
        self.on_put: Callable[[], None] | None = None  # the shipper's wake-up
        if self.directory is None:
            self._go_memory_only("no spool directory configured", log_it=False)
        else:
            try:
                self._open_directory(self.directory)
            except OSError as exc:
                self._close_files()
                self._by_seq.clear()
                self._by_id.clear()
                self._heap.clear()
                self.bytes = 0
                self._go_memory_only(f"spool directory {self.directory} unusable: {exc.strerror or exc}")
        self._enforce_bounds()

    # -- opening ------------------------------------------------------------------------------------------------
    def _open_directory(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OSError(exc.errno, "in use by another sidecar process") from None
            raise
        self._lock_fd = fd
        numbers = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _SEGMENT_RE.match(p.name)))
        replay_added = time.monotonic() - 86400.0  # replayed findings are overdue: send at once
        for n in numbers:
            path = directory / f"seg-{n:012d}.spool"
            seg = _Segment(n, path, os.open(path, os.O_RDWR | os.O_CLOEXEC))
            self._segments.append(seg)
            self._replay(seg, replay_added)
        for e in self._by_seq.values():
            self._heap.append((e.severity, e.seq))
        heapq.heapify(self._heap)
        # New records always start a fresh segment: nothing is appended after a torn tail.
        self._new_segment((numbers[-1] + 1) if numbers else 1)
        self._reclaim()
        if self._by_seq or self.counters["torn"]:
            log.info("spool reopened", extra={"spool": self.snapshot()})

    def _replay(self, seg: _Segment, added: float) -> None:
        data = Path(seg.path).read_bytes()
        seg.size = len(data)
        pos = 0
        while pos < len(data):
            if pos + _HEADER.size > len(data):
                self._torn(seg, pos, "truncated record header")
                break
            length, crc = _HEADER.unpack_from(data, pos)
            body_at = pos + _HEADER.size
            if length == 0 or length > _MAX_RECORD or body_at + length > len(data):
                self._torn(seg, pos, "truncated record")
                break
            body = data[body_at : body_at + length]
            if zlib.crc32(body) != crc:
                self._torn(seg, pos, "checksum mismatch")
                break
            kind = body[:1]
            if kind == b"P" and length >= 1 + _PUT.size:
                seq, severity, id_len = _PUT.unpack_from(body, 1)
                id_at = 1 + _PUT.size
                fid = body[id_at : id_at + id_len].decode("utf-8", "replace")
                offset = body_at + id_at + id_len
                size = body_at + length - offset
                self._index(_Entry(seq, fid, severity, size, added, seg.number, offset), seg)
                self._next_seq = max(self._next_seq, seq + 1)
            elif kind == b"A" and length == 1 + _REMOVE.size:
                (seq,) = _REMOVE.unpack_from(body, 1)
                self._unindex(seq)
            else:
                self._torn(seg, pos, "unknown record kind")
                break
            pos = body_at + length

    def _torn(self, seg: _Segment, pos: int, why: str) -> None:
        self.counters["torn"] += 1
        self.counters["tornBytes"] += seg.size - pos
        log.warning(
            "spool segment has a torn or corrupt record; the rest of it is skipped",
            extra={"segment": seg.path.name, "offset": pos, "skippedBytes": seg.size - pos, "why": why},
        )

    def _go_memory_only(self, reason: str, *, log_it: bool = True) -> None:
        if self.memory_only_reason is None:
            self.memory_only_reason = reason
            if log_it:
                log.warning(
                    "spool keeps findings in memory only: they will not survive a restart",
                    extra={"reason": reason, "memoryMaxBytes": self.memory_max_bytes},
                )

    @property
    def memory_only(self) -> bool:
        return self.memory_only_reason is not None

    @property
    def max_bytes(self) -> int:
        return min(self._disk_max_bytes, self.memory_max_bytes) if self.memory_only else self._disk_max_bytes

    # -- the index ------------------------------------------------------------------------------------------------
    def _segment(self, number: int | None) -> _Segment | None:
        if number is None:
            return None
        for seg in self._segments:
            if seg.number == number:
                return seg
        return None

    def _index(self, entry: _Entry, seg: _Segment | None) -> None:
        old = self._by_id.get(entry.fid)
        if old is not None:
            self._unindex(old)
            if old != entry.seq:  # the same seq again is a compaction's copy
                self.counters["superseded"] += 1
        self._by_seq[entry.seq] = entry
        self._by_id[entry.fid] = entry.seq
        self.bytes += entry.size
        if seg is not None:
            seg.live += 1

    def _unindex(self, seq: int) -> _Entry | None:
        entry = self._by_seq.pop(seq, None)
        if entry is None:
            return None
        if self._by_id.get(entry.fid) == seq:
            del self._by_id[entry.fid]
        self.bytes -= entry.size
        seg = self._segment(entry.segment)
        if seg is not None:
            seg.live -= 1
        return entry

    def __len__(self) -> int:
        return len(self._by_seq)

    def __contains__(self, fid: object) -> bool:
        return fid in self._by_id

    # -- writing --------------------------------------------------------------------------------------------------
    def _new_segment(self, number: int) -> None:
        assert self.directory is not None
        path = self.directory / f"seg-{number:012d}.spool"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._segments.append(_Segment(number, path, fd, size=os.fstat(fd).st_size))

    def _append(self, body: bytes) -> tuple[int, int]:
        """Write one record to the active segment; (segment number, offset of the body)."""
        seg = self._segments[-1]
        if seg.size >= self.segment_bytes:
            with contextlib.suppress(OSError):
                os.fsync(seg.fd)  # a rolled segment is complete: make it durable once
            self._new_segment(seg.number + 1)
            seg = self._segments[-1]
            self._rolled = True
        record = _HEADER.pack(len(body), zlib.crc32(body)) + body
        written = os.write(seg.fd, record)
        if written != len(record):
            # a short write (disk full): the tail is torn; later records would be unreachable
            seg.size += written
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (short write)")
        offset = seg.size + _HEADER.size
        seg.size += len(record)
        self._dirty = True
        return seg.number, offset

    def _write_failed(self, exc: OSError) -> None:
        self.counters["writeErrors"] += 1
        self._go_memory_only(f"cannot write to {self.directory}: {exc.strerror or exc}")

    def put(self, fid: str, severity: float, data: bytes) -> bool:
        """Spool one finding (its JSON). False when it was dropped at once (the spool is full of more severe
        findings). Never raises: a failing disk turns the spool memory-only."""
        self.counters["put"] += 1
        size = len(data)
        if size > self.max_bytes:
            self._count_drop(severity)
            return False
        seq = self._next_seq
        if not self._make_room(fid, severity, size):
            self._count_drop(severity)
            return False
        self._next_seq += 1
        entry = _Entry(seq, fid, severity, size, time.monotonic())
        seg: _Segment | None = None
        if not self.memory_only:
            id_bytes = fid.encode()
            try:
                number, offset = self._append(b"P" + _PUT.pack(seq, severity, len(id_bytes)) + id_bytes + data)
                entry.segment = number
                entry.offset = offset + 1 + _PUT.size + len(id_bytes)
                seg = self._segments[-1]
            except OSError as exc:
                self._write_failed(exc)
        if entry.segment is None:
            entry.data = data
        self._index(entry, seg)
        heapq.heappush(self._heap, (severity, seq))
        self._maybe_rebuild_heap()
        if self._rolled:
            # a storm with the backend away: superseded and dropped records pile up, reclaim as segments fill
            self._rolled = False
            self._reclaim()
        if self.memory_only:
            self._enforce_bounds()
        hook = self.on_put
        if hook is not None:
            hook()
        return seq in self._by_seq

    def _make_room(self, fid: str, severity: float, size: int) -> bool:
        """Drop the lowest-severity, oldest findings until one of ``size`` bytes fits; False if it is itself
        the one to drop (an older version it would supersede then stays)."""
        old_seq = self._by_id.get(fid)
        freed = self._by_seq[old_seq].size if old_seq is not None else 0
        extra = 0 if old_seq is not None else 1
        set_aside: list[tuple[float, int]] = []
        try:
            while len(self._by_seq) + extra > self.max_findings or self.bytes - freed + size > self.max_bytes:
                victim = self._lowest()
                if victim is not None and victim.seq == old_seq:
                    set_aside.append(heapq.heappop(self._heap))  # superseding frees it already
                    continue
                if victim is None or victim.severity > severity:
                    return False  # the newcomer is the least severe
                self._remove(victim.seq)
                self._count_drop(victim.severity)
            return True
        finally:
            for item in set_aside:
                heapq.heappush(self._heap, item)

    def _lowest(self) -> _Entry | None:
        while self._heap:
            seq = self._heap[0][1]
            entry = self._by_seq.get(seq)
            if entry is not None:
                return entry
            heapq.heappop(self._heap)
        return None

    def _count_drop(self, severity: float, *, overflow: bool = True) -> None:
        self.counters["dropped"] += 1
        self.dropped_by_severity[severity_label(severity)] += 1
        if overflow and (self.counters["dropped"] in (1, 10, 100) or self.counters["dropped"] % 1000 == 0):
            log.warning(
                "spool full: lowest-severity findings dropped",
                extra={"dropped": self.counters["dropped"], "bySeverity": dict(self.dropped_by_severity)},
            )

    def _enforce_bounds(self) -> None:
        while len(self._by_seq) > self.max_findings or self.bytes > self.max_bytes:
            victim = self._lowest()
            if victim is None:
                break
            self._remove(victim.seq)
            self._count_drop(victim.severity)

    def _remove(self, seq: int) -> None:
        entry = self._unindex(seq)
        if entry is None:
            return
        if entry.segment is not None and not self.memory_only:
            try:
                self._append(b"A" + _REMOVE.pack(seq))
            except OSError as exc:
                self._write_failed(exc)
        self._maybe_rebuild_heap()

    def _maybe_rebuild_heap(self) -> None:
        # removed and superseded entries leave stale heap items behind; a storm of updates must not grow it
        if len(self._heap) > 2 * len(self._by_seq) + 64:
            self._heap = [(e.severity, e.seq) for e in self._by_seq.values()]
            heapq.heapify(self._heap)

    # -- reading and acknowledging ------------------------------------------------------------------------------------
    def oldest_age(self) -> float | None:
        """Seconds since the oldest spooled finding arrived (None when empty)."""
        for entry in self._by_seq.values():
            return time.monotonic() - entry.added
        return None

    def peek(self, max_findings: int, max_bytes: int) -> list[SpoolItem]:
        """The oldest findings, up to ``max_findings`` and ``max_bytes`` (at least one when not empty)."""
        out: list[SpoolItem] = []
        total = 0
        for entry in list(itertools.islice(self._by_seq.values(), max_findings)):
            if len(out) >= max_findings or (out and total + entry.size > max_bytes):
                break
            data = self._read(entry)
            if data is None:
                continue
            out.append(SpoolItem(entry.seq, entry.fid, data))
            total += entry.size
        return out

    def _read(self, entry: _Entry) -> bytes | None:
        if entry.data is not None:
            return entry.data
        seg = self._segment(entry.segment)
        try:
            if seg is None:
                raise OSError(errno.ENOENT, "segment gone")
            data = os.pread(seg.fd, entry.size, entry.offset)
            if len(data) != entry.size:
                raise OSError(errno.EIO, "short read")
        except OSError as exc:
            self.counters["readErrors"] += 1
            log.error("spooled finding unreadable, dropped", extra={"id": entry.fid, "error": str(exc)})
            self._remove(entry.seq)
            self._count_drop(entry.severity)
            return None
        return data

    def ack(self, seqs: list[int]) -> int:
        """The backend stored these: forget them. Seqs already superseded or dropped are ignored."""
        n = 0
        for seq in seqs:
            if seq in self._by_seq:
                self._remove(seq)
                n += 1
        self.counters["acked"] += n
        self._reclaim()
        return n

    def discard(self, seq: int, why: str) -> None:
        """Forget one finding the backend will never take (too large, or unreadable to it): counted as rejected,
        and in the drops by severity (it never reaches the backend: coverage must say so), without the
        "spool full" warning."""
        entry = self._by_seq.get(seq)
        if entry is None:
            return
        self._remove(seq)
        self._count_drop(entry.severity, overflow=False)
        self.counters["rejected"] += 1
        log.error("finding rejected by the backend, dropped from the spool", extra={"id": entry.fid, "why": why})

    # -- disk space ----------------------------------------------------------------------------------------------------
    def file_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def _reclaim(self) -> None:
        if self.memory_only or not self._segments:
            return
        while len(self._segments) > 1 and self._segments[0].live == 0:
            self._delete_segment(self._segments[0])
        limit = 2 * self.max_bytes + self.segment_bytes
        for _ in range(len(self._segments) - 1):
            if self.file_bytes() <= limit or len(self._segments) < 2:
                break
            self._compact_oldest()

    def _compact_oldest(self) -> None:
        """Copy the oldest segment's live records forward, then delete it."""
        seg = self._segments[0]
        for entry in [e for e in self._by_seq.values() if e.segment == seg.number]:
            data = self._read(entry)
            if data is None:
                continue
            id_bytes = entry.fid.encode()
            try:
                number, offset = self._append(
                    b"P" + _PUT.pack(entry.seq, entry.severity, len(id_bytes)) + id_bytes + data
                )
            except OSError as exc:
                self._write_failed(exc)
                return
            seg.live -= 1
            entry.segment = number
            entry.offset = offset + 1 + _PUT.size + len(id_bytes)
            active = self._segment(number)
            assert active is not None
            active.live += 1
        self.counters["compactions"] += 1
        self._delete_segment(seg)

    def _delete_segment(self, seg: _Segment) -> None:
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.counters["deleteErrors"] += 1
            log.warning("cannot delete spool segment", extra={"segment": str(seg.path), "error": str(exc)})
            return
        os.close(seg.fd)
        self._segments.remove(seg)

    # -- life cycle -------------------------------------------------------------------------------------------------
    def sync(self) -> None:
        """fsync the active segment if anything was written since the last call (blocking: call it off the loop)."""
        if not self._dirty or not self._segments:
            return
        self._dirty = False
        try:
            os.fsync(self._segments[-1].fd)
        except OSError as exc:
            self.counters["syncErrors"] += 1
            if self.counters["syncErrors"] == 1:
                log.warning("spool fsync failed", extra={"error": str(exc)})

    def take_dirty_fd(self) -> int | None:
        """The active segment's descriptor if written since the last call, for an fsync off the event loop."""
        if not self._dirty or not self._segments:
            return None
        self._dirty = False
        return self._segments[-1].fd

    def close(self) -> None:
        self.sync()
        self._close_files()

    def _close_files(self) -> None:
        for seg in self._segments:
            with contextlib.suppress(OSError):
                os.close(seg.fd)
        self._segments.clear()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spooled": len(self._by_seq),
            "spoolBytes": self.bytes,
            "fileBytes": self.file_bytes(),
            "segments": len(self._segments),
            "dropped": self.counters["dropped"],
            "droppedBySeverity": dict(self.dropped_by_severity),
            "memoryOnly": self.memory_only,
        }
        if self.memory_only_reason is not None:
            out["memoryOnlyReason"] = self.memory_only_reason
        for key in ("superseded", "acked", "torn", "tornBytes", "rejected", "writeErrors", "readErrors", "compactions"):
            if self.counters[key]:
                out[key] = self.counters[key]
        return out

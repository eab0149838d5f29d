"""The sidecar's health, for container health checks (`runtime-sidecar health`, ECS's healthCheck, Docker's
HEALTHCHECK).

The running sidecar rewrites a small status file every few seconds (:class:`HealthFile`); the health command,
a separate process started by the container runtime, reads it (:func:`check`). A file rather than an HTTP port:
the sidecar shares the task's network namespace with the app, and a listening port there would be one more
thing an app could collide with or reach. The file is written atomically (rename), so a reader never sees half
of one.

Where: ``<state dir>/health.json``; if the state directory is not writable (read-only root file system and no
volume), ``/dev/shm`` and then the temp directory, like the threat lists. The checker looks at every candidate
and trusts the newest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

FILE_NAME = "health.json"
DEFAULT_MAX_AGE_S = 30.0
WRITE_INTERVAL_S = 5.0

log = logging.getLogger("sidecar.health")


def fallback_dirs() -> list[Path]:
    """Writable places when the state directory is not: tmpfs, then the temp directory."""
    return [
        Path("/dev/shm") / f"runtime-sidecar-{os.getuid()}",
        Path(tempfile.gettempdir()) / f"runtime-sidecar-{os.getuid()}",
    ]


def candidates(state_dir: str | os.PathLike[str], fallbacks: list[Path] | None = None) -> list[Path]:
    """Where the status file may be, in the writer's order of preference."""
    dirs = [Path(state_dir), *(fallback_dirs() if fallbacks is None else fallbacks)]
    return [d / FILE_NAME for d in dirs]


class LastError(logging.Handler):
    """Remembers the last ERROR (or worse) log record, for the status file's ``lastError``."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None
        self.time: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        extra = record.__dict__.get("error") or record.__dict__.get("reason")
        self.message = record.getMessage() + (f": {extra}" if extra else "")
        self.time = record.created


class HealthFile:
    """The status file of one running sidecar: pid, time, sources running, last error."""

    def __init__(self, state_dir: str | os.PathLike[str], fallbacks: list[Path] | None = None) -> None:
        self.paths = candidates(state_dir, fallbacks)
        self.path: Path | None = None  # the one in use, once a write succeeded
        self.last_error = LastError()
        self.writes = 0
        self.failures = 0

    def status(self, sources: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "time": time.time(),
            # CLOCK_MONOTONIC is one clock for every process of the machine: immune to wall-clock steps
            "monotonic": time.monotonic(),
            "sources": sorted(sources),
            "lastError": self.last_error.message,
            "lastErrorTime": self.last_error.time,
            **(extra or {}),
        }

    def write(self, sources: list[str], extra: dict[str, Any] | None = None) -> bool:
        """Replace the status file. Never raises: health reporting must not hurt detection."""
        data = orjson.dumps(self.status(sources, extra))
        for path in [self.path] if self.path else self.paths:
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError as exc:
                if self.path is not None:  # the place that worked no longer does: look again next time
                    self.path = None
                    log.warning("cannot write the health file", extra={"path": str(path), "error": str(exc)})
                continue
            self.path = path
            self.writes += 1
            return True
        self.failures += 1
        return False

    async def run(
        self,
        sources: Callable[[], list[str]],
        interval_s: float = WRITE_INTERVAL_S,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Write every ``interval_s`` until cancelled; ``sources()`` names the event sources running now."""
        logging.getLogger().addHandler(self.last_error)
        try:
            while True:
                self.write(sources(), extra() if extra else None)
                await asyncio.sleep(interval_s)
        finally:
            logging.getLogger().removeHandler(self.last_error)
            self.remove()

    def remove(self) -> None:
        """At a clean exit: a stopped sidecar must not look healthy to a checker that comes later."""
        if self.path is not None:
            try:
                self.path.unlink()
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def check(path: str | os.PathLike[str] | list[Path], max_age_s: float = DEFAULT_MAX_AGE_S) -> tuple[bool, str]:
    """(healthy, why) from the status file at ``path`` (or the newest of several, e.g. :func:`candidates`).

    Unhealthy: no file, an unreadable one, a writer that is gone, a file older than ``max_age_s`` (the event
    loop is stuck), or no process source running. A last error alone does not make it unhealthy: it is shown.
    """
    paths = path if isinstance(path, list) else [Path(path)]
    found = [(p, s) for p in paths if (s := _read(p)) is not None]
    if not found:
        existing = [str(p) for p in paths if p.exists()]
        if existing:
            return False, f"status file unreadable: {', '.join(existing)}"
        return False, f"no status file ({', '.join(map(str, paths))}): the sidecar is not running or never wrote it"
    where, status = max(found, key=lambda ps: float(ps[1].get("time") or 0))
    pid = status.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return False, f"the sidecar that wrote {where} (pid {pid}) is gone"
    if isinstance(status.get("monotonic"), int | float):
        age = time.monotonic() - float(status["monotonic"])
    else:
        age = time.time() - float(status.get("time") or 0)
    if age > max_age_s:
        return False, f"status not refreshed for {age:.0f} s (more than {max_age_s:.0f} s): the sidecar is stuck"
    sources = [str(s) for s in status.get("sources") or []]
    if not any(s in ("proc_connector", "proc_poll") for s in sources):
        return False, f"no process source running (sources: {', '.join(sources) or 'none'}); see runtime-sidecar probe"
    message = f"healthy: pid {pid}, sources {', '.join(sources)}, updated {age:.0f} s ago"
    if status.get("lastError"):
        message += f"; last error: {status['lastError']}"
    return True, message

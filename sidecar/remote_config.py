"""Remote configuration: the detection policy and threat lists the backend serves, applied without a restart.

``GET /agent/v1/config`` at start and every ``config_poll_interval_s`` (60 s),
and at once when a heartbeat's answer names another etag::

    If-None-Match: "<etag>"[, "<refused etag>"]  ->  304 (nothing to do, nothing rebuilt)
                                       ->  200, ETag: "<etag>"
    {"etag": "<etag>",
     "policy": {<policy document, as detectors.policy accepts; its threat_lists/trusted_lists are ignored>},
     "threatLists": [{"name", "format": "plain"|"stix"|"otx", "category", "content"}],
     "trustedLists": [same]}

Each list's content is written to ``<state dir>/lists/<etag>/<safe name>`` (a
directory per configuration, so the engine in use never reads a half-written
set; older ones are removed once the new one is applied) and the policy is
loaded with those paths. If the state directory cannot be written (read-only
root file system), the lists go to ``/dev/shm`` or the temporary directory.

Local policy file and remote configuration together: the local file
(``--policy-file``) is the base and stays in force; the remote configuration
adds its threat and trusted lists, named lists, exceptions and rules. A named
list defined in both, or a rule id used in both, refuses the remote
configuration (problem indexes in the message count the local entries first).

A configuration that does not validate is refused: the current one stays,
the problem is logged once and reported in every heartbeat (``configError``)
until a good one arrives. A 404 means the backend has no configuration for us:
the current policy stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from detectors.policy import Policy, PolicyError
from sidecar.shipper import CollectorClient, TransportError

log = logging.getLogger("sidecar.remote_config")

CONFIG_PATH = "/agent/v1/config"
MAX_LISTS = 256


class RemoteConfigError(Exception):
    """Why a served configuration was refused, worded for the operator."""


class RemoteList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    format: Literal["plain", "stix", "otx"] = "plain"
    category: str | None = None
    content: str


class RemoteConfigDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    etag: str | None = None
    policy: dict[str, Any] = Field(default_factory=dict)
    threatLists: list[RemoteList] = Field(default_factory=list, max_length=MAX_LISTS)
    trustedLists: list[RemoteList] = Field(default_factory=list, max_length=MAX_LISTS)


def safe_name(name: str, taken: set[str]) -> str:
    """A file name for a list: no path separators, no dot files, unique within one configuration."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:100] or "list"
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    taken.add(candidate)
    return candidate


def _etag_dir(etag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", etag)[:80] or "config"


def lists_root(state_dir: str | os.PathLike[str]) -> Path:
    """The first writable place for list files: the state directory, then tmpfs, then the temp directory."""
    problems = []
    for candidate in (
        Path(state_dir) / "lists",
        Path("/dev/shm") / f"runtime-sidecar-{os.getuid()}" / "lists",
        Path(tempfile.gettempdir()) / f"runtime-sidecar-{os.getuid()}" / "lists",
    ):
        try:
            candidate.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = candidate / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
            return candidate
        except OSError as exc:
            problems.append(f"{candidate}: {exc.strerror or exc}")
    raise RemoteConfigError("no writable directory for threat lists: " + "; ".join(problems))


def merge_policy(
    base: Policy,
    remote: dict[str, Any],
    threat_lists: list[dict[str, Any]],
    trusted_lists: list[dict[str, Any]],
    source: str,
) -> Policy:
    """The local policy with the remote additions (see the module docstring). Raises PolicyError."""
    remote = dict(remote)
    # the lists come as contents, never as paths on this machine
    remote.pop("threat_lists", None)
    remote.pop("trusted_lists", None)
    doc = base.to_json()
    problems = []
    named = remote.pop("lists", {})
    exceptions = remote.pop("exceptions", [])
    rules = remote.pop("rules", [])
    if not isinstance(named, dict):
        problems.append(f"{source}: lists: expected a mapping of named lists")
        named = {}
    if not isinstance(exceptions, list):
        problems.append(f"{source}: exceptions: expected a list")
        exceptions = []
    if not isinstance(rules, list):
        problems.append(f"{source}: rules: expected a list")
        rules = []
    for clash in sorted(set(named) & set(doc["lists"])):
        problems.append(f"{source}: lists.{clash}: also defined in the local policy file ({base.source})")
    if problems:
        raise PolicyError(problems)
    merged = {
        **remote,  # anything else (version, unknown keys) is validated by Policy.parse
        "threat_lists": doc["threat_lists"] + threat_lists,
        "trusted_lists": doc["trusted_lists"] + trusted_lists,
        "lists": {**doc["lists"], **named},
        "exceptions": doc["exceptions"] + exceptions,
        "rules": doc["rules"] + rules,
    }
    return Policy.parse(merged, source=source)


ApplyPolicy = Callable[[Policy], Awaitable[None]]


class RemoteConfig:
    """Polls the backend's configuration and applies each new valid one through ``apply`` (which swaps the
    detection engine)."""

    def __init__(
        self,
        client: CollectorClient,
        *,
        base_policy: Policy,
        state_dir: str | os.PathLike[str],
        apply: ApplyPolicy,
        interval_s: float = 60.0,
        timeout_s: float = 30.0,
    ) -> None:
        self.client = client
        self.base_policy = base_policy
        self.state_dir = Path(state_dir)
        self.apply = apply
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.etag: str | None = None
        self.error: str | None = None
        self.refused_etag: str | None = None
        self.lists_dir: Path | None = None
        self.counters = {"polls": 0, "applied": 0, "unchanged": 0, "refused": 0, "failed": 0}
        self._poke = asyncio.Event()
        self._logged: set[str] = set()

    def poke(self, etag: str | None = None) -> None:
        """Poll now (a heartbeat answer named ``etag``); ignored when it is the one in use or refused."""
        if etag is None or etag not in (self.etag, self.refused_etag):
            self._poke.set()

    async def run(self) -> None:
        while True:
            await self.poll()
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.interval_s)

    async def poll(self) -> str:
        """One GET; returns "applied", "unchanged", "refused", "none" (404) or "failed"."""
        self.counters["polls"] += 1
        # the refused one too: the backend then answers 304 until it serves another, not the same body again
        known = [f'"{e}"' for e in (self.etag, self.refused_etag) if e]
        headers = {"If-None-Match": ", ".join(known)} if known else {}
        try:
            reply = await self.client.request("GET", CONFIG_PATH, headers=headers, timeout_s=self.timeout_s)
        except TransportError as exc:
            return self._failed(str(exc))
        if reply.status == 304:
            self.counters["unchanged"] += 1
            return "unchanged"
        if reply.status == 404:
            return "none"
        if reply.status != 200:
            return self._failed(f"HTTP {reply.status}: {self.client.redact(reply.message())}")
        header_etag = next((v for k, v in reply.headers.items() if k.lower() == "etag"), None)
        data = reply.json()
        if not isinstance(data, dict):
            return self._refuse(_unquote(header_etag) or "?", "the body is not a JSON object")
        etag = str(data.get("etag") or _unquote(header_etag) or "")
        if not etag:
            return self._refuse("?", "no etag (neither in the body nor in the ETag header)")
        if etag == self.etag:
            self.counters["unchanged"] += 1
            return "unchanged"
        if etag == self.refused_etag:
            self.counters["refused"] += 1
            return "refused"
        try:
            doc = RemoteConfigDocument.model_validate(data)
            policy, directory = self._build(doc, etag)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:20])
            return self._refuse(etag, problems)
        except (PolicyError, RemoteConfigError) as exc:
            return self._refuse(etag, str(exc))
        try:
            await self.apply(policy)
        except Exception as exc:  # a policy that validates but cannot be built must not stop polling
            log.exception("remote configuration could not be applied", extra={"etag": etag})
            return self._refuse(etag, f"cannot build the detection engine: {exc!r}")
        self.etag = etag
        self.error = None
        self.refused_etag = None
        self.counters["applied"] += 1
        self._remove_other_list_dirs(directory)
        log.info(
            "remote configuration applied",
            extra={"etag": etag, "policy": policy.snapshot(), "threatLists": len(doc.threatLists),
                   "trustedLists": len(doc.trustedLists)},
        )  # fmt: skip
        return "applied"

    def _build(self, doc: RemoteConfigDocument, etag: str) -> tuple[Policy, Path]:
        if self.lists_dir is None:
            self.lists_dir = lists_root(self.state_dir)
        directory = self.lists_dir / _etag_dir(etag)
        shutil.rmtree(directory, ignore_errors=True)
        taken: set[str] = set()
        specs: dict[str, list[dict[str, Any]]] = {"threat": [], "trusted": []}
        try:
            directory.mkdir(mode=0o700)
            for kind, lists in (("threat", doc.threatLists), ("trusted", doc.trustedLists)):
                for item in lists:
                    path = directory / safe_name(item.name, taken)
                    path.write_text(item.content, encoding="utf-8")
                    spec: dict[str, Any] = {"path": str(path), "format": item.format, "name": item.name}
                    if item.category is not None:
                        spec["category"] = item.category
                    specs[kind].append(spec)
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise RemoteConfigError(f"cannot write the threat lists under {directory}: {exc}") from None
        try:
            policy = merge_policy(
                self.base_policy, doc.policy, specs["threat"], specs["trusted"], source=f"remote config {etag}"
            )
        except PolicyError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return policy, directory

    def _remove_other_list_dirs(self, keep: Path) -> None:
        if self.lists_dir is None:
            return
        for child in self.lists_dir.iterdir():
            if child != keep and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)

    def _refuse(self, etag: str, problem: str) -> str:
        self.counters["refused"] += 1
        self.refused_etag = etag
        self.error = f"configuration {etag} refused: {problem}"[:2000]
        if self.error not in self._logged:
            self._logged.add(self.error)
            log.error(
                "remote configuration refused; the current one stays in force",
                extra={"etag": etag, "problem": problem, "current": self.etag},
            )
        return "refused"

    def _failed(self, error: str) -> str:
        self.counters["failed"] += 1
        if error not in self._logged:
            if len(self._logged) > 100:
                self._logged.clear()
            self._logged.add(error)
            log.warning("cannot fetch the remote configuration", extra={"error": error})
        return "failed"

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.counters,
            "etag": self.etag,
            "error": self.error,
            "listsDir": str(self.lists_dir) if self.lists_dir else None,
        }


def _unquote(etag: str | None) -> str | None:
    if etag is None:
        return None
    etag = etag.strip().removeprefix("W/")
    return etag[1:-1] if len(etag) >= 2 and etag[0] == etag[-1] == '"' else etag

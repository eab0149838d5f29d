"""DetectorEngine: events in, findings out.

Routes each event to the detectors that read its kind, drops detections the
policy suppresses (trusted lists, exceptions), builds the GuardDuty finding of
the rest and aggregates repeats (:class:`~detectors.aggregate.FindingAggregator`).
A detector that raises is counted and logged once, never propagated: one bug
must not blind the others.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from collectors.events import RuntimeEvent
from detectors import catalog, registry
from detectors.aggregate import AggKey, FindingAggregator
from detectors.base import Detection, Detector, DetectorContext
from detectors.build import FindingScope, build_finding, finding_id

log = logging.getLogger("detectors")

EmitFinding = Callable[[dict[str, Any]], None]


class Suppressor(Protocol):
    """The user's tuning (detectors.policy): why a detection must not become a finding, or None."""

    def suppressed(self, detection: Detection, finding_type: catalog.FindingType) -> str | None: ...


class DetectorEngine:
    def __init__(
        self,
        ctx: DetectorContext,
        scope: FindingScope,
        emit: EmitFinding,
        *,
        detectors: Sequence[type[Detector]] | None = None,
        extra: Sequence[Detector] = (),
        suppressor: Suppressor | None = None,
        custom_types: Mapping[str, catalog.FindingType] | None = None,
        update_interval: float = 30.0,
        max_findings: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ctx = ctx
        self.scope = scope
        self.clock = clock
        classes = registry.detector_classes() if detectors is None else list(detectors)
        self.detectors: list[Detector] = [cls(ctx) for cls in classes] + list(extra)
        self.types = dict(catalog.catalog())
        self.types.update(custom_types or {})
        self._by_kind: dict[str, list[Detector]] = defaultdict(list)
        for det in self.detectors:
            for t in det.types:
                if t not in self.types:
                    raise catalog.CatalogError(f"detector {det.name} emits {t!r}, which is not in the catalog")
            for k in det.kinds:
                self._by_kind[k].append(det)
        self.suppressor = suppressor
        self.aggregator = FindingAggregator(emit, update_interval=update_interval, max_findings=max_findings)
        self.stats: Counter[str] = Counter()
        self.by_type: Counter[str] = Counter()
        self.suppressed: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    # -- events in ---------------------------------------------------------------------------------------------
    def on_event(self, event: RuntimeEvent) -> None:
        self.stats["events"] += 1
        p = event.process
        if p is not None:
            if p.pid in self.ctx.self_pids:
                return
            if event.kind == "process.exec":
                self.ctx.container_start.observe(p)
        dets = self._by_kind.get(event.kind)
        if not dets:
            return
        for det in dets:
            try:
                found: Iterable[Detection] = det.on_event(event) or ()
                for d in found:
                    self.accept(d)
            except Exception:
                self.errors[det.name] += 1
                if self.errors[det.name] == 1:
                    log.exception("detector failed; it keeps running", extra={"detector": det.name})

    # -- detections -> findings --------------------------------------------------------------------------------
    def accept(self, d: Detection) -> None:
        ft = self.types.get(d.type)
        if ft is None:
            self.errors["unknown_type"] += 1
            log.error("detection of a type not in the catalog", extra={"type": d.type})
            return
        if self.suppressor is not None:
            why = self.suppressor.suppressed(d, ft)
            if why is not None:
                self.suppressed[why] += 1
                return
        now = self.clock()
        key = self.aggregation_key(d)
        when = d.time if d.time is not None else now
        if self.aggregator.repeat(key, when, now):
            return
        self.by_type[ft.name] += 1
        fid = finding_id(self.scope, key)
        self.aggregator.add_new(key, build_finding(d, ft, self.scope, self.ctx, fid=fid, now=now), now)

    @staticmethod
    def aggregation_key(d: Detection) -> AggKey:
        where = d.where
        container = (where.id or where.name) if where is not None else None
        exe = d.process.executable_path if d.process is not None else None
        return (d.type, container, exe, *d.key)

    def adopt(self, old: DetectorEngine) -> None:
        """Take over from ``old`` (a new policy): its pending updates are emitted, then its aggregated findings
        (their counts) and the container start times it learnt carry on here."""
        old.flush(force=True)
        self.aggregator = old.aggregator
        self.ctx.container_start = old.ctx.container_start

    def flush(self, *, force: bool = False) -> int:
        """Detections detectors held back that are due, then aggregated updates that are due (all with force)."""
        now = self.clock()
        for det in self.detectors:
            try:
                for d in det.tick(now if not force else float("inf")):
                    self.accept(d)
            except Exception:
                self.errors[det.name] += 1
                if self.errors[det.name] == 1:
                    log.exception("detector failed; it keeps running", extra={"detector": det.name})
        return self.aggregator.flush(now, force=force)

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "events": self.stats["events"],
            "findings": dict(self.by_type),
            "aggregator": {**self.aggregator.stats, "held": len(self.aggregator)},
        }
        if self.suppressed:
            out["suppressed"] = dict(self.suppressed)
        if self.errors:
            out["errors"] = dict(self.errors)
        per = {d.name: s for d in self.detectors if (s := d.snapshot())}
        if per:
            out["detectors"] = per
        return out

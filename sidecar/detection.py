"""The detection stage of the agent: policy + threat intelligence + DetectorEngine, from the settings.

Kept apart from app.py so that the agent loop stays about wiring and life
cycle. Bad policy files stop the sidecar at start (exit 2, the message names
the file and each problem); bad lines in threat lists do not: they are
logged with file and line and the rest of the list loads.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

from collectors.process_table import ProcessTable
from detectors.base import DetectorContext
from detectors.build import FindingScope
from detectors.engine import DetectorEngine
from detectors.intel import ThreatIntel
from detectors.policy import Policy, PolicyError
from sidecar import __version__
from sidecar.config import ConfigError, Settings
from sidecar.ecs import TaskIdentity

log = logging.getLogger("sidecar.detection")

_AGENT_NS = uuid.UUID("6c0b9a52-3f5e-4d1e-9b7a-2f0a8c1d5e77")


def scope_of(identity: TaskIdentity) -> FindingScope:
    definition = None
    if identity.family and identity.revision:
        definition = (
            f"arn:{identity.partition}:ecs:{identity.region}:{identity.account_id}:"
            f"task-definition/{identity.family}:{identity.revision}"
        )
    return FindingScope(
        account_id=identity.account_id,
        region=identity.region,
        partition=identity.partition,
        cluster_name=identity.cluster_name,
        cluster_arn=identity.cluster_arn,
        task_arn=identity.task_arn,
        task_definition_arn=definition,
        task_version=identity.revision,
        launch_type=identity.launch_type,
        host_mode=identity.is_local,
        agent_id=str(uuid.uuid5(_AGENT_NS, f"{identity.task_arn}/{identity.hostname}")),
        agent_version=__version__,
        images={c.docker_id: c.image for c in identity.containers if c.image},
    )


def load_policy(settings: Settings) -> Policy:
    """The user's policy, or the empty one. Raises ConfigError (every problem, with file and place) when invalid."""
    if not settings.policy_file:
        return Policy.empty()
    try:
        return Policy.load(settings.policy_file)
    except PolicyError as exc:
        raise ConfigError(f"invalid detection policy (RUNTIME_SIDECAR_POLICY_FILE / --policy-file):\n{exc}") from None


def build_engine(
    settings: Settings,
    identity: TaskIdentity,
    table: ProcessTable,
    emit: Callable[[dict[str, Any]], None],
    policy: Policy,
) -> DetectorEngine:
    intel: ThreatIntel | None = None
    if settings.threat_intel:
        intel, problems = ThreatIntel.load(policy.threat_lists, policy.trusted_lists, bundled=True)
        for problem in problems[:100]:
            log.warning("threat list problem", extra={"problem": str(problem)})
        if len(problems) > 100:
            log.warning("more threat list problems not shown", extra={"count": len(problems) - 100})
        log.info("threat intelligence loaded", extra={"intel": intel.snapshot()})
    ctx = DetectorContext(table=table, intel=intel, self_pids=frozenset({os.getpid()}))
    return DetectorEngine(
        ctx,
        scope_of(identity),
        emit,
        extra=policy.rule_detectors(ctx),
        suppressor=policy,
        custom_types=policy.custom_types(),
        update_interval=settings.finding_update_interval_s,
        max_findings=settings.max_findings,
    )

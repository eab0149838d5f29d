"""Runtime events for the timeline: stored once, bounded per task and in time, only for the token's cluster."""

from __future__ import annotations

from typing import Any

from backend_env import BackendThread, iso
from sqlalchemy import func, select

from backend import events, tenancy
from backend.models import RuntimeEventRow

ACCOUNT, REGION = "111111111111", "us-east-1"
TASK = f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/prod/0123456789abcdef"
TASK_INFO = {"accountId": ACCOUNT, "region": REGION, "clusterName": "prod", "taskArn": TASK}


def _event(i: int, kind: str = "process.exec", t0: float = 1_760_000_000.0) -> dict[str, Any]:
    return {
        "kind": kind,
        "time": iso(t0 + i),
        "process": {"pid": 100 + i, "name": "sh", "executablePath": "/bin/sh", "commandLine": f"sh -c step{i}",
                    "containerName": "app"},
    }  # fmt: skip


def _count(b: BackendThread, task: str = TASK) -> int:
    return int(b.in_session(lambda s: _scalar(s, task)))


async def _scalar(s: Any, task: str) -> int:
    return int((await s.execute(select(func.count()).where(RuntimeEventRow.task_arn == task))).scalar_one())


def test_events_are_stored_once_and_checked_against_the_token(backend: BackendThread) -> None:
    token = backend.token()
    batch = {"agentId": "a-1", "task": TASK_INFO, "events": [_event(i) for i in range(30)]}
    status, out, _ = backend.post("/agent/v1/events", batch, token, gzipped=True)
    assert status == 200 and out == {"stored": 30, "duplicates": 0}
    status, out, _ = backend.post("/agent/v1/events", batch, token)
    assert status == 200 and out == {"stored": 0, "duplicates": 30}
    assert _count(backend) == 30
    row = backend.in_session(lambda s: s.get(RuntimeEventRow, (tenancy.detector_id_for(ACCOUNT, REGION),
                                                                _first_id(batch))))  # fmt: skip
    assert row is not None and row.process_name == "sh" and row.container_name == "app"
    other = backend.token(cluster="staging")
    status, out, _ = backend.post("/agent/v1/events", batch, other)
    assert status == 403 and "staging" in out["error"]
    bad = {**batch, "events": [_event(0), {"kind": "process.exec", "time": "yesterday"}]}
    status, out, _ = backend.post("/agent/v1/events", bad, token)
    assert status == 400 and out["field"] == "events[1].time"
    status, out, _ = backend.post("/agent/v1/events", {**batch, "task": {**TASK_INFO, "taskArn": "nope"}}, token)
    assert status == 400 and out["field"] == "task.taskArn"


def _first_id(batch: dict[str, Any]) -> str:
    rows = [events.event_row("d", TASK, 0, batch["events"][0], 0)]
    return str(rows[0]["id"])


def test_pruning_keeps_the_newest_within_retention_and_cap(sqlite_backend: BackendThread) -> None:
    b = sqlite_backend
    token = b.token()
    other_task = TASK.replace("0123456789abcdef", "fedcba9876543210")
    for task, n in ((TASK, 250), (other_task, 50)):
        batch = {"agentId": "a", "task": {**TASK_INFO, "taskArn": task}, "events": [_event(i) for i in range(n)]}
        assert b.post("/agent/v1/events", batch, token)[0] == 200
    removed = b.in_session(lambda s: events.prune_events(s, older_than_ms=0, max_per_task=100))
    assert removed == 150 and _count(b) == 100 and _count(b, other_task) == 50
    newest = b.in_session(_times)
    assert min(newest) == ((1_760_000_000 + 150) * 1000)  # the 100 newest of the crowded task remain
    removed = b.in_session(lambda s: events.prune_events(s, older_than_ms=tenancy.now_ms() + 1, max_per_task=100))
    assert removed == 150 and _count(b) == 0 and _count(b, other_task) == 0


async def _times(s: Any) -> list[int]:
    return list((await s.execute(select(RuntimeEventRow.time).where(RuntimeEventRow.task_arn == TASK))).scalars())

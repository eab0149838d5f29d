"""The sidecar's runtime events to the backend: bounded by rate and buffer, best effort, counted when dropped."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import orjson
from backend_env import BackendThread, iso
from sqlalchemy import func, select

from backend.models import RuntimeEventRow
from sidecar.event_shipper import EventShipper
from sidecar.shipper import CollectorClient

ACCOUNT, REGION = "111111111111", "us-east-1"
TASK = {"accountId": ACCOUNT, "region": REGION, "clusterName": "prod",
        "taskArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/prod/0123456789abcdef"}  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _event(i: int) -> bytes:
    return orjson.dumps({"kind": "process.exec", "time": iso(1_760_000_000 + i), "process": {"pid": i, "name": "sh"}})


async def _stored(b: BackendThread) -> int:
    assert b.server.db is not None
    async with b.server.db.sessions() as s:
        return int((await s.execute(select(func.count()).select_from(RuntimeEventRow))).scalar_one())


async def test_rate_and_buffer_bound_what_is_kept_and_the_rest_is_counted(tmp_path: Path) -> None:
    b = BackendThread(f"sqlite:///{tmp_path / 'b.db'}").start()
    client = CollectorClient(b.url, b.token())
    clock = Clock()
    shipper = EventShipper(client, "agent-1", TASK, max_per_s=100, max_buffer=150, clock=clock)
    try:
        for i in range(1000):  # a burst: one second's worth goes in
            shipper.offer(_event(i))
        assert shipper.snapshot()["buffered"] == 100 and shipper.counters["eventsDropped"] == 900
        clock.now += 10  # quiet for a while: the bucket refills, the buffer bounds what waits
        for i in range(1000, 1200):
            shipper.offer(_event(i))
        assert shipper.snapshot()["buffered"] == 150
        await shipper.send_once()
        assert shipper.counters["eventsSent"] == 150 and shipper.snapshot()["buffered"] == 0
        assert b.call(lambda: _stored(b)) == 150
    finally:
        await client.close()
        b.stop()


async def test_a_backend_away_costs_one_retry_then_the_batch(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = CollectorClient(f"http://127.0.0.1:{port}", "rtm_x")
    shipper = EventShipper(client, "agent-1", TASK, max_per_s=1000)
    try:
        for i in range(10):
            shipper.offer(_event(i))
        await shipper.send_once()  # refused: kept for one more round
        assert shipper.counters["failures"] == 1 and shipper.counters["eventsDropped"] == 0
        await shipper.send_once()  # refused again: dropped and counted
        assert shipper.counters["failures"] == 2 and shipper.counters["eventsDropped"] == 10
        snap: dict[str, Any] = shipper.snapshot()
        assert snap["buffered"] == 0 and snap["eventsSent"] == 0
    finally:
        await client.close()

"""The Shipper against a real collector (tests/collector_server.py) on 127.0.0.1: batching, gzip, retries,
Retry-After, splitting, permanent errors without a hot loop, outages, connections cut mid-request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from collector_server import CollectorServer

from sidecar.logs import JsonFormatter
from sidecar.shipper import CollectorClient, Shipper, retry_after
from sidecar.spool import Spool

TOKEN = "s3cr3t-agent-token-value"


def make_finding(fid: str, severity: float = 5.0, count: int = 1) -> dict[str, Any]:
    return {
        "schemaVersion": "2.0",
        "id": fid,
        "type": "Execution:Runtime/NewBinaryExecuted",
        "severity": severity,
        "title": "t",
        "description": "d",
        "createdAt": "2026-01-01T00:00:00.000Z",
        "updatedAt": "2026-01-01T00:00:00.000Z",
        "accountId": "123456789012",
        "region": "us-east-1",
        "partition": "aws",
        "resource": {"resourceType": "ECSCluster", "ecsClusterDetails": {"name": "c"}},
        "service": {
            "serviceName": "guardduty",
            "count": count,
            "eventFirstSeen": "2026-01-01T00:00:00.000Z",
            "eventLastSeen": "2026-01-01T00:00:00.000Z",
        },
    }


def spool_finding(spool: Spool, fid: str, severity: float = 5.0, count: int = 1) -> None:
    spool.put(fid, severity, orjson.dumps(make_finding(fid, severity, count)))


@pytest.fixture
def server() -> Iterator[CollectorServer]:
    with CollectorServer(token=TOKEN) as s:
        yield s


class Rig:
    def __init__(self, server: CollectorServer, spool: Spool, **kw: Any) -> None:
        self.client = CollectorClient(server.url, TOKEN)
        opts: dict[str, Any] = {"batch_max_age_s": 0.2, "backoff_base_s": 0.05, "backoff_cap_s": 0.2}
        opts.update(kw)
        self.shipper = Shipper(self.client, spool, "agent-1", **opts)
        self.task = asyncio.get_running_loop().create_task(self.shipper.run())

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool")
    yield s
    s.close()


async def test_batches_close_by_size_then_by_age(server: CollectorServer, spool: Spool) -> None:
    rig = Rig(server, spool, batch_max_findings=10, batch_max_age_s=1.0)
    try:
        start = time.monotonic()
        for i in range(25):
            spool_finding(spool, f"f{i}")
        await server.await_until(lambda s: len(s.stored) == 20, timeout=5)
        assert time.monotonic() - start < 0.8, "full batches go at once"
        await asyncio.sleep(0.3)
        assert len(server.stored) == 20, "the last 5 wait for the batch age"
        await server.await_until(lambda s: len(s.stored) == 25, timeout=5)
        assert time.monotonic() - start >= 0.95
        reqs = server.findings_requests()
        assert [r.findings for r in reqs] == [10, 10, 5]
        assert all(r.gzip and r.authorization == f"Bearer {TOKEN}" and r.status == 200 for r in reqs)
        assert len({r.batch_id for r in reqs}) == 3
        assert set(server.stored.values()) == {1}
        assert server.findings["f3"] == make_finding("f3"), "the gzip body decodes to the spooled finding"
        await asyncio.sleep(0.1)
        assert len(spool) == 0 and rig.shipper.snapshot()["findingsSent"] == 25
    finally:
        await rig.close()


async def test_503_with_retry_after_then_success_delivers_each_finding_once(
    server: CollectorServer, spool: Spool
) -> None:
    server.fail_next = 2
    server.retry_after = "0.4"
    rig = Rig(server, spool)
    try:
        for i in range(5):
            spool_finding(spool, f"f{i}")
        await server.await_until(lambda s: len(s.stored) == 5, timeout=10)
        reqs = server.findings_requests()
        assert [r.status for r in reqs] == [503, 503, 200]
        assert len({r.batch_id for r in reqs}) == 1, "a retry is the same batch"
        # Retry-After is honoured, not the (much shorter) backoff
        assert reqs[1].at - reqs[0].at >= 0.38 and reqs[2].at - reqs[1].at >= 0.38
        assert set(server.stored.values()) == {1}
        snap = rig.shipper.snapshot()
        assert snap["retries"] == 2 and snap["lastError"].startswith("HTTP 503") and snap["permanentError"] is None
    finally:
        await rig.close()


async def test_429_is_transient_too(server: CollectorServer, spool: Spool) -> None:
    server.throttle_next = 1
    server.retry_after = "0.3"
    rig = Rig(server, spool)
    try:
        spool_finding(spool, "a")
        await server.await_until(lambda s: "a" in s.stored, timeout=5)
        assert [r.status for r in server.findings_requests()] == [429, 200]
    finally:
        await rig.close()


async def test_413_splits_in_halves_until_it_fits(server: CollectorServer, spool: Spool) -> None:
    server.max_findings = 3
    rig = Rig(server, spool, batch_max_findings=10)
    try:
        for i in range(10):
            spool_finding(spool, f"f{i}")
        await server.await_until(lambda s: len(s.stored) == 10, timeout=5)
        reqs = server.findings_requests()
        assert [r.findings for r in reqs if r.status == 413] == [10, 5, 5]
        assert sorted(r.findings for r in reqs if r.status == 200) == [2, 2, 3, 3]
        assert set(server.stored.values()) == {1}
        assert rig.shipper.snapshot()["splits"] == 3
    finally:
        await rig.close()


async def test_a_finding_too_large_even_alone_is_dropped_not_retried(server: CollectorServer, spool: Spool) -> None:
    server.max_findings = 0
    rig = Rig(server, spool)
    try:
        spool_finding(spool, "huge", severity=8.0)
        await asyncio.sleep(0.8)
        assert [r.status for r in server.findings_requests()] == [413]
        assert len(spool) == 0
        snap = spool.snapshot()
        assert snap["rejected"] == 1 and snap["droppedBySeverity"]["HIGH"] == 1
    finally:
        await rig.close()


async def test_401_is_permanent_logged_once_kept_spooled_and_never_a_hot_loop(
    server: CollectorServer, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    server.reject_status = 401
    server.reject_message = f"token {TOKEN} revoked"  # a server that echoes the token: it must not be logged
    rig = Rig(server, spool, permanent_retry_s=300)
    try:
        with caplog.at_level(logging.INFO, logger="sidecar"):
            for i in range(3):
                spool_finding(spool, f"f{i}")
            await server.await_until(lambda s: len(s.findings_requests()) == 1, timeout=5)
            for i in range(3, 300):  # detection goes on; more findings must not trigger requests
                spool_finding(spool, f"f{i}")
            await asyncio.sleep(2.5)
        assert len(server.findings_requests()) == 1, "one request in 2.5 s: no hot loop"
        assert len(spool) == 300, "the refused findings stay spooled"
        refusals = [r for r in caplog.records if "refuses" in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].levelno == logging.ERROR
        logged = "\n".join(JsonFormatter().format(r) for r in caplog.records)
        assert TOKEN not in logged and "<token>" in logged
        snap = rig.shipper.snapshot()
        assert snap["permanentError"] == "HTTP 401: token <token> revoked" and snap["state"] == "refused"
        # fixed on the backend side; wake() (a new token or configuration) retries at once
        server.reject_status = None
        rig.shipper.wake()
        await server.await_until(lambda s: len(s.stored) == 300, timeout=10)
        assert set(server.stored.values()) == {1}
        await asyncio.sleep(0.1)
        assert len(spool) == 0 and rig.shipper.snapshot()["permanentError"] is None
    finally:
        await rig.close()


async def test_400_names_the_field_and_is_permanent(server: CollectorServer, spool: Spool) -> None:
    rig = Rig(server, spool)
    try:
        bad = make_finding("bad")
        bad["severity"] = 42
        spool.put("bad", 5.0, orjson.dumps(bad))
        await server.await_until(lambda s: len(s.findings_requests()) == 1, timeout=5)
        await asyncio.sleep(0.5)
        assert [r.status for r in server.findings_requests()] == [400]
        assert "findings[0].severity" in str(rig.shipper.snapshot()["permanentError"])
        assert len(spool) == 1
    finally:
        await rig.close()


async def test_server_down_then_up_everything_arrives_once(server: CollectorServer, spool: Spool) -> None:
    server.stop()
    rig = Rig(server, spool)
    try:
        for i in range(30):
            spool_finding(spool, f"f{i}")
        await asyncio.sleep(1.0)
        snap = rig.shipper.snapshot()
        assert snap["findingsSent"] == 0 and snap["transientErrors"] >= 3
        assert "Connect" in str(snap["lastError"]) and snap["lastErrorAt"]
        server.start()
        await server.await_until(lambda s: len(s.stored) == 30, timeout=10)
        assert set(server.stored.values()) == {1}
        await asyncio.sleep(0.1)
        assert len(spool) == 0
    finally:
        await rig.close()


async def test_connection_cut_after_storing_is_retried_as_the_same_batch(server: CollectorServer, spool: Spool) -> None:
    server.drop_after_store_next = 1
    server.drop_before_store_next = 1
    rig = Rig(server, spool)
    try:
        for i in range(8):
            spool_finding(spool, f"f{i}")
        await server.await_until(lambda s: any(r.status == 200 for r in s.findings_requests()), timeout=10)
        reqs = server.findings_requests()
        assert [r.status for r in reqs] == [0, 0, 200]
        assert len({r.batch_id for r in reqs}) == 1
        assert server.batch_ids[reqs[0].batch_id or ""] == 3
        assert len(server.stored) == 8 and set(server.stored.values()) == {1}, "stored once despite 3 arrivals"
        await asyncio.sleep(0.1)
        assert len(spool) == 0
    finally:
        await rig.close()


async def test_a_slow_answer_times_out_and_the_retry_is_deduplicated(server: CollectorServer, spool: Spool) -> None:
    server.delay_s = 0.6
    rig = Rig(server, spool, request_timeout_s=0.3)
    try:
        spool_finding(spool, "slow")
        await asyncio.sleep(0.9)
        server.delay_s = 0.0
        await server.await_until(lambda s: any(r.status == 200 for r in s.findings_requests()), timeout=10)
        assert server.stored["slow"] == 1
        assert "Timeout" in str(rig.shipper.snapshot()["lastError"])
        assert len({r.batch_id for r in server.findings_requests()}) == 1
    finally:
        await rig.close()


async def test_an_update_while_in_flight_is_sent_after_it(server: CollectorServer, spool: Spool) -> None:
    server.delay_s = 0.4
    rig = Rig(server, spool, batch_max_age_s=0.05)
    try:
        spool_finding(spool, "agg", count=1)
        await asyncio.sleep(0.2)  # the first version is in flight
        spool_finding(spool, "agg", count=5)
        await server.await_until(lambda s: s.counts.get("agg") == [1, 5], timeout=5)
        await asyncio.sleep(0.1)
        assert len(spool) == 0
    finally:
        await rig.close()


async def test_drain_sends_within_its_budget_and_leaves_the_rest_spooled(server: CollectorServer, spool: Spool) -> None:
    rig = Rig(server, spool, batch_max_age_s=30.0, batch_max_findings=100)
    try:
        for i in range(5):
            spool_finding(spool, f"a{i}")
        assert await rig.shipper.drain(3.0) is True, "closes the batch at once, does not wait its age"
        assert len(server.stored) == 5
        server.stop()
        for i in range(5):
            spool_finding(spool, f"b{i}")
        start = time.monotonic()
        assert await rig.shipper.drain(0.5) is False
        assert 0.45 <= time.monotonic() - start < 1.5
        assert len(spool) == 5
    finally:
        await rig.close()


def test_retry_after_forms() -> None:
    assert retry_after({"Retry-After": "3"}) == 3.0
    assert retry_after({"retry-after": "0.5"}) == 0.5
    assert retry_after({"Retry-After": "-4"}) == 0.0
    assert retry_after({"Retry-After": "99999"}) == 600.0
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    got = retry_after({"Retry-After": when})
    assert got is not None and 25 <= got <= 31
    assert retry_after({"Retry-After": "soon"}) is None
    assert retry_after({}) is None

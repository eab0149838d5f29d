"""The Shipper against a real collector (tests/collector_server.py) on 127.0.0.1: batching, gzip, retries,
Retry-After, splitting, permanent errors without a hot loop, outages, connections cut mid-request."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from collector_server import CollectorServer
from taskenv import TaskEnv

from sidecar import ecs
from sidecar.heartbeat import Heartbeater, ResourceSampler, build_heartbeat, delivery_of
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
        assert time.monotonic() - start < 0.9, "full batches go at once"
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


async def test_a_finding_the_backend_cannot_read_is_set_aside_and_the_rest_goes(
    server: CollectorServer, spool: Spool
) -> None:
    bad = make_finding("bad")
    bad["severity"] = 42
    spool_finding(spool, "good-1")
    spool.put("bad", 5.0, orjson.dumps(bad))
    spool_finding(spool, "good-2")
    rig = Rig(server, spool, batch_max_age_s=0.3)
    try:
        await server.await_until(lambda s: len(s.stored) == 2, timeout=5)
        assert set(server.stored) == {"good-1", "good-2"}
        assert [r.status for r in server.findings_requests()] == [400, 200]
        await server.await_until(lambda s: len(spool) == 0, timeout=5)
        assert spool.snapshot()["rejected"] == 1 and spool.snapshot()["droppedBySeverity"]["MEDIUM"] == 1
        kept = orjson.loads((spool.directory / "rejected" / "bad.json").read_bytes())  # type: ignore[operator]
        assert "findings[1].severity" in kept["error"] and kept["finding"]["severity"] == 42
    finally:
        await rig.close()


async def test_a_400_about_the_batch_itself_is_permanent(server: CollectorServer, spool: Spool) -> None:
    server.reject_status = 400  # no "field": the backend cannot tell which finding
    rig = Rig(server, spool)
    try:
        spool_finding(spool, "f0")
        await server.await_until(lambda s: len(s.findings_requests()) == 1, timeout=5)
        await asyncio.sleep(0.5)
        assert [r.status for r in server.findings_requests()] == [400]
        assert "HTTP 400" in str(rig.shipper.snapshot()["permanentError"])
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


async def test_heartbeats_validate_against_the_contract(server: CollectorServer, spool: Spool) -> None:
    identity = await ecs.load_identity(None)
    client = CollectorClient(server.url, TOKEN)
    shipper = Shipper(client, spool, "agent-1")
    spool_finding(spool, "waiting", severity=9.0)
    sampler = ResourceSampler()
    stats = {
        "events": 12,
        "eventsByKind": {"process.exec": 10, "net.connect": 2},
        "processes": {"processes_missed": 3, "live": 7},
        "source": {"name": "proc_poll", "interval_ms": 2.0, "polls": 5},
        "eventSources": {"packet": {"kernel_drops": 4, "syns": 1}, "file_watch": {"off": "failed: OSError()"}},
    }
    probe = {
        "sources": {
            "proc_connector": {"available": False, "reason": "not the initial PID namespace"},
            "proc_poll": {"available": True, "reason": "reads /proc"},
            "packet": {"available": True, "reason": "AF_PACKET"},
            "file_watch": {"available": True, "reason": "inotify"},
            "sock_diag": {"available": False, "reason": "no netlink"},
        }
    }
    etags: list[str] = []

    def payload(stopping: bool, interval_s: float) -> dict[str, Any]:
        return build_heartbeat(
            agent_id="agent-1", agent_version="9.9", interval_s=interval_s, stopping=stopping, identity=identity,
            probe=probe, stats=stats, delivery=delivery_of(5, spool, shipper), resources=sampler.sample(),
            config_etag=None, config_error=None,
        )  # fmt: skip

    server.set_config({})
    server.heartbeat_interval_s = 120
    beats = Heartbeater(client, payload, interval_s=30, on_config_etag=etags.append)
    try:
        assert await beats.send()
        assert await beats.send(stopping=True)
    finally:
        await client.close()
    assert server.heartbeat_errors == []
    first, last = server.heartbeats
    assert first["stopping"] is False and last["stopping"] is True
    assert first["task"]["hostMode"] is True and first["task"]["launchType"] is None
    assert first["sources"] == {
        "proc_connector": {"enabled": False, "detail": "not the initial PID namespace"},
        "proc_poll": {"enabled": True, "detail": "reads /proc"},
        "packet": {"enabled": True, "detail": "AF_PACKET"},
        "file_watch": {"enabled": False, "detail": "failed: OSError()"},
        "sock_diag": {"enabled": False, "detail": "no netlink"},
    }
    c = first["counters"]
    assert c["events"] == 12 and c["processesMissed"] == 3 and c["packetsDroppedByKernel"] == 4
    assert c["eventsByKind.net.connect"] == 2 and "source.interval_ms" not in c  # integers only
    d = first["delivery"]
    assert d["findingsEmitted"] == 5 and d["spooled"] == 1 and d["spoolBytes"] > 100
    assert d["droppedBySeverity"] == {"LOW": 0, "MEDIUM": 0, "HIGH": 0, "CRITICAL": 0}
    assert first["resources"]["rssBytes"] > 10 << 20 and first["resources"]["cpuPercent"] >= 0
    assert etags == [server.config_etag, server.config_etag]
    assert beats.interval_s == 120, "the backend may ask for fewer heartbeats"
    assert first["intervalS"] == 30 and last["intervalS"] == 120


async def test_a_refused_heartbeat_is_logged_once(server: CollectorServer, caplog: pytest.LogCaptureFixture) -> None:
    client = CollectorClient(server.url, "wrong-token")
    beats = Heartbeater(client, lambda stopping, interval: {"agentId": "x"})
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar"):
            assert not await beats.send()
            assert not await beats.send()
    finally:
        await client.close()
    assert len([r for r in caplog.records if r.getMessage() == "heartbeat not delivered"]) == 1
    assert beats.snapshot()["failed"] == 2 and "401" in str(beats.last_error)


def make_certificates(d: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it (openssl, as an operator would)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=collector")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return d / "ca.pem", d / "srv.pem", d / "srv.key"


async def test_tls_is_verified_against_the_ca_bundle(tmp_path: Path, spool: Spool) -> None:
    ca, cert, key = make_certificates(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    with CollectorServer(token=TOKEN, tls=tls) as server:
        assert server.url.startswith("https://")
        spool_finding(spool, "over-tls")
        # without the private CA the server is not trusted: nothing is sent, the error says why
        untrusting = CollectorClient(server.url, TOKEN)
        shipper = Shipper(untrusting, spool, "agent-1", batch_max_age_s=0.05, backoff_cap_s=0.1)
        task = asyncio.get_running_loop().create_task(shipper.run())
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await untrusting.close()
        assert server.stored == {} and "CERTIFICATE_VERIFY_FAILED" in str(shipper.last_error)
        # with it (RUNTIME_SIDECAR_CA_BUNDLE), delivered
        trusting = CollectorClient(server.url, TOKEN, ca_bundle=str(ca))
        shipper = Shipper(trusting, spool, "agent-1", batch_max_age_s=0.05)
        task = asyncio.get_running_loop().create_task(shipper.run())
        try:
            await server.await_until(lambda s: "over-tls" in s.stored, timeout=10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await trusting.close()


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


# -- the real sidecar in the emulated task ----------------------------------------------------------------------------


def tool_at(exe: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: (
        f["type"] == "Execution:Runtime/SuspiciousTool"
        and (f["service"]["runtimeDetails"]["process"]["executablePath"] == exe)
    )


def test_the_sidecar_delivers_spools_through_sigkill_and_flushes_at_sigterm(task_env: TaskEnv, tmp_path: Path) -> None:
    state = tmp_path / "state"
    args = ["--collector-url", "", "--state-dir", str(state), "--batch-max-age-s", "0.2", "--heartbeat-interval-s", "5"]
    env = {"RUNTIME_SIDECAR_TOKEN": TOKEN}
    with CollectorServer(token=TOKEN) as server:
        args[1] = server.url
        (tmp_path / "run1").mkdir()
        sidecar = task_env.start_detecting(tmp_path / "run1", args, env)
        assert task_env.run("app", ["sh", "-c", "cp /bin/sleep /tmp/nmap && /tmp/nmap 0.5"])[0] == 0
        nmap = sidecar.wait_for_finding(tool_at("/tmp/nmap"), timeout=20)
        server.wait_until(lambda s: nmap["id"] in s.stored, timeout=10)
        assert server.findings[nmap["id"]] == nmap, "what the backend got is what the sidecar found"
        server.wait_until(lambda s: s.heartbeats, timeout=10)
        assert server.heartbeat_errors == []
        beat = server.heartbeats[0]
        assert beat["agentId"] in nmap["service"]["additionalInfo"]["value"]
        assert beat["task"]["clusterName"] == nmap["resource"]["ecsClusterDetails"]["name"]
        assert beat["task"]["launchType"] == "FARGATE" and beat["stopping"] is False
        assert beat["sources"]["proc_poll"]["enabled"] is True
        assert beat["sources"]["proc_connector"]["enabled"] is False and beat["sources"]["proc_connector"]["detail"]
        assert beat["resources"]["rssBytes"] > 10 << 20

        # the backend goes away; a finding made meanwhile waits in the spool, and the sidecar is killed
        server.stop()
        Path(task_env.path_in("app", "/tmp/linpeas.sh")).write_text("sleep 0.5\n")
        assert task_env.run("app", ["sh", "/tmp/linpeas.sh"])[0] == 0
        lin = sidecar.wait_for_finding(lambda f: "linpeas" in str(f["service"]["runtimeDetails"]), timeout=20)
        time.sleep(0.5)
        task_env.kill(sidecar.pid, signal.SIGKILL)
        assert sidecar.wait(10) == -signal.SIGKILL
        assert lin["id"] not in server.stored

        # restarted (the backend still down), then the backend comes back: the spooled finding arrives
        (tmp_path / "run2").mkdir()
        args[args.index("0.2")] = "30"  # batches now wait: only a stop sends them early
        sidecar = task_env.start_detecting(tmp_path / "run2", args, env)
        server.start()
        server.wait_until(lambda s: lin["id"] in s.stored, timeout=15)
        assert server.findings[lin["id"]]["service"]["count"] >= 1

        # SIGTERM: what is spooled is sent within the stop budget, and the last heartbeat says so
        assert task_env.run("worker", ["sh", "-c", "cp /bin/sleep /tmp/nmap && /tmp/nmap 0.5"])[0] == 0
        late = sidecar.wait_for_finding(tool_at("/tmp/nmap"), timeout=20)
        assert late["id"] not in server.stored
        t0 = time.monotonic()
        assert sidecar.stop(timeout=15) == 0
        assert time.monotonic() - t0 < 8
        assert late["id"] in server.stored
        last = server.heartbeats[-1]
        assert last["stopping"] is True and last["delivery"]["spooled"] == 0
        assert last["counters"]["events"] > 0 and last["counters"]["eventsByKind.process.exec"] > 0
        assert last["delivery"]["findingsSent"] >= 2 and last["delivery"]["findingsEmitted"] >= 1
        assert server.heartbeat_errors == []
        assert set(server.stored.values()) == {1}, "every finding stored exactly once"


def test_sigterm_with_the_backend_away_exits_in_budget_and_keeps_the_spool(task_env: TaskEnv, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    state = tmp_path / "state"
    args = ["--collector-url", url, "--state-dir", str(state), "--stop-flush-timeout-s", "1.5"]
    sidecar = task_env.start_detecting(tmp_path, args, {"RUNTIME_SIDECAR_TOKEN": TOKEN})
    assert task_env.run("app", ["sh", "-c", "cp /bin/sleep /tmp/nmap && /tmp/nmap 0.5"])[0] == 0
    nmap = sidecar.wait_for_finding(tool_at("/tmp/nmap"), timeout=20)
    t0 = time.monotonic()
    assert sidecar.stop(timeout=15) == 0
    assert time.monotonic() - t0 < 5
    stopped = [r for r in sidecar.logs() if r.get("msg") == "delivery stopped"]
    assert stopped and stopped[0]["sentAll"] is False and stopped[0]["leftInSpool"] >= 1
    spool = Spool(state / "spool")
    try:
        assert nmap["id"] in spool, "left in the spool for the next start"
    finally:
        spool.close()

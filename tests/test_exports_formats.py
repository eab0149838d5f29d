"""What each exporter sends, checked against the targets' own rules: botocore's models of BatchImportFindings and
PutEvents (the same validation boto3 applies before a request leaves), EventBridge's size accounting, OCSF's
Detection Finding, the webhook signature scheme; and the exports file's validation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from backend_env import sample_finding
from botocore.validate import ParamValidator

from backend.exports.base import Item, aws_error, backoff_s
from backend.exports.config import (
    EventBridgeConfig,
    ExportsConfigError,
    S3Config,
    SecurityHubConfig,
    WebhookConfig,
    load_exports,
    parse_exports,
)
from backend.exports.eventbridge import MAX_REQUEST_BYTES, EventBridgeExporter, coverage_key, entry_size
from backend.exports.ocsf import check_detection_finding, severity_id, to_detection_finding
from backend.exports.securityhub import asff_type, severity, to_asff
from backend.exports.webhook import sign, verify_signature

SESSION = botocore.session.get_session()


def _problems(service: str, operation: str, params: dict[str, Any]) -> str:
    shape = SESSION.get_service_model(service).operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    return report.generate_report() if report.has_errors() else ""


def _stored(doc: dict[str, Any], *, archived: bool = False) -> dict[str, Any]:
    """The finding as GetFindings returns it (what exporters format): the store adds archived and detectorId."""
    out: dict[str, Any] = json.loads(json.dumps(doc))
    out["service"]["archived"] = archived
    return out


HOSTILE = "<script>alert(1)</script>\"'; rm -rf / #\u202e"


# -- Security Hub ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finding_type", "expected"),
    [
        # GuardDuty User Guide, "Interpreting GuardDuty finding names in AWS Security Hub CSPM"
        ("Execution:Runtime/ReverseShell", "TTPs/Execution/Execution:Runtime-ReverseShell"),
        ("Backdoor:Runtime/C&CActivity.B!DNS", "TTPs/Command and Control/Backdoor:Runtime-C&CActivity.B!DNS"),
        ("CryptoCurrency:Runtime/BitcoinTool.B", "TTPs/Command and Control/CryptoCurrency:Runtime-BitcoinTool.B"),
        ("DefenseEvasion:Runtime/FilelessExecution", "TTPs/Defense Evasion/DefenseEvasion:Runtime-FilelessExecution"),
        (
            "DefenseEvasion:Runtime/PtraceAntiDebugging",
            "TTPs/DefenseEvasion/DefenseEvasion:Runtime-PtraceAntiDebugging",
        ),
        ("Trojan:Runtime/DropPoint", "Effects/Data Exfiltration/Trojan:Runtime-DropPoint"),
        ("UnauthorizedAccess:Runtime/TorClient", "Effects/Resource Consumption/UnauthorizedAccess:Runtime-TorClient"),
        ("UnauthorizedAccess:Runtime/MetadataDNSRebind", "TTPs/UnauthorizedAccess:Runtime-MetadataDNSRebind"),
        (
            "PrivilegeEscalation:Runtime/SuspiciousCommand",
            "Software and Configuration Checks/PrivilegeEscalation:Runtime-SuspiciousCommand",
        ),
        ("Persistence:Runtime/SensitiveFileModified", "TTPs/Persistence/Persistence:Runtime-SensitiveFileModified"),
        # not in the table: its threat purpose's category
        ("Execution:Runtime/SomethingNew", "TTPs/Execution/Execution:Runtime-SomethingNew"),
    ],
)
def test_asff_types_are_guardduty_s(finding_type: str, expected: str) -> None:
    assert asff_type(finding_type) == expected


@pytest.mark.parametrize(
    ("value", "label", "normalized"),
    [
        (2.0, "LOW", 20),
        (3.9, "LOW", 39),
        (5.0, "MEDIUM", 50),
        (8.0, "HIGH", 80),
        (8.9, "HIGH", 89),
        (9.5, "CRITICAL", 95),
    ],
)
def test_asff_severity(value: float, label: str, normalized: int) -> None:
    assert severity(value) == {"Product": value, "Label": label, "Normalized": normalized}


def test_asff_findings_pass_botocore_validation_of_batch_import_findings() -> None:
    docs = [
        _stored(sample_finding(remote_ip="203.0.113.9")),
        _stored(
            sample_finding(domain="pool.example.org", type="CryptoCurrency:Runtime/BitcoinTool.B!DNS"), archived=True
        ),
        _stored(sample_finding(command_line=HOSTILE, title=HOSTILE * 40, exe="/tmp/" + "x" * 600)),
    ]
    docs[1]["service"]["evidence"] = {"threatIntelligenceDetails": [{"threatListName": "miners", "threatNames": ["x"]}]}
    findings = [to_asff(d, region="eu-west-1", product_account="222222222222") for d in docs]
    assert _problems("securityhub", "BatchImportFindings", {"Findings": findings}) == ""
    a, b, c = findings
    assert a["ProductArn"] == "arn:aws:securityhub:eu-west-1:222222222222:product/222222222222/default"
    assert a["AwsAccountId"] == "111111111111" and a["RecordState"] == "ACTIVE"
    assert b["RecordState"] == "ARCHIVED"
    assert b["ThreatIntelIndicators"] == [{"Type": "DOMAIN", "Value": "pool.example.org", "Source": "miners"}]
    assert len(c["Title"]) == 256 and c["Title"].startswith("<script>"), "kept as data, only clipped"
    assert len(c["Process"]["Path"]) <= 512


def test_a_finding_without_ecs_details_still_names_a_resource() -> None:
    doc = _stored(sample_finding())
    doc["resource"] = {"resourceType": "ECSCluster"}
    asff = to_asff(doc, region="us-east-1")
    assert asff["Resources"] == [
        {"Type": "Other", "Id": "AWS::::Account:111111111111", "Partition": "aws", "Region": "us-east-1"}
    ]
    assert _problems("securityhub", "BatchImportFindings", {"Findings": [asff]}) == ""


# -- EventBridge -------------------------------------------------------------------------------------------------


def _eventbridge(**config: Any) -> EventBridgeExporter:
    cfg = parse_exports({"exporters": [{"name": "bus", "type": "eventbridge", "region": "us-east-1", **config}]})
    assert isinstance(cfg.exporters[0], EventBridgeConfig)
    return EventBridgeExporter(cfg.exporters[0])


def test_eventbridge_entries_pass_botocore_validation_and_carry_guardduty_s_envelope() -> None:
    exporter = _eventbridge(event_bus_name="security", source="ecs.runtime")
    doc = _stored(sample_finding(updated=1_760_000_100.5))
    entry = exporter.format(doc)
    assert (entry["Source"], entry["DetailType"], entry["EventBusName"]) == (
        "ecs.runtime",
        "GuardDuty Finding",
        "security",
    )
    assert entry["Detail"] == doc and entry["Resources"] == [] and entry["Time"] == "2025-10-09T08:55:00.500Z"
    wire = exporter._wire(entry)
    assert json.loads(wire["Detail"]) == doc
    assert _problems("events", "PutEvents", {"Entries": [wire]}) == ""
    exporter.client.close()


def test_eventbridge_batches_by_ten_entries_and_256_kib() -> None:
    exporter = _eventbridge()
    small = [Item(exporter.format(_stored(sample_finding()))) for _ in range(25)]
    chunks, refused = exporter._chunks(small)
    assert [len(c) for c in chunks] == [10, 10, 5] and refused == []
    big_doc = _stored(sample_finding(command_line="A" * 100_000))
    big = [Item(exporter.format(big_doc)) for _ in range(5)]
    assert 100_000 < entry_size(big[0].body) < MAX_REQUEST_BYTES // 2
    chunks, refused = exporter._chunks(big)
    assert [len(c) for c in chunks] == [2, 2, 1]
    for c in chunks:
        assert sum(entry_size(i.body) for i in c) <= MAX_REQUEST_BYTES
    huge = Item(exporter.format(_stored(sample_finding(command_line="B" * 300_000))))
    chunks, refused = exporter._chunks([small[0], huge])
    assert [len(c) for c in chunks] == [1]
    assert len(refused) == 1 and not refused[0].retryable and "256 KiB" in refused[0].error
    exporter.client.close()


def test_entry_size_counts_as_eventbridge_does() -> None:
    entry = {"Source": "src", "DetailType": "dt", "Detail": '{"a":1}', "Resources": ["r1", "rr2"]}
    assert entry_size(entry) == 3 + 2 + 7 + 2 + 3
    assert entry_size({**entry, "Time": "2025-01-01T00:00:00.000Z"}) == 14 + 17


def test_coverage_keys_fit_the_bookkeeping_column() -> None:
    key = coverage_key("arn:aws:ecs:us-east-1:111111111111:task/prod/" + "f" * 32)
    assert len(key) == 64 and key.startswith("cov-")
    assert key != coverage_key("arn:aws:ecs:us-east-1:111111111111:task/prod/" + "e" * 32)


# -- OCSF --------------------------------------------------------------------------------------------------------


def test_ocsf_detection_finding_has_the_documented_fields() -> None:
    doc = _stored(sample_finding(remote_ip="203.0.113.9", command_line=HOSTILE, severity=8.0))
    doc["service"]["runtimeDetails"]["context"] = {"mitreTechniqueId": "T1059.004"}
    doc["service"]["runtimeDetails"]["process"]["executableSha256"] = "ab" * 32
    doc["service"]["evidence"] = {"threatIntelligenceDetails": [{"threatListName": "c2", "threatNames": ["bad"]}]}
    event = to_detection_finding(doc)
    assert check_detection_finding(event) == []
    assert (event["class_uid"], event["category_uid"], event["type_uid"]) == (2004, 2, 200401)
    assert (event["activity_name"], event["severity_id"], event["severity"]) == ("Create", 4, "High")
    assert event["finding_info"]["uid"] == doc["id"] and event["finding_info"]["types"] == [doc["type"]]
    assert event["finding_info"]["attacks"] == [
        {"tactic": {"name": "Execution", "uid": "TA0002"}, "technique": {"uid": "T1059.004"}, "version": "v15"}
    ]
    assert event["cloud"]["account"] == {"uid": "111111111111", "type_id": 10, "type": "AWS Account"}
    assert [r["type"] for r in event["resources"]] == ["AWS::ECS::Cluster", "AWS::ECS::Task", "Container"]
    process = event["evidences"][0]["process"]
    assert process["cmd_line"] == HOSTILE, "attacker strings are data, copied as they are"
    assert process["file"]["hashes"] == [{"algorithm_id": 3, "algorithm": "SHA-256", "value": "ab" * 32}]
    assert process["parent_process"]["file"]["path"] == "/usr/bin/node" and process["lineage"] == ["/usr/bin/node"]
    assert event["evidences"][0]["dst_endpoint"] == {"ip": "203.0.113.9", "port": 4444}
    assert event["evidences"][0]["connection_info"] == {"protocol_name": "tcp", "direction_id": 2}
    assert event["enrichments"][0]["value"] == "c2"
    assert event["time"] == event["finding_info"]["modified_time"]
    assert event["container"]["image"] == {"name": "nginx:1.27"}


def test_ocsf_activity_follows_the_finding_s_life() -> None:
    updated = _stored(sample_finding(count=3, updated=1_760_000_500.0))
    assert to_detection_finding(updated)["activity_id"] == 2
    archived = to_detection_finding(_stored(sample_finding(), archived=True))
    assert (archived["activity_id"], archived["type_uid"], archived["status"]) == (3, 200403, "Suppressed")
    assert check_detection_finding(archived) == []
    assert [severity_id(s)[0] for s in (1.0, 4.0, 7.0, 9.0)] == [2, 3, 4, 5]


def test_ocsf_check_reports_what_is_wrong() -> None:
    event = to_detection_finding(_stored(sample_finding()))
    del event["finding_info"]["uid"]
    event["time"] = "yesterday"
    assert check_detection_finding(event) == ["time: str, expected int", "finding_info.uid: missing"]
    event = to_detection_finding(_stored(sample_finding()))
    event["type_uid"] = 200402
    assert check_detection_finding(event) == ["type_uid: must be class_uid * 100 + activity_id"]


# -- webhook signatures ------------------------------------------------------------------------------------------


def test_webhook_signature_scheme() -> None:
    key, body = b"k" * 32, b'{"findings":[]}'
    t = int(time.time())
    header = sign(key, body, t)
    assert header.startswith(f"t={t},v1=") and len(header.split("v1=")[1]) == 64
    assert verify_signature(key, header, body)
    assert not verify_signature(key, header, body + b" ")
    assert not verify_signature(b"x" * 32, header, body)
    assert not verify_signature(key, sign(key, body, t - 301), body), "older than five minutes: a replay"
    assert verify_signature(key, f"{header},v1={'0' * 64}", body), "any v1 may match (key rotation)"
    assert not verify_signature(key, None, body) and not verify_signature(key, "garbage", body)


# -- retries -----------------------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_a_cap() -> None:
    samples = [backoff_s(4, 1.0, 5.0) for _ in range(200)]
    assert all(0 <= s <= 5.0 for s in samples) and max(samples) > 2.5
    assert all(0 <= backoff_s(1, 1.0, 60.0) <= 1.0 for _ in range(50))


def test_aws_errors_are_retried_or_not_by_their_nature() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
        )

    assert aws_error(client_error("ThrottlingException", 400))[1] is True
    assert aws_error(client_error("InternalException", 500))[1] is True
    assert aws_error(client_error("AccessDeniedException", 403)) == ("AccessDeniedException: m", False)
    assert aws_error(client_error("InvalidInputException", 400))[1] is False
    assert aws_error(EndpointConnectionError(endpoint_url="http://x"))[1] is True


# -- the exports file --------------------------------------------------------------------------------------------

GOOD_TOML = """
[[exporters]]
name = "bus"
type = "eventbridge"
region = "eu-west-1"

[[exporters]]
name = "hub"
type = "securityhub"
region = "eu-west-1"
publishing_frequency = "ONE_HOUR"

[[exporters]]
name = "lake"
type = "s3"
region = "eu-west-1"
bucket = "security-lake-raw"
format = "ocsf"
kms_key_id = "alias/lake"

[[exporters]]
name = "soar"
type = "webhook"
url = "https://soar.example.com/hooks/runtime"
secret_env = "E1_TEST_WEBHOOK_SECRET"
enabled = false
"""


def test_a_good_file_in_toml_yaml_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    import yaml

    monkeypatch.setenv("E1_TEST_WEBHOOK_SECRET", "s" * 32)
    data = tomllib.loads(GOOD_TOML)
    (tmp_path / "e.toml").write_text(GOOD_TOML)
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "e.json").write_text(json.dumps(data))
    for name in ("e.toml", "e.yaml", "e.json"):
        cfg = load_exports(tmp_path / name)
        assert [e.type for e in cfg.exporters] == ["eventbridge", "securityhub", "s3", "webhook"]
        assert [e.name for e in cfg.enabled()] == ["bus", "hub", "lake"]
        bus, hub, lake, soar = cfg.exporters
        assert isinstance(bus, EventBridgeConfig) and isinstance(hub, SecurityHubConfig)
        assert isinstance(lake, S3Config) and isinstance(soar, WebhookConfig)
        assert (bus.source, bus.detail_type, bus.event_bus_name) == ("aws.guardduty", "GuardDuty Finding", "default")
        assert bus.frequency_s("SIX_HOURS") == 21600 and bus.frequency_s(None) == 900
        assert hub.frequency_s("SIX_HOURS") == 3600 and hub.archive_updates and hub.batch_size == 100
        assert (lake.sse, lake.kms_key_id, lake.prefix) == ("aws:kms", "alias/lake", "findings")
        assert soar.signing_key() == b"s" * 32


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"name": "lake", "type": "s3", "region": "eu-west-1"}], 'exporters[0] (s3 "lake"): bucket: Field required'),
        ([{"name": "x", "type": "kafka"}], 'exporters[0] (kafka "x"): type must be one of eventbridge, securityhub'),
        ([{"name": "x"}], 'exporters[0] ("x"): type is required'),
        (
            [{"name": "Bad Name", "type": "eventbridge", "region": "us-east-1"}],
            'exporters[0] (eventbridge "Bad Name"): name: 1 to 64 lowercase letters',
        ),
        (
            [{"name": "b", "type": "eventbridge", "region": "us-east-1", "publishing_frequency": "DAILY"}],
            'exporters[0] (eventbridge "b"): publishing_frequency',
        ),
        (
            [{"name": "b", "type": "eventbridge", "region": "us-east-1", "queue_sise": 5}],
            'exporters[0] (eventbridge "b"): queue_sise: Extra inputs are not permitted',
        ),
        (
            [{"name": "h", "type": "webhook", "url": "ftp://x"}],
            'exporters[0] (webhook "h"): url: an http:// or https:// URL',
        ),
        (
            [{"name": "h", "type": "webhook", "url": "https://x"}],
            'exporters[0] (webhook "h"): give exactly one of secret or secret_env',
        ),
        (
            [{"name": "l", "type": "s3", "region": "eu-west-1", "bucket": "abc", "sse": "AES256", "kms_key_id": "k"}],
            "kms_key_id needs sse 'aws:kms'",
        ),
        (
            [
                {"name": "a", "type": "eventbridge", "region": "us-east-1"},
                {"name": "a", "type": "securityhub", "region": "us-east-1"},
            ],
            "two exporters are named 'a'",
        ),
        (
            [{"name": "b", "type": "eventbridge", "region": "us-east-1", "accounts": ["1234"]}],
            "accounts: account ids are 12 digits, got '1234'",
        ),
    ],
)
def test_mistakes_are_reported_precisely(entries: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ExportsConfigError) as err:
        parse_exports({"exporters": entries}, "exports.toml")
    assert str(err.value).startswith("exports.toml: ") and message in str(err.value), str(err.value)


def test_file_level_mistakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[exporters]\nname=")
    with pytest.raises(ExportsConfigError, match=r"bad.toml: not valid TOML"):
        load_exports(bad)
    with pytest.raises(ExportsConfigError, match=r"use a .toml, .yaml/.yml or .json file"):
        (tmp_path / "e.ini").write_text("")
        load_exports(tmp_path / "e.ini")
    with pytest.raises(ExportsConfigError, match=r"cannot read"):
        load_exports(tmp_path / "missing.toml")
    monkeypatch.delenv("E1_TEST_WEBHOOK_SECRET", raising=False)
    hook = tmp_path / "hook.yaml"
    hook.write_text("exporters:\n  - {name: h, type: webhook, url: 'https://x', secret_env: E1_TEST_WEBHOOK_SECRET}\n")
    with pytest.raises(ExportsConfigError, match=r"E1_TEST_WEBHOOK_SECRET must hold the webhook secret"):
        load_exports(hook)


def test_exports_check_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from backend import cli

    monkeypatch.setenv("E1_TEST_WEBHOOK_SECRET", "s" * 32)
    good = tmp_path / "exports.toml"
    good.write_text(GOOD_TOML)
    db = ["--database-url", f"sqlite:///{tmp_path / 'b.db'}"]
    assert cli.main([*db, "exports", "check", str(good)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(x["name"], x["enabled"]) for x in listed] == [
        ("bus", True),
        ("hub", True),
        ("lake", True),
        ("soar", False),
    ]
    assert listed[2]["target"] == "s3://security-lake-raw/findings (ocsf, aws:kms)"
    bad = tmp_path / "bad.yaml"
    bad.write_text("exporters:\n  - {name: lake, type: s3, region: eu-west-1}\n")
    assert cli.main([*db, "exports", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert 'bad.yaml: exporters[0] (s3 "lake"): bucket: Field required' in err

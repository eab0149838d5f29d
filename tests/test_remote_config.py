"""Remote configuration against a real collector (tests/collector_server.py): ETag and 304, list files, the
local policy as base, refused configurations; and the real sidecar picking up a threat list without a restart."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from collector_server import CollectorServer
from findings import remote_ip
from taskenv import TaskEnv

from detectors import threat_intel
from detectors.policy import Policy
from sidecar.heartbeat import build_heartbeat
from sidecar.remote_config import RemoteConfig, merge_policy, safe_name
from sidecar.shipper import CollectorClient

TOKEN = "config-test-token"
C2_IP = "127.0.0.61"
PY = "/usr/bin/python3"

RULE = {
    "id": "curl-to-bin",
    "description": "curl writing into /usr/bin",
    "type": "Execution:Runtime/SuspiciousCommand",
    "events": ["process.exec"],
    "condition": {
        "all": [
            {"field": "process.name", "equals": "curl"},
            {"field": "process.command_line", "contains": "/usr/bin/"},
        ]
    },
}


@pytest.fixture
def server() -> Iterator[CollectorServer]:
    with CollectorServer(token=TOKEN) as s:
        yield s


class Applied:
    """The apply callback: records each policy it was given (what the sidecar's engine swap receives)."""

    def __init__(self) -> None:
        self.policies: list[Policy] = []

    async def __call__(self, policy: Policy) -> None:
        self.policies.append(policy)


@pytest.fixture
async def client(server: CollectorServer) -> AsyncIterator[CollectorClient]:
    c = CollectorClient(server.url, TOKEN)
    yield c
    await c.close()


def remote(client: CollectorClient, tmp_path: Path, applied: Applied, base: Policy | None = None) -> RemoteConfig:
    return RemoteConfig(client, base_policy=base or Policy.empty(), state_dir=tmp_path / "state", apply=applied)


def config_requests(server: CollectorServer) -> list[Any]:
    with server.lock:
        return [r for r in server.requests if r.path == "/agent/v1/config"]


async def test_etag_then_304_costs_nothing(server: CollectorServer, client: CollectorClient, tmp_path: Path) -> None:
    etag = server.set_config(
        {"exceptions": [{"type": "Execution:Runtime/NewBinaryExecuted", "image": "build/*", "reason": "builds"}]},
        [{"name": "Our C2", "format": "plain", "category": "c2", "content": f"{C2_IP}\n"}],
        [{"name": "partners", "content": "10.9.9.9\n"}],
    )
    applied = Applied()
    rc = remote(client, tmp_path, applied)
    assert await rc.poll() == "applied"
    assert rc.etag == etag and rc.error is None
    (policy,) = applied.policies
    threat = policy.threat_lists[0]
    assert threat.name == "Our C2" and threat.category == "c2" and threat.format == "plain"
    assert Path(threat.path) == tmp_path / "state" / "lists" / etag / "Our_C2"
    assert Path(threat.path).read_text() == f"{C2_IP}\n"
    assert Path(policy.trusted_lists[0].path).read_text() == "10.9.9.9\n"
    assert len(policy.exceptions) == 1
    # unchanged: the server sees If-None-Match, answers 304, nothing is rebuilt
    assert await rc.poll() == "unchanged"
    assert await rc.poll() == "unchanged"
    reqs = config_requests(server)
    assert [r.status for r in reqs] == [200, 304, 304]
    assert reqs[0].if_none_match is None and reqs[1].if_none_match == f'"{etag}"'
    assert len(applied.policies) == 1
    assert rc.snapshot()["unchanged"] == 2
    # a new configuration replaces the old list files
    etag2 = server.set_config({}, [{"name": "Our C2", "content": "127.0.0.62\n"}])
    assert await rc.poll() == "applied"
    assert [p.name for p in (tmp_path / "state" / "lists").iterdir()] == [etag2]
    assert len(applied.policies) == 2


async def test_a_broken_configuration_is_refused_and_reported(
    server: CollectorServer, client: CollectorClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = server.set_config({"rules": [RULE]})
    applied = Applied()
    rc = remote(client, tmp_path, applied)
    assert await rc.poll() == "applied"
    bad = server.set_config({"rules": [{**RULE, "condition": {"field": "proc.nam", "equals": "curl"}}]})
    with caplog.at_level(logging.ERROR, logger="sidecar"):
        assert await rc.poll() == "refused"
        assert await rc.poll() == "unchanged", "the refused one is not fetched again"
    assert config_requests(server)[-1].if_none_match == f'"{good}", "{bad}"'
    assert config_requests(server)[-1].status == 304
    assert rc.etag == good and len(applied.policies) == 1, "the current configuration stays"
    assert rc.error is not None and bad in rc.error and "proc.nam" in rc.error
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1, "logged once"
    # the heartbeat carries it (and still validates against the contract)
    beat = build_heartbeat(
        agent_id="a", agent_version="1", interval_s=60, stopping=False, identity=_local_identity(), probe={},
        stats={}, delivery=_delivery(), resources={"cpuPercent": 0.0, "rssBytes": 1}, config_etag=rc.etag,
        config_error=rc.error,
    )  # fmt: skip
    client_beat = await client.request("POST", "/agent/v1/heartbeat", body=json.dumps(beat).encode())
    assert client_beat.status == 200 and server.heartbeats[-1]["configError"] == rc.error
    # not JSON at all, a list with a bad format: refused the same way
    server.set_config(raw={"etag": "x1", "threatLists": [{"name": "a", "format": "csv", "content": ""}]})
    assert await rc.poll() == "refused" and "threatLists.0.format" in str(rc.error)
    # and a good one afterwards is applied and clears the error
    server.set_config({})
    assert await rc.poll() == "applied" and rc.error is None


async def test_the_local_policy_is_the_base(server: CollectorServer, client: CollectorClient, tmp_path: Path) -> None:
    local_list = tmp_path / "local-c2.txt"
    local_list.write_text("127.0.0.70\n")
    base = Policy.parse(
        {"threat_lists": [{"path": str(local_list), "name": "Local"}], "lists": {"builders": ["build/*"]}},
        source="policy.yaml",
    )
    server.set_config(
        {"rules": [RULE], "exceptions": [{"image": "@builders", "reason": "builders"}]},
        [{"name": "Remote", "content": f"{C2_IP}\n"}],
    )
    applied = Applied()
    rc = remote(client, tmp_path, applied, base)
    assert await rc.poll() == "applied"
    (policy,) = applied.policies
    assert [s.name for s in policy.threat_lists] == ["Local", "Remote"]
    assert len(policy.ruleset.rules) == 1 and len(policy.exceptions) == 1
    # a named list defined in both is refused, naming the local file
    server.set_config({"lists": {"builders": ["x"]}})
    assert await rc.poll() == "refused"
    assert "lists.builders" in str(rc.error) and "policy.yaml" in str(rc.error)


async def test_lists_go_elsewhere_when_the_state_directory_is_unwritable(
    server: CollectorServer, client: CollectorClient, tmp_path: Path
) -> None:
    (tmp_path / "state").write_text("a file where the state directory should be")
    server.set_config({}, [{"name": "../../etc/passwd", "content": f"{C2_IP}\n"}])
    applied = Applied()
    rc = remote(client, tmp_path, applied)
    assert await rc.poll() == "applied"
    path = Path(applied.policies[0].threat_lists[0].path)
    assert rc.lists_dir is not None and path.parent.parent == rc.lists_dir
    assert not str(path).startswith(str(tmp_path)) and path.name == "_.._etc_passwd"
    assert path.read_text() == f"{C2_IP}\n"


async def test_no_configuration_and_an_unreachable_backend(
    server: CollectorServer, client: CollectorClient, tmp_path: Path
) -> None:
    applied = Applied()
    rc = remote(client, tmp_path, applied)
    assert await rc.poll() == "none"
    server.stop()
    assert await rc.poll() == "failed"
    assert applied.policies == [] and rc.snapshot()["failed"] == 1


def test_safe_names_are_unique_plain_file_names() -> None:
    taken: set[str] = set()
    assert safe_name("Our C2", taken) == "Our_C2"
    assert safe_name("Our/C2", taken) == "Our_C2-2"
    assert safe_name("..", taken) == "list"
    assert safe_name("", taken) == "list-2"


def test_merge_refuses_non_lists(tmp_path: Path) -> None:
    from detectors.policy import PolicyError

    with pytest.raises(PolicyError, match="rules: expected a list"):
        merge_policy(Policy.empty(), {"rules": {"a": 1}}, [], [], "remote")


def _local_identity() -> Any:
    from sidecar.ecs import TaskIdentity

    return TaskIdentity(
        mode="local", cluster_name="local", cluster_arn="arn:aws:ecs:local:000000000000:cluster/local",
        task_arn="arn:aws:ecs:local:000000000000:task/local/h", task_id="h", family=None, revision=None,
        launch_type=None, availability_zone=None, region="local", account_id="000000000000",
    )  # fmt: skip


def _delivery() -> dict[str, Any]:
    return {
        "findingsEmitted": 0, "findingsSent": 0, "spooled": 0, "spoolBytes": 0, "dropped": 0,
        "droppedBySeverity": {"LOW": 0, "MEDIUM": 0, "HIGH": 0, "CRITICAL": 0}, "lastError": None,
        "lastErrorAt": None, "permanentError": None,
    }  # fmt: skip


# -- the real sidecar ------------------------------------------------------------------------------------------------


def connect_script(host: str, port: int, tag: str) -> str:
    return f"import socket, time  # {tag}\ns = socket.create_connection(({host!r}, {port}))\ntime.sleep(1.2)\n"


def test_a_new_threat_list_takes_effect_without_a_restart(task_env: TaskEnv, tmp_path: Path) -> None:
    with CollectorServer(token=TOKEN) as server, socket.socket() as listener:
        listener.bind((C2_IP, 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        first = server.set_config({})
        args = ["--collector-url", server.url, "--state-dir", str(tmp_path / "state"), "--config-poll-interval-s", "1"]
        sidecar = task_env.start_detecting(tmp_path, args, {"RUNTIME_SIDECAR_TOKEN": TOKEN})
        server.wait_until(lambda s: any(r.status == 200 for r in config_requests(s)), timeout=10)
        # not listed yet: the connection is seen, and is no finding
        assert task_env.run("app", [PY, "-c", connect_script(C2_IP, port, "before")], timeout=30)[0] == 0
        sidecar.wait_for_event(lambda e: e["kind"] == "net.connect" and e["remoteIp"] == C2_IP, timeout=10)
        time.sleep(0.5)
        assert not [f for f in sidecar.findings() if remote_ip(f) == C2_IP]

        etag = server.set_config({}, [{"name": "TeamC2", "format": "plain", "category": "c2", "content": C2_IP}])
        server.wait_until(lambda s: any(r.if_none_match == f'"{etag}"' for r in config_requests(s)), timeout=10)
        rebuilt = [r for r in sidecar.logs() if r.get("msg") == "detection engine rebuilt"]
        assert len(rebuilt) == 2, "the first configuration, then the one with the list"
        assert task_env.run("worker", [PY, "-c", connect_script(C2_IP, port, "after")], timeout=30)[0] == 0
        f = sidecar.wait_for_finding(lambda f: f["type"] == threat_intel.C2 and remote_ip(f) == C2_IP, timeout=15)
        assert f["service"]["evidence"]["threatIntelligenceDetails"][0]["threatListName"] == "TeamC2"
        # polls since then were 304s and rebuilt nothing
        time.sleep(1.5)
        after = [r for r in config_requests(server) if r.if_none_match == f'"{etag}"']
        assert after and {r.status for r in after} == {304}
        assert len([r for r in sidecar.logs() if r.get("msg") == "detection engine rebuilt"]) == 2
        assert first != etag
        assert sidecar.stop() == 0

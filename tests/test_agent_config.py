"""The agents' configuration: policies per account and cluster, GET /agent/v1/config with real tokens against a
running backend (SQLite and PostgreSQL), the etag on heartbeats, and what is served loaded by the sidecar's own
policy parser and threat-intel loader."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from backend_env import BackendThread, iso
from sqlalchemy import update

from backend import agent_config, tenancy
from backend.db import Database
from backend.models import IntelSet
from detectors.base import ListSpec
from detectors.intel import ThreatIntel
from detectors.policy import Policy, PolicyError

ACCOUNT, REGION = "111111111111", "us-east-1"
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)
TOOL = "Execution:Runtime/SuspiciousTool"

C2_LIST = "# c2 servers\n203.0.113.0/24  # C2 block\nc2.evil.example.com\n"
STIX = """{"type": "bundle", "id": "bundle--1", "objects": [
  {"type": "indicator", "id": "indicator--1", "pattern": "[ipv4-addr:value = '192.0.2.55']",
   "pattern_type": "stix", "name": "Miner proxy"}]}"""
OTX = "Indicator type,Indicator,Description\nIPv4,192.0.2.66,bad host\ndomain,otx-bad.example.net,worse\n"
TRUSTED_LIST = "203.0.113.9\n"

NETOPS = {
    "lists": {"tools": ["/usr/bin/nmap"]},
    "exceptions": [{"type": TOOL, "executable": "@tools", "image": "netops:*", "reason": "netops scans on purpose"}],
}


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def get_config(b: BackendThread, token: str, etag: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"If-None-Match": f'"{etag}"'} if etag else {}
    return b.post("/agent/v1/config", None, token, method="GET", headers=headers)


def heartbeat(b: BackendThread, token: str, cluster: str = "prod", etag: str | None = None) -> dict[str, Any]:
    body = {
        "agentId": "agent-1",
        "agentVersion": "0.1.0",
        "sentAt": iso(1_760_000_000),
        "intervalS": 60,
        "task": {
            "accountId": ACCOUNT,
            "region": REGION,
            "clusterName": cluster,
            "clusterArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:cluster/{cluster}",
            "taskArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/{cluster}/{uuid.uuid4().hex}",
            "launchType": "FARGATE",
        },
        "configEtag": etag,
    }
    status, out, _ = b.post("/agent/v1/heartbeat", body, token)
    assert status == 200, out
    return out


def load_as_the_sidecar(config: dict[str, Any], tmp_path: Path) -> tuple[Policy, ThreatIntel]:
    """What the sidecar does with a config: each list to a file, the policy with those paths, then the lists."""
    doc = dict(config["policy"])
    for key, member in (("threat_lists", "threatLists"), ("trusted_lists", "trustedLists")):
        specs = []
        for i, entry in enumerate(config[member]):
            path = write(tmp_path, f"{member}-{i}", entry["content"])
            spec = {"path": path, "format": entry["format"], "name": entry["name"]}
            if entry["category"] is not None:
                spec["category"] = entry["category"]
            specs.append(spec)
        doc[key] = specs
    policy = Policy.parse(doc, source="served config")
    intel, problems = ThreatIntel.load(policy.threat_lists, policy.trusted_lists, bundled=False)
    assert problems == [], [str(p) for p in problems]
    return policy, intel


# -- policies ---------------------------------------------------------------------------------------------------


async def test_policies_per_account_and_cluster(database: Database) -> None:
    async with database.sessions() as s, s.begin():
        digest = await agent_config.set_policy(s, ACCOUNT, None, NETOPS)
        assert digest == Policy.parse(NETOPS).digest
        await agent_config.set_policy(s, ACCOUNT, "prod", {"lists": {"x": ["a"]}})
    async with database.sessions() as s, s.begin():
        default = await agent_config.get_policy(s, ACCOUNT, "")
        assert default == Policy.parse(NETOPS).to_json()
        assert (await agent_config.get_policy(s, ACCOUNT, "prod") or {})["lists"] == {"x": ["a"]}
        assert await agent_config.get_policy(s, ACCOUNT, "staging") is None
        assert await agent_config.get_policy(s, "222222222222", None) is None
        # the cluster's own replaces the default; a cluster without one gets the default; no policy: empty
        text, which = await agent_config.effective_policy(s, ACCOUNT, "prod")
        assert which == "prod" and json.loads(text)["exceptions"] == []
        text, which = await agent_config.effective_policy(s, ACCOUNT, "staging")
        assert which == "" and json.loads(text)["exceptions"][0]["reason"] == "netops scans on purpose"
        text, which = await agent_config.effective_policy(s, "222222222222", "prod")
        assert which == "empty" and json.loads(text) == Policy.empty().to_json()
        rows = await agent_config.list_policies(s, ACCOUNT)
        assert [r.cluster_name for r in rows] == ["", "prod"]
    async with database.sessions() as s, s.begin():
        # setting it again replaces it
        await agent_config.set_policy(s, ACCOUNT, "prod", NETOPS)
        assert await agent_config.get_policy(s, ACCOUNT, "prod") == Policy.parse(NETOPS).to_json()
        assert await agent_config.delete_policy(s, ACCOUNT, "prod") is True
        assert await agent_config.delete_policy(s, ACCOUNT, "prod") is False
        assert await agent_config.get_policy(s, ACCOUNT, "prod") is None


async def test_a_bad_policy_is_refused_with_every_problem(database: Database) -> None:
    doc = {
        "threat_lists": [{"path": "/etc/lists/c2.txt", "category": "c2"}],
        "exceptions": [{"type": "Execution:Runtime/NoSuchType", "reason": "x"}],
        "rules": [{"id": "r1"}],
    }
    async with database.sessions() as s, s.begin():
        with pytest.raises(ValueError) as info:
            await agent_config.set_policy(s, ACCOUNT, "prod", doc)
        msg = str(info.value)
        lines = msg.splitlines()
        assert len(lines) >= 3, msg
        assert all(line.startswith(f"policy of {ACCOUNT}/prod: ") for line in lines), msg
        assert "threat_lists: lists are not part of a policy" in msg and "CreateThreatIntelSet" in msg
        assert "exceptions[0].type: unknown finding type 'Execution:Runtime/NoSuchType'" in msg
        assert "rules[0]: missing required key" in msg
        with pytest.raises(PolicyError, match=r"trusted_lists: .*CreateIPSet"):
            await agent_config.set_policy(s, ACCOUNT, None, {"trusted_lists": [{"path": "/x"}]})
        with pytest.raises(ValueError, match="account id must be 12 digits"):
            await agent_config.set_policy(s, "1234", None, {})
        with pytest.raises(ValueError, match="cluster name"):
            await agent_config.set_policy(s, ACCOUNT, "no/slashes", {})
        assert await agent_config.list_policies(s) == []


# -- GET /agent/v1/config -------------------------------------------------------------------------------------


def test_config_etag_304_and_the_lists_as_they_change(backend: BackendThread, tmp_path: Path) -> None:
    token = backend.token(cluster="prod")
    status, body, headers = get_config(backend, token)
    assert status == 200, body
    etag = body["etag"]
    assert headers["ETag"] == f'"{etag}"' and len(etag) == 32
    assert body == {"etag": etag, "policy": Policy.empty().to_json(), "threatLists": [], "trustedLists": []}
    # the etag is the digest of the canonical body without it
    canonical = json.dumps({k: v for k, v in body.items() if k != "etag"}, sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(canonical.encode()).hexdigest()[:32] == etag
    status, body304, headers = get_config(backend, token, etag)
    assert (status, body304, headers["ETag"]) == (304, {}, f'"{etag}"')
    assert heartbeat(backend, token)["configEtag"] == etag

    gd = backend.guardduty()
    tid = gd.create_threat_intel_set(
        DetectorId=DETECTOR, Name="c2 list", Format="TXT", Location=write(tmp_path, "c2.txt", C2_LIST),
        Activate=True, Tags={"category": "C2"},
    )["ThreatIntelSetId"]  # fmt: skip
    assert heartbeat(backend, token, etag=etag)["configEtag"] != etag
    status, body, headers = get_config(backend, token, etag)
    assert status == 200 and body["etag"] != etag and headers["ETag"] == f'"{body["etag"]}"'
    assert body["threatLists"] == [{"name": "c2 list", "format": "plain", "category": "c2", "content": C2_LIST}]
    assert heartbeat(backend, token)["configEtag"] == body["etag"]
    with_list = body["etag"]

    iid = gd.create_ip_set(
        DetectorId=DETECTOR, Name="office", Format="TXT", Location=write(tmp_path, "t.txt", TRUSTED_LIST),
        Activate=True,
    )["IpSetId"]  # fmt: skip
    body = get_config(backend, token)[1]
    assert body["trustedLists"] == [{"name": "office", "format": "plain", "category": None, "content": TRUSTED_LIST}]

    # inactive sets are not served; the configuration is again what it was
    gd.update_ip_set(DetectorId=DETECTOR, IpSetId=iid, Activate=False)
    body = get_config(backend, token)[1]
    assert body["trustedLists"] == [] and body["etag"] == with_list
    assert get_config(backend, token, with_list)[0] == 304
    # a set in error is not served either
    gd.update_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid, Location=str(tmp_path / "gone.txt"))
    body = get_config(backend, token)[1]
    assert body["threatLists"] == [] and body["etag"] == etag
    # new content under the same name: a new etag
    Path(tmp_path / "gone.txt").write_text("198.51.100.1\n")
    gd.update_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid, Location=str(tmp_path / "gone.txt"))
    body = get_config(backend, token)[1]
    assert body["threatLists"][0]["content"] == "198.51.100.1\n" and body["etag"] not in (etag, with_list)
    assert heartbeat(backend, token)["configEtag"] == body["etag"]


def test_each_cluster_and_account_gets_its_own(backend: BackendThread, tmp_path: Path) -> None:
    prod, staging = backend.token(cluster="prod"), backend.token(cluster="staging")
    other = backend.token(account="222222222222", cluster="prod")
    backend.in_session(lambda s: agent_config.set_policy(s, ACCOUNT, "", NETOPS))
    backend.in_session(lambda s: agent_config.set_policy(s, ACCOUNT, "prod", {"lists": {"prod-only": ["x"]}}))
    backend.in_session(lambda s: agent_config.set_policy(s, "222222222222", "", {"lists": {"theirs": ["y"]}}))
    backend.guardduty().create_threat_intel_set(
        DetectorId=DETECTOR, Name="c2", Format="TXT", Location=write(tmp_path, "c2.txt", C2_LIST), Activate=True
    )
    p, s, o = (get_config(backend, t)[1] for t in (prod, staging, other))
    assert p["policy"]["lists"] == {"prod-only": ["x"]} and p["policy"]["exceptions"] == []
    assert s["policy"]["lists"] == {"tools": ["/usr/bin/nmap"]} and len(s["policy"]["exceptions"]) == 1
    assert o["policy"]["lists"] == {"theirs": ["y"]}
    # lists belong to the detector (account and region): both clusters of the account, not the other account
    assert [x["name"] for x in p["threatLists"]] == [x["name"] for x in s["threatLists"]] == ["c2"]
    assert o["threatLists"] == []
    assert len({p["etag"], s["etag"], o["etag"]}) == 3
    # prod's own policy removed: prod falls back to the default, and gets staging's configuration
    backend.in_session(lambda s: agent_config.delete_policy(s, ACCOUNT, "prod"))
    assert get_config(backend, prod)[1] == s
    status, out, _ = backend.post("/agent/v1/config", None, "rtm_not-a-token", method="GET")
    assert status == 401, out


def test_served_lists_load_in_the_sidecar(backend: BackendThread, tmp_path: Path) -> None:
    token = backend.token()
    backend.in_session(lambda s: agent_config.set_policy(s, ACCOUNT, "", NETOPS))
    gd = backend.guardduty()
    lists = tmp_path / "served"
    lists.mkdir()
    for name, fmt, text, category in (
        ("c2 list", "TXT", C2_LIST, "c2"),
        ("stix", "STIX", STIX, "mining"),
        ("otx", "OTX_CSV", OTX, None),
    ):
        gd.create_threat_intel_set(
            DetectorId=DETECTOR, Name=name, Format=fmt, Location=write(tmp_path, name, text), Activate=True,
            **({"Tags": {"category": category}} if category else {}),
        )  # fmt: skip
    gd.create_ip_set(
        DetectorId=DETECTOR, Name="trusted", Format="TXT", Location=write(tmp_path, "t", TRUSTED_LIST), Activate=True
    )
    config = get_config(backend, token)[1]
    assert [x["format"] for x in config["threatLists"]] == ["plain", "stix", "otx"]
    policy, intel = load_as_the_sidecar(config, lists)
    assert len(policy.exceptions) == 1 and policy.exceptions[0].reason == "netops scans on purpose"
    hit = intel.match_ip("203.0.113.200")
    assert hit and (hit[0].list_name, hit[0].category, hit[0].threat_name) == ("c2 list", "c2", "C2 block")
    assert intel.match_domain("x.c2.evil.example.com") is not None
    miner = intel.match_ip("192.0.2.55")
    assert miner and (miner[0].list_name, miner[0].category, miner[0].threat_name) == ("stix", "mining", "Miner proxy")
    otx = intel.match_ip("192.0.2.66")
    assert otx and (otx[0].list_name, otx[0].category) == ("otx", "malicious")  # no category tag: the default
    assert intel.match_domain("otx-bad.example.net") is not None
    # the IP set is trusted: it wins over the threat list's block
    assert intel.match_ip("203.0.113.9") == () and intel.is_trusted_ip("203.0.113.9")
    assert intel.match_ip("198.51.100.1") == ()
    # the sidecar's ListSpec carries what the config said
    assert ListSpec(str(lists / "threatLists-0"), "plain", "c2", "c2 list") in policy.threat_lists


def test_etag_cache_follows_changes_made_behind_its_back(sqlite_backend: BackendThread, tmp_path: Path) -> None:
    """Another replica (here: a direct write) changes a set: the signature query sees it, the cache cannot lie."""
    token = sqlite_backend.token()
    gd = sqlite_backend.guardduty()
    tid = gd.create_threat_intel_set(
        DetectorId=DETECTOR, Name="c2", Format="TXT", Location=write(tmp_path, "c2.txt", C2_LIST), Activate=True
    )["ThreatIntelSetId"]
    first = heartbeat(sqlite_backend, token)["configEtag"]

    async def rename(s: Any) -> None:
        await s.execute(update(IntelSet).where(IntelSet.id == tid).values(name="renamed elsewhere"))

    sqlite_backend.in_session(rename)
    after = heartbeat(sqlite_backend, token)["configEtag"]
    assert after != first
    body = get_config(sqlite_backend, token)[1]
    assert body["etag"] == after and body["threatLists"][0]["name"] == "renamed elsewhere"

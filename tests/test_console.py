"""The console over HTTP, as a browser talks to it: sign-in, sessions, CSRF, what each operator may see, and the
JSON API behind the pages (filters, sorting, pages, detail, actions, coverage, summary). Both database engines.

The browser itself (rendering, escaping, live refresh) is tests/test_console_browser.py.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import io
import json
import re
import socket
import subprocess
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from email.message import Message
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import orjson
import pytest
from backend_env import VENV_BIN, BackendThread, iso, sample_finding
from sqlalchemy import select, update

from backend import config, tenancy
from backend.console import cli as console_cli
from backend.console.handlers import CONTENT_SECURITY_POLICY, STATIC_DIR, THROTTLE
from backend.console.operators import (
    OperatorError,
    create_operator,
    disable_operator,
    hash_password,
    verify_password,
)
from backend.console.sessions import LoginThrottle
from backend.models import ConsoleSession, FilterRow, FindingRow, RuntimeEventRow

ACCOUNT, OTHER, REGION = "111111111111", "222222222222", "us-east-1"
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)
OTHER_DETECTOR = tenancy.detector_id_for(OTHER, REGION)
PASSWORD = "correct horse battery staple"
T0 = 1_760_000_000.0


# -- a small browser ----------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()

    def cookie(self, name: str) -> Any:
        for raw in self.headers.get_all("Set-Cookie") or []:
            c: SimpleCookie = SimpleCookie()
            c.load(raw)
            if name in c:
                return c[name], raw
        return None


@dataclass
class Browser:
    """Cookies as a browser keeps them for this origin; Origin sent on POST as a browser does."""

    backend: BackendThread
    cookies: dict[str, str] = field(default_factory=dict)
    csrf: str = ""

    @property
    def origin(self) -> str:
        return self.backend.url

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        origin: str | None = "same",
    ) -> Reply:
        u = urllib.parse.urlsplit(self.backend.url)
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)
        hdrs: dict[str, str] = {}
        data: bytes | None = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        if method == "POST" and origin is not None:
            hdrs["Origin"] = self.origin if origin == "same" else origin
        if self.cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        reply = Reply(resp.status, resp.headers, resp.read())
        conn.close()
        for raw in reply.headers.get_all("Set-Cookie") or []:
            c: SimpleCookie = SimpleCookie()
            c.load(raw)
            for name, morsel in c.items():
                if morsel["max-age"] == "0" or (morsel["expires"] and not morsel.value):
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return reply

    def get(self, path: str, **params: Any) -> Reply:
        query = urllib.parse.urlencode(params, doseq=True)
        return self.request("GET", f"{path}?{query}" if query else path)

    def post(self, path: str, body: Any, *, csrf: str | None = None, **kw: Any) -> Reply:
        headers = {"X-CSRF-Token": self.csrf if csrf is None else csrf}
        return self.request("POST", path, body=body, headers={**headers, **kw.pop("headers", {})}, **kw)

    def sign_in(self, username: str, password: str = PASSWORD, **kw: Any) -> Reply:
        reply = self.request("POST", "/console/login", form={"username": username, "password": password}, **kw)
        if reply.status == 303:
            self.csrf = self.get("/console/api/session").json()["csrfToken"]
        return reply


def add_operator(b: BackendThread, username: str = "alice", accounts: list[str] | None = None) -> None:
    b.in_session(lambda s: create_operator(s, username, PASSWORD, accounts or ["*"]))


def signed_in(b: BackendThread, username: str = "alice", accounts: list[str] | None = None) -> Browser:
    add_operator(b, username, accounts)
    browser = Browser(b)
    assert browser.sign_in(username).status == 303
    return browser


# -- passwords and the throttle (no server) ------------------------------------------------------------------------


def test_passwords_are_salted_scrypt_with_their_parameters() -> None:
    a, b = hash_password(PASSWORD), hash_password(PASSWORD)
    assert a != b  # a salt per hash
    scheme, n, r, p, _salt, _key = a.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert verify_password(PASSWORD, a) and verify_password(PASSWORD, b)
    assert not verify_password(PASSWORD + "x", a)
    assert not verify_password(PASSWORD, "scrypt$16384$8$1$garbage")
    assert not verify_password(PASSWORD, a.replace("$16384$", "$1099511627776$"))  # a tampered cost is refused


def test_the_throttle_counts_failures_in_a_sliding_window() -> None:
    now = [1000.0]
    t = LoginThrottle(per_username=3, per_address=5, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert t.retry_after("alice", "10.0.0.1") is None
        t.failed("alice", "10.0.0.1")
    wait = t.retry_after("ALICE", "10.0.0.2")  # usernames compare case-insensitively
    assert wait is not None and 59 <= wait <= 60
    assert t.retry_after("bob", "10.0.0.1") is None
    t.failed("bob", "10.0.0.1")
    t.failed("carol", "10.0.0.1")
    assert t.retry_after("dave", "10.0.0.1") is not None  # 5 failures from one address
    assert t.retry_after("dave", "10.0.0.9") is None
    now[0] += 61
    assert t.retry_after("alice", "10.0.0.1") is None
    t.failed("erin", "10.0.0.3")
    t.succeeded("erin")
    assert t._failures.get("u:erin") is None


# -- sign-in --------------------------------------------------------------------------------------------------------


def test_without_an_operator_nobody_gets_in_and_the_page_says_how_to_create_one(backend: BackendThread) -> None:
    browser = Browser(backend)
    for path in ("/console", "/console/", "/console/login"):
        reply = browser.get(path)
        assert reply.status == 403, path
        assert "runtime-backend operator create" in reply.text
    reply = browser.sign_in("anyone", "anything at all")
    assert reply.status == 403 and "runtime-backend operator create" in reply.text
    assert not browser.cookies
    assert browser.get("/console/api/findings").status == 401
    # a disabled operator is no operator
    add_operator(backend, "alice")
    backend.in_session(lambda s: disable_operator(s, "alice"))
    assert browser.get("/console").status == 403
    assert browser.sign_in("alice").status == 403


def test_sign_in_opens_a_strict_cookie_session_kept_only_as_a_hash(backend: BackendThread) -> None:
    add_operator(backend)
    browser = Browser(backend)
    first = browser.get("/console")
    assert first.status == 303 and first.headers["Location"] == "/console/login"
    page = browser.get("/console/login")
    assert page.status == 200 and 'name="password"' in page.text
    reply = browser.sign_in("alice")
    assert reply.status == 303 and reply.headers["Location"] == "/console/"
    morsel, raw = reply.cookie("rtm_session")
    secret = morsel.value
    assert len(secret) >= 43  # 32 random bytes
    assert morsel["httponly"] and morsel["path"] == "/console" and not morsel["secure"]
    assert re.search(r"SameSite=Strict", raw, re.I)
    assert 0 < int(morsel["max-age"]) <= 12 * 3600
    rows = backend.in_session(lambda s: _all(s, ConsoleSession))
    assert [r.id_sha256 for r in rows] == [hashlib.sha256(secret.encode()).hexdigest()]
    assert secret not in repr([vars(r) for r in rows])

    index = browser.get("/console/")
    assert index.status == 200 and 'src="/console/static/js/main.js"' in index.text
    session = browser.get("/console/api/session").json()
    assert session["username"] == "alice" and session["accounts"] == ["*"] and len(session["csrfToken"]) >= 32

    out = browser.post("/console/logout", {})
    assert out.status == 200
    assert "rtm_session" not in browser.cookies
    assert backend.in_session(lambda s: _all(s, ConsoleSession)) == []
    browser.cookies["rtm_session"] = secret  # an old cookie is no key once signed out
    assert browser.get("/console/api/session").status == 401
    assert browser.get("/console/").status == 303


def test_the_cookie_is_secure_behind_a_tls_proxy(sqlite_backend: BackendThread) -> None:
    add_operator(sqlite_backend)
    browser = Browser(sqlite_backend)
    reply = browser.sign_in("alice", headers={"X-Forwarded-Proto": "https"}, origin=None)
    morsel, _ = reply.cookie("rtm_session")
    assert morsel["secure"]


def test_wrong_passwords_and_unknown_users_get_the_same_answer(backend: BackendThread) -> None:
    add_operator(backend)
    browser = Browser(backend)
    wrong = browser.sign_in("alice", PASSWORD + "!")
    unknown = browser.sign_in("mallory", PASSWORD)
    assert wrong.status == unknown.status == 401
    assert "Wrong username or password." in wrong.text and "Wrong username or password." in unknown.text
    assert not browser.cookies
    assert backend.in_session(lambda s: _all(s, ConsoleSession)) == []
    # a sign-in posted from another site is refused (login CSRF)
    assert browser.sign_in("alice", origin="https://evil.example").status == 403
    assert not browser.cookies


def test_failed_sign_ins_are_throttled_per_username_then_per_address(backend: BackendThread) -> None:
    add_operator(backend, "alice")
    add_operator(backend, "bob")
    browser = Browser(backend)
    for _ in range(5):
        assert browser.sign_in("alice", "not the password").status == 401
    locked = browser.sign_in("alice")  # even the right password: the lock holds
    assert locked.status == 429 and int(locked.headers["Retry-After"]) > 0
    assert not browser.cookies
    assert Browser(backend).sign_in("bob").status == 303  # another username from the same address still may
    for i in range(15):  # 20 failures from this address in all
        assert browser.sign_in(f"guess{i}", "not the password").status == 401
    assert Browser(backend).sign_in("bob").status == 429
    backend.app[THROTTLE]._failures.clear()  # as when the window has passed
    assert Browser(backend).sign_in("alice").status == 303


def test_sessions_end_when_they_expire_or_their_operator_is_disabled(backend: BackendThread) -> None:
    browser = signed_in(backend)
    assert browser.get("/console/api/session").status == 200
    backend.in_session(lambda s: s.execute(update(ConsoleSession).values(expires_at=tenancy.now_ms() - 1)))
    assert browser.get("/console/api/session").status == 401
    assert "rtm_session" not in browser.cookies
    assert backend.in_session(lambda s: _all(s, ConsoleSession)) == []

    assert browser.sign_in("alice").status == 303
    backend.in_session(lambda s: disable_operator(s, "alice"))
    assert browser.get("/console/api/session").status == 401


def test_a_session_slides_while_it_is_used(sqlite_backend: BackendThread) -> None:
    browser = signed_in(sqlite_backend)
    soon = tenancy.now_ms() + 5000
    stale = update(ConsoleSession).values(last_seen_at=tenancy.now_ms() - 3_600_000, expires_at=soon)
    sqlite_backend.in_session(lambda s: s.execute(stale))
    reply = browser.get("/console/api/session")
    assert reply.status == 200
    row = sqlite_backend.in_session(lambda s: _all(s, ConsoleSession))[0]
    assert row.expires_at > tenancy.now_ms() + 11 * 3_600_000
    # the browser keeps the cookie as long as the session now lasts
    morsel, _ = reply.cookie("rtm_session")
    assert morsel.value == browser.cookies["rtm_session"] and int(morsel["max-age"]) == 12 * 3600
    # within the minute, nothing is written and no cookie sent again
    assert browser.get("/console/api/session").cookie("rtm_session") is None


# -- CSRF and headers ----------------------------------------------------------------------------------------------


def test_state_changes_need_the_csrf_token_json_and_this_origin(backend: BackendThread) -> None:
    token = backend.token()
    f = sample_finding()
    assert backend.send(token, [f])[0] == 200
    browser = signed_in(backend)
    body = {"findings": [{"detectorId": DETECTOR, "id": f["id"]}], "archived": True}

    def archived() -> bool:
        row = backend.in_session(lambda s: s.get(FindingRow, (DETECTOR, f["id"])))
        return bool(row.archived)

    assert browser.post("/console/api/findings/archive", body, csrf="").status == 403
    assert browser.post("/console/api/findings/archive", body, csrf="x" * 43).status == 403
    assert browser.post("/console/api/findings/archive", body, origin="https://evil.example").status == 403
    referer = {"Referer": "https://evil.example/page"}
    assert browser.post("/console/api/findings/archive", body, origin=None, headers=referer).status == 403
    form = browser.request(
        "POST",
        "/console/api/findings/archive",
        form={"findings": "x"},
        headers={"X-CSRF-Token": browser.csrf},
    )
    assert form.status == 415
    assert not archived()
    assert browser.post("/console/logout", {}, csrf="wrong").status == 403
    assert browser.get("/console/api/session").status == 200  # still signed in

    ok = browser.post("/console/api/findings/archive", body)
    assert ok.status == 200 and ok.json() == {"updated": 1}
    assert archived()
    row = backend.in_session(lambda s: s.get(FindingRow, (DETECTOR, f["id"])))
    assert row.archived_by == "user:alice"
    # no Origin or Referer (some privacy settings strip them): the token alone decides
    body["archived"] = False
    assert browser.post("/console/api/findings/archive", body, origin=None).status == 200
    assert not archived()


def test_every_console_response_carries_the_security_headers(sqlite_backend: BackendThread) -> None:
    browser = signed_in(sqlite_backend)
    for path in (
        "/console/",
        "/console/login",
        "/console/api/session",
        "/console/api/findings",
        "/console/api/nothing-here",
        "/console/static/js/main.js",
    ):
        reply = browser.get(path)
        assert reply.status in (200, 404), path
        assert reply.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, path
        for directive in (
            "default-src 'self'",
            "script-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ):
            assert directive in reply.headers["Content-Security-Policy"]
        assert reply.headers["X-Content-Type-Options"] == "nosniff", path
        assert reply.headers["Referrer-Policy"] == "same-origin", path
    assert browser.get("/console/api/session").headers["Cache-Control"] == "no-store"
    assert "javascript" in browser.get("/console/static/js/main.js").headers["Content-Type"]
    # the API's own routes are not the console's: no console headers there
    assert "Content-Security-Policy" not in Browser(sqlite_backend).get("/healthz").headers


def test_the_page_code_never_parses_strings_as_html() -> None:
    """The browser test proves escaping for the pages it opens; this keeps every code path honest."""
    sources = list((STATIC_DIR / "js").glob("*.js"))
    assert len(sources) >= 6
    for path in sources:
        code = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in code, f"{path.name} uses {sink}"
    index = (STATIC_DIR / "index.html").read_text()
    assert "<script>" not in index and "style=" not in index and not re.search(r"\son[a-z]+=", index)


def test_the_login_page_escapes_the_username_it_shows_back(sqlite_backend: BackendThread) -> None:
    add_operator(sqlite_backend)
    payload = '"><script>alert(1)</script>'
    reply = Browser(sqlite_backend).sign_in(payload, "whatever whatever")
    assert reply.status == 401
    assert payload not in reply.text
    assert 'value="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in reply.text


# -- what an operator sees ---------------------------------------------------------------------------------------


def _heartbeat(account: str, cluster: str, task: str) -> dict[str, Any]:
    return {
        "agentId": f"agent-{task}",
        "agentVersion": "0.1.0",
        "sentAt": iso(time.time()),
        "intervalS": 60,
        "task": {
            "accountId": account,
            "region": REGION,
            "clusterName": cluster,
            "taskArn": f"arn:aws:ecs:{REGION}:{account}:task/{cluster}/{task}",
            "family": "web",
            "launchType": "FARGATE",
        },
        "sources": {"proc_poll": {"enabled": True}, "sock_diag": {"enabled": True}},
    }


def test_an_operator_limited_to_one_account_sees_nothing_of_another(backend: BackendThread) -> None:
    mine, theirs = backend.token(ACCOUNT, "prod"), backend.token(OTHER, "prod")
    f_mine = sample_finding(account=ACCOUNT, created=time.time() - 60)
    f_theirs = sample_finding(account=OTHER, created=time.time() - 60, image="secret/image:1")
    assert backend.send(mine, [f_mine])[0] == 200
    assert backend.send(theirs, [f_theirs])[0] == 200
    assert backend.post("/agent/v1/heartbeat", _heartbeat(ACCOUNT, "prod", "aaa"), mine)[0] == 200
    assert backend.post("/agent/v1/heartbeat", _heartbeat(OTHER, "prod", "bbb"), theirs)[0] == 200

    browser = signed_in(backend, "alice", [ACCOUNT])
    session = browser.get("/console/api/session").json()
    assert [d["accountId"] for d in session["detectors"]] == [ACCOUNT]
    listed = browser.get("/console/api/findings", archived="all").json()
    assert [f["id"] for f in listed["findings"]] == [f_mine["id"]] and listed["total"] == 1
    assert browser.get("/console/api/findings", account=OTHER).json()["total"] == 0
    assert browser.get("/console/api/facets").json()["accounts"] == [ACCOUNT]
    changes = browser.get("/console/api/findings/changes", since=0).json()["changed"]
    assert [c["id"] for c in changes] == [f_mine["id"]]
    assert browser.get("/console/api/finding", detectorId=OTHER_DETECTOR, id=f_theirs["id"]).status == 404
    assert browser.get("/console/api/finding", detectorId=DETECTOR, id=f_mine["id"]).status == 200
    refused = browser.post(
        "/console/api/findings/archive",
        {"findings": [{"detectorId": OTHER_DETECTOR, "id": f_theirs["id"]}], "archived": True},
    )
    assert refused.status == 404
    assert not backend.in_session(lambda s: s.get(FindingRow, (OTHER_DETECTOR, f_theirs["id"]))).archived
    rule = {
        "detectorId": OTHER_DETECTOR,
        "name": "sneaky",
        "findingCriteria": {"criterion": {"type": {"eq": [f_theirs["type"]]}}},
    }
    assert browser.post("/console/api/suppression-rules", rule).status == 404
    assert backend.in_session(lambda s: _all(s, FilterRow)) == []
    summary = browser.get("/console/api/summary", days=2).json()
    assert sum(summary["totals"].values()) == 1
    assert [i["image"] for i in summary["topImages"]] == ["nginx:1.27"]
    cov = browser.get("/console/api/coverage").json()
    assert [(c["accountId"], c["running"]) for c in cov["clusters"]] == [(ACCOUNT, 1)]

    nobody = signed_in(backend, "carol", ["333333333333"])  # an account with no detector yet
    assert nobody.get("/console/api/findings", archived="all").json()["total"] == 0
    assert nobody.get("/console/api/coverage").json()["clusters"] == []
    assert nobody.get("/console/api/summary").json()["topImages"] == []

    everyone = signed_in(backend, "root", ["*"])
    assert everyone.get("/console/api/findings").json()["total"] == 2
    assert {c["accountId"] for c in everyone.get("/console/api/coverage").json()["clusters"]} == {ACCOUNT, OTHER}


def _seed(b: BackendThread) -> dict[str, dict[str, Any]]:
    prod, staging = b.token(cluster="prod"), b.token(cluster="staging")
    fs = {
        "shell": sample_finding(type="Execution:Runtime/ReverseShell", severity=8.0, created=T0 + 10, count=3),
        "miner": sample_finding(
            type="CryptoCurrency:Runtime/BitcoinTool.B", severity=9.0, created=T0 + 20, family="worker", count=7
        ),
        "new_bin": sample_finding(type="Execution:Runtime/NewBinaryExecuted", severity=5.0, created=T0 + 30),
        "recon": sample_finding(type="Discovery:Runtime/SuspiciousCommand", severity=2.0, created=T0 + 40, count=2),
        "staging": sample_finding(
            type="Execution:Runtime/ReverseShell", severity=8.0, created=T0 + 50, cluster="staging"
        ),
    }
    assert b.send(prod, [f for k, f in fs.items() if k != "staging"])[0] == 200
    assert b.send(staging, [fs["staging"]])[0] == 200
    return fs


def test_the_findings_list_filters_sorts_and_pages_with_the_apis_criteria(backend: BackendThread) -> None:
    fs = _seed(backend)
    ids = {k: f["id"] for k, f in fs.items()}
    by_id = {v: k for k, v in ids.items()}
    browser = signed_in(backend)

    def names(**params: Any) -> list[str]:
        reply = browser.get("/console/api/findings", **params)
        assert reply.status == 200, reply.text
        return [by_id[f["id"]] for f in reply.json()["findings"]]

    assert names() == ["staging", "recon", "new_bin", "miner", "shell"]  # updatedAt, newest first
    assert set(names(severityGte=7)) == {"shell", "miner", "staging"}
    assert names(severityGte=4, severityLt=7) == ["new_bin"]
    assert names(severityGte=9) == ["miner"]
    assert set(names(type="Execution:Runtime/ReverseShell")) == {"shell", "staging"}
    assert set(names(type=["Execution:Runtime/ReverseShell", "Discovery:Runtime/SuspiciousCommand"])) == {
        "shell",
        "staging",
        "recon",
    }
    assert names(cluster="staging") == ["staging"]
    assert names(family="worker") == ["miner"]
    assert names(**{"from": int((T0 + 30) * 1000), "to": int((T0 + 40) * 1000)}) == ["recon", "new_bin"]
    sev = browser.get("/console/api/findings", sort="severity", order="ASC").json()["findings"]
    assert [f["severity"] for f in sev] == [2.0, 5.0, 8.0, 8.0, 9.0]
    assert names(sort="service.count", order="DESC")[:2] == ["miner", "shell"]

    # archived: hidden by default, alone with true, with the rest with all
    assert browser.post(
        "/console/api/findings/archive", {"findings": [{"detectorId": DETECTOR, "id": ids["recon"]}], "archived": True}
    ).json() == {"updated": 1}
    assert "recon" not in names()
    assert names(archived="true") == ["recon"]
    assert len(names(archived="all")) == 5

    # pages: disjoint, complete, with the total
    pages = []
    for offset in (0, 2, 4):
        reply = browser.get("/console/api/findings", archived="all", limit=2, offset=offset).json()
        assert reply["total"] == 5 and reply["offset"] == offset
        pages.append([f["id"] for f in reply["findings"]])
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(i for p in pages for i in p) == sorted(ids.values())

    row = browser.get("/console/api/findings", cluster="staging").json()["findings"][0]
    assert row["severityLabel"] == "High" and row["taskId"] == "0123456789abcdef" and row["family"] == "web"
    assert row["containerName"] == "app" and row["executablePath"] == "/bin/bash" and row["count"] == 1

    # wrong filters are refused with the field named, as the API does
    for params, words in (
        ({"severityGte": "high"}, "severityGte"),
        ({"sort": "document"}, "sort"),
        ({"order": "sideways"}, "sort.orderBy"),
        ({"archived": "maybe"}, "archived"),
        ({"limit": 10_000}, "limit"),
    ):
        reply = browser.get("/console/api/findings", **params)
        assert reply.status == 400 and words in reply.json()["error"], (params, reply.text)


def test_facets_and_changes_follow_what_arrives(backend: BackendThread) -> None:
    token = backend.token(cluster="prod")
    first = sample_finding(created=time.time() - 30)
    assert backend.send(token, [first])[0] == 200
    browser = signed_in(backend)
    listed = browser.get("/console/api/findings").json()
    cursor = listed["cursor"]
    assert browser.get("/console/api/facets").json() == {
        "types": ["Execution:Runtime/ReverseShell"],
        "clusters": ["prod"],
        "families": ["web"],
        "accounts": [ACCOUNT],
    }
    time.sleep(0.01)
    later = sample_finding(type="Discovery:Runtime/SuspiciousCommand", severity=2.0, created=time.time())
    updated = dict(first, updatedAt=iso(time.time()))
    updated["service"] = dict(first["service"], count=5)
    assert backend.send(token, [later, updated])[0] == 200
    changed = browser.get("/console/api/findings/changes", since=cursor).json()
    versions = {c["id"]: c["count"] for c in changed["changed"]}
    assert versions == {later["id"]: 1, first["id"]: 5}
    assert changed["cursor"] >= cursor
    # the filters apply to changes too
    only = browser.get("/console/api/findings/changes", since=cursor, severityGte=7).json()["changed"]
    assert [c["id"] for c in only] == [first["id"]]


# -- one finding ------------------------------------------------------------------------------------------------


def _event(task_arn: str, t_ms: int, kind: str, pid: int, exe: str, *, uuid_: str | None = None) -> RuntimeEventRow:
    doc = {
        "kind": kind,
        "time": iso(t_ms / 1000),
        "process": {
            "pid": pid,
            "name": exe.rsplit("/", 1)[-1],
            "executablePath": exe,
            "commandLine": f"{exe} --flag",
            "user": "root",
            "uuid": uuid_ or uuid.uuid4().hex,
            "containerName": "app",
        },
    }
    return RuntimeEventRow(
        detector_id=DETECTOR,
        id=uuid.uuid4().hex,
        task_arn=task_arn,
        time=t_ms,
        kind=kind,
        container_name="app",
        process_name=exe.rsplit("/", 1)[-1],
        executable_path=exe,
        received_at=t_ms,
        document=orjson.dumps(doc).decode(),
    )


def test_the_detail_has_the_lineage_context_intel_and_the_tasks_timeline(backend: BackendThread) -> None:
    token = backend.token(cluster="prod")
    f = sample_finding(created=T0, updated=T0 + 60, remote_ip="198.51.100.9", count=2)
    process = f["service"]["runtimeDetails"]["process"]
    process["uuid"] = "proc-self"
    process["lineage"] = [
        {"name": "sh", "executablePath": "/bin/sh", "pid": 4100, "commandLine": "sh -c x", "uuid": "proc-parent"},
        {"name": "node", "executablePath": "/usr/bin/node", "pid": 4000, "commandLine": "node app.js", "user": "app"},
    ]
    f["service"]["runtimeDetails"]["context"] = {"toolName": "nc", "toolCategory": "netcat"}
    f["service"]["evidence"] = {
        "threatIntelligenceDetails": [{"threatListName": "feodo", "threatNames": ["botnet-c2"]}]
    }
    other_task = sample_finding(task="fedcba9876543210", created=T0)
    assert backend.send(token, [f, other_task])[0] == 200
    task_arn = f["resource"]["ecsClusterDetails"]["taskDetails"]["arn"]
    t0 = int(T0 * 1000)
    events = [
        _event(task_arn, t0 - 60_000, "process.exec", 4100, "/bin/sh", uuid_="proc-parent"),
        _event(task_arn, t0 + 1_000, "net.connect", 4242, "/bin/bash", uuid_="proc-self"),
        _event(task_arn, t0 + 30_000, "process.exec", 5000, "/usr/bin/curl"),
        _event(task_arn, t0 - 3_600_000, "process.exec", 1, "/too/early"),  # outside the window
        _event(task_arn.replace("0123456789abcdef", "fedcba9876543210"), t0, "process.exec", 7, "/other/task"),
    ]

    async def insert(s: Any) -> None:
        s.add_all(events)

    backend.in_session(insert)
    browser = signed_in(backend)
    reply = browser.get("/console/api/finding", detectorId=DETECTOR, id=f["id"])
    assert reply.status == 200, reply.text
    detail = reply.json()
    assert detail["finding"]["id"] == f["id"] and detail["finding"]["service"]["count"] == 2
    lineage = detail["finding"]["service"]["runtimeDetails"]["process"]["lineage"]
    assert [p["commandLine"] for p in lineage] == ["sh -c x", "node app.js"]
    assert detail["finding"]["service"]["runtimeDetails"]["context"]["toolName"] == "nc"
    assert detail["finding"]["service"]["evidence"]["threatIntelligenceDetails"][0]["threatListName"] == "feodo"
    assert detail["otherFindingsOfTask"] == 0
    timeline = detail["timeline"]
    assert [e["executablePath"] for e in timeline["events"]] == ["/bin/sh", "/bin/bash", "/usr/bin/curl"]
    assert [e["related"] for e in timeline["events"]] == [True, True, False]
    assert timeline["events"][0]["commandLine"] == "/bin/sh --flag" and timeline["truncated"] is False
    wider = browser.get("/console/api/finding", detectorId=DETECTOR, id=f["id"], windowMinutes=120).json()
    assert "/too/early" in [e["executablePath"] for e in wider["timeline"]["events"]]
    prefill = detail["suppression"]["findingCriteria"]["criterion"]
    assert prefill == {
        "type": {"eq": ["Execution:Runtime/ReverseShell"]},
        "resource.ecsClusterDetails.taskDetails.containers.image": {"eq": ["nginx:1.27"]},
    }
    assert browser.get("/console/api/finding", detectorId=DETECTOR, id="nope").status == 404


def test_a_suppression_rule_made_in_the_console_is_a_guardduty_filter(backend: BackendThread) -> None:
    token = backend.token(cluster="prod")
    noisy = sample_finding(type="Execution:Runtime/NewBinaryExecuted", severity=5.0, image="builder:1")
    other = sample_finding(type="Execution:Runtime/NewBinaryExecuted", severity=5.0, image="web:1")
    assert backend.send(token, [noisy, other])[0] == 200
    browser = signed_in(backend)
    rule = {
        "detectorId": DETECTOR,
        "name": "builder-binaries",
        "findingCriteria": {
            "criterion": {
                "type": {"eq": ["Execution:Runtime/NewBinaryExecuted"]},
                "resource.ecsClusterDetails.taskDetails.containers.image": {"eq": ["builder:1"]},
            }
        },
        "archiveMatching": True,
    }
    reply = browser.post("/console/api/suppression-rules", rule)
    assert reply.status == 200, reply.text
    assert reply.json() == {"name": "builder-binaries", "detectorId": DETECTOR, "archived": 1}
    got = backend.guardduty().get_filter(DetectorId=DETECTOR, FilterName="builder-binaries")
    assert got["Action"] == "ARCHIVE"
    assert got["FindingCriteria"]["Criterion"]["type"]["Eq"] == ["Execution:Runtime/NewBinaryExecuted"]
    rows = {r.id: r for r in backend.in_session(lambda s: _all(s, FindingRow))}
    assert rows[noisy["id"]].archived and rows[noisy["id"]].archived_by == "filter:builder-binaries"
    assert not rows[other["id"]].archived
    # the rule archives new matching findings on arrival, as any suppression rule does
    again = sample_finding(type="Execution:Runtime/NewBinaryExecuted", severity=5.0, image="builder:1")
    assert backend.send(token, [again])[0] == 200
    assert backend.in_session(lambda s: s.get(FindingRow, (DETECTOR, again["id"]))).archived

    # CreateFilter's own validation answers
    dup = browser.post("/console/api/suppression-rules", rule)
    assert dup.status == 400 and "already exists" in dup.json()["error"]
    bad = dict(rule, name="x y")
    assert browser.post("/console/api/suppression-rules", bad).status == 400
    typo = dict(rule, name="typo-rule", findingCriteria={"criterion": {"tpye": {"eq": ["x"]}}})
    reply = browser.post("/console/api/suppression-rules", typo)
    assert reply.status == 400 and "did you mean 'type'" in reply.json()["error"]
    empty = dict(rule, name="empty-rule", findingCriteria={"criterion": {}})
    assert browser.post("/console/api/suppression-rules", empty).status == 400
    assert [r.name for r in backend.in_session(lambda s: _all(s, FilterRow))] == ["builder-binaries"]


# -- coverage and summary ------------------------------------------------------------------------------------------


def test_coverage_is_healthy_over_running_tasks_with_what_to_do(backend: BackendThread) -> None:
    prod = backend.token(cluster="prod")
    for task in ("t1", "t2", "t3"):
        assert backend.post("/agent/v1/heartbeat", _heartbeat(ACCOUNT, "prod", task), prod)[0] == 200
    blind = _heartbeat(ACCOUNT, "prod", "t4")
    blind["sources"] = {"proc_poll": {"enabled": False, "detail": "no SYS_PTRACE"}}
    blind["agentVersion"] = "0.0.9"
    assert backend.post("/agent/v1/heartbeat", blind, prod)[0] == 200
    browser = signed_in(backend)
    cov = browser.get("/console/api/coverage").json()
    assert cov["running"] == 4 and cov["healthy"] == 3 and cov["coveragePercent"] == 75.0
    (cluster,) = cov["clusters"]
    assert cluster["clusterName"] == "prod" and cluster["coveragePercent"] == 75.0 and cluster["status"] == "UNHEALTHY"
    assert cluster["agentVersions"] == {"0.0.9": 1, "0.1.0": 3}
    first = cluster["tasks"][0]  # unhealthy first
    assert first["taskId"] == "t4" and first["status"] == "UNHEALTHY"
    assert "Agent runs without a process source" in first["issue"] and "no SYS_PTRACE" in first["issue"]
    assert any("SYS_PTRACE" in a for a in first["advice"])
    assert cluster["tasks"][1]["sourcesEnabled"] == ["proc_poll", "sock_diag"]


def test_the_summary_counts_by_severity_and_type_over_time(backend: BackendThread) -> None:
    now = time.time()
    prod, staging = backend.token(cluster="prod"), backend.token(cluster="staging")
    findings = [
        sample_finding(severity=9.5, created=now - 3 * 86400, image="a:1"),
        sample_finding(severity=8.0, created=now - 3 * 86400, image="a:1"),
        sample_finding(
            severity=5.0, created=now - 1.5 * 86400, type="Execution:Runtime/NewBinaryExecuted", image="b:1"
        ),
        sample_finding(severity=2.0, created=now - 60, type="Discovery:Runtime/SuspiciousCommand", image="a:1"),
        sample_finding(severity=8.0, created=now - 40 * 86400),  # outside 14 days
    ]
    assert backend.send(prod, findings)[0] == 200
    assert backend.send(staging, [sample_finding(cluster="staging", severity=7.0, created=now - 120)])[0] == 200
    browser = signed_in(backend)
    s = browser.get("/console/api/summary", days=14).json()
    assert s["bucketMs"] == 86_400_000 and len(s["bySeverity"]) == 15
    assert s["totals"] == {"Low": 1, "Medium": 1, "High": 2, "Critical": 1}
    assert sum(b["High"] for b in s["bySeverity"]) == 2
    day3 = [b for b in s["bySeverity"] if b["Critical"]]
    assert len(day3) == 1 and day3[0]["High"] == 1
    types = {t["type"]: t for t in s["byType"]}
    assert types["Execution:Runtime/ReverseShell"]["total"] == 3
    assert sum(p["count"] for p in types["Execution:Runtime/ReverseShell"]["series"]) == 3
    assert s["topClusters"][0] == {"accountId": ACCOUNT, "clusterName": "prod", "count": 4}
    assert s["topImages"][0] == {"image": "a:1", "count": 3}
    hourly = browser.get("/console/api/summary", days=1).json()
    assert hourly["bucketMs"] == 3_600_000 and sum(hourly["totals"].values()) == 2


def test_exporters_health_is_shown_to_operators_of_every_account(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: the webhook fails at once
        s.bind(("127.0.0.1", 0))
        refused = s.getsockname()[1]
    exports = tmp_path / "exports.toml"
    exports.write_text(
        "[[exporters]]\n"
        'name = "siem"\ntype = "webhook"\n'
        f'url = "http://127.0.0.1:{refused}/hook"\nsecret = "0123456789abcdef-secret"\n'
        "batch_max_wait_s = 0.05\nbackoff_base_s = 0.01\nbackoff_max_s = 0.02\nmax_attempts = 1\n"
    )
    b = BackendThread(f"sqlite:///{tmp_path / 'b.db'}", exports_file=str(exports)).start()
    try:
        assert b.send(b.token(), [sample_finding()])[0] == 200
        admin = signed_in(b, "root", ["*"])
        deadline = time.monotonic() + 10
        while True:
            (siem,) = admin.get("/console/api/exports").json()["exporters"]
            if siem["deadLettered"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert siem["name"] == "siem" and siem["type"] == "webhook"
        assert siem["status"] == "FAILING" and siem["deadLettered"] == 1 and siem["lastError"]
        limited = signed_in(b, "alice", [ACCOUNT])
        assert limited.get("/console/api/exports").json() == {"visible": False, "exporters": []}
    finally:
        b.stop()


# -- the operator command --------------------------------------------------------------------------------------------


def test_runtime_backend_operator_commands(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'b.db'}"
    cli = str(VENV_BIN / "runtime-backend")

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [cli, "--database-url", db, "--log-level", "WARNING", "operator", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = run("create", "--username", "ops", "--accounts", ACCOUNT, "--password-stdin", stdin=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout) == {"username": "ops", "accounts": [ACCOUNT]}
    listed = run("list")
    assert [(o["username"], o["accounts"], o["disabledAt"]) for o in json.loads(listed.stdout)] == [
        ("ops", [ACCOUNT], None)
    ]
    assert "scrypt" not in listed.stdout

    b = BackendThread(db).start()
    try:
        browser = Browser(b)
        assert browser.sign_in("ops").status == 303
        assert browser.get("/console/api/session").json()["accounts"] == [ACCOUNT]
        assert run("disable", "ops").returncode == 0
        assert browser.get("/console/api/session").status == 401
        assert browser.sign_in("ops").status == 403  # no enabled operator left
    finally:
        b.stop()


def test_operator_input_is_checked_before_anything_is_stored(tmp_path: Path, monkeypatch: Any) -> None:
    """The same code the command runs, in-process (each runtime-backend start costs a second or two)."""
    db = f"sqlite:///{tmp_path / 'b.db'}"
    settings = config.load({"database_url": db})

    def create(username: str, accounts: str, stdin: str | None) -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin or ""))
        args = argparse.Namespace(
            action="create", username=username, accounts=accounts, password_stdin=stdin is not None
        )
        return asyncio.run(console_cli.run(args, settings))

    with pytest.raises(OperatorError, match="at least 12 characters"):
        create("weak", "*", "short\n")
    with pytest.raises(OperatorError, match="12 digits"):
        create("x", "12345", PASSWORD + "\n")
    with pytest.raises(OperatorError, match="alone"):
        create("x", f"*,{ACCOUNT}", PASSWORD + "\n")
    with pytest.raises(OperatorError, match="username"):
        create("no spaces", "*", PASSWORD + "\n")
    with pytest.raises(OperatorError, match="--password-stdin"):  # no terminal to ask on: refused, not hung
        create("tty", "*", None)
    assert not (tmp_path / "b.db").exists()  # refused before the database was even opened
    assert create("ops", f"{OTHER}, {ACCOUNT}", PASSWORD + "\n") == 0
    with pytest.raises(OperatorError, match="exists"):
        create("ops", "*", PASSWORD + "\n")
    disable = argparse.Namespace(action="disable", username="ops")
    assert asyncio.run(console_cli.run(disable, settings)) == 0
    assert asyncio.run(console_cli.run(disable, settings)) == 1
    # a disabled operator may be created again: new password, new accounts
    assert create("ops", "*", "another long password\n") == 0


async def _all(session: Any, model: Any) -> list[Any]:
    return list((await session.execute(select(model))).scalars())

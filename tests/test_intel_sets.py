"""Threat intel sets and IP sets through boto3 against a running backend, over SQLite and PostgreSQL; the lists
served from files in tmp_path and from a real HTTP server on 127.0.0.1; the fetcher's bounds on its own."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_env import BackendThread, aws_cli
from botocore.exceptions import ClientError

from backend import intel_sets, tenancy
from backend.intel_sets import FetchLimits, ListFetchError, Location, fetch_location
from backend.models import IntelSet

ACCOUNT, REGION = "111111111111", "us-east-1"
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)
REASON = intel_sets.STATUS_TAG

PLAIN = "# a user's list\n198.51.100.7\n203.0.113.0/24  # a block\nevil.example.com\n"
STIX = """{"type": "bundle", "id": "bundle--1", "objects": [
  {"type": "indicator", "id": "indicator--1", "pattern": "[ipv4-addr:value = '192.0.2.55']",
   "pattern_type": "stix", "name": "C2 box"},
  {"type": "indicator", "id": "indicator--2", "pattern": "[domain-name:value = 'stix-bad.example.net']",
   "pattern_type": "stix"}]}"""
OTX = "Indicator type,Indicator,Description\nIPv4,192.0.2.66,bad host\ndomain,otx-bad.example.net,worse\n"


class ListServer:
    """A real HTTP server on 127.0.0.1 serving ``routes`` (path -> (status, headers, body)); ``/slow`` stalls."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hits: dict[str, int] = {}
        routes, hits = self.routes, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits[self.path] = hits.get(self.path, 0) + 1
                if self.path == "/slow":
                    time.sleep(3)
                status, headers, body = routes.get(self.path, (404, {}, b"not here"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "no-length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, path: str, body: str | bytes, status: int = 200, headers: dict[str, str] | None = None) -> str:
        self.routes[path] = (status, headers or {}, body.encode() if isinstance(body, str) else body)
        return self.url + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def lists() -> Iterator[ListServer]:
    s = ListServer()
    try:
        yield s
    finally:
        s.close()


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens once the socket is closed


def error_of(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ClientError) as info:
        call()
    err = info.value.response["Error"]
    assert err["Code"] == "BadRequestException", err
    return str(err["Message"])


# -- CRUD -----------------------------------------------------------------------------------------------------


def test_threat_intel_set_crud_from_a_file(backend: BackendThread, tmp_path: Path) -> None:
    gd = backend.guardduty()
    path = write(tmp_path, "c2.txt", PLAIN)
    tid = gd.create_threat_intel_set(
        DetectorId=DETECTOR, Name="My C2 list", Format="TXT", Location=path, Activate=True,
        Tags={"category": "c2", "team": "sec"},
    )["ThreatIntelSetId"]  # fmt: skip
    assert len(tid) == 32 and int(tid, 16) >= 0
    got = gd.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid)
    assert {k: got[k] for k in ("Name", "Format", "Location", "Status", "Tags")} == {
        "Name": "My C2 list",
        "Format": "TXT",
        "Location": path,
        "Status": "ACTIVE",
        "Tags": {"category": "c2", "team": "sec"},
    }
    stored = backend.in_session(lambda s: s.get(IntelSet, tid))
    assert stored.kind == "THREAT" and stored.content == PLAIN and stored.detector_id == DETECTOR
    assert gd.list_threat_intel_sets(DetectorId=DETECTOR)["ThreatIntelSetIds"] == [tid]
    # an IP set is another list: the threat intel set's id is not one
    assert gd.list_ip_sets(DetectorId=DETECTOR)["IpSetIds"] == []
    assert "no such resource" in error_of(lambda: gd.get_ip_set(DetectorId=DETECTOR, IpSetId=tid))

    gd.update_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid, Name="Renamed", Activate=False)
    got = gd.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid)
    assert (got["Name"], got["Status"]) == ("Renamed", "INACTIVE")
    # reactivating reads the list again: a changed file is taken
    Path(path).write_text("192.0.2.200\n")
    gd.update_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid, Activate=True)
    assert gd.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid)["Status"] == "ACTIVE"
    assert backend.in_session(lambda s: s.get(IntelSet, tid)).content == "192.0.2.200\n"

    gd.delete_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid)
    assert gd.list_threat_intel_sets(DetectorId=DETECTOR)["ThreatIntelSetIds"] == []
    msg = error_of(lambda: gd.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid))
    assert "no such resource" in msg
    error_of(lambda: gd.delete_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid))


def test_ip_set_crud_over_http_and_file_url(backend: BackendThread, lists: ListServer, tmp_path: Path) -> None:
    gd = backend.guardduty()
    url = lists.serve("/trusted.txt", "10.0.0.0/8\n192.0.2.10\n")
    iid = gd.create_ip_set(DetectorId=DETECTOR, Name="office", Format="TXT", Location=url, Activate=True)["IpSetId"]
    got = gd.get_ip_set(DetectorId=DETECTOR, IpSetId=iid)
    assert (got["Name"], got["Format"], got["Location"], got["Status"], got["Tags"]) == (
        "office", "TXT", url, "ACTIVE", {},
    )  # fmt: skip
    assert lists.hits["/trusted.txt"] == 1
    assert gd.list_ip_sets(DetectorId=DETECTOR)["IpSetIds"] == [iid]
    # a new location is fetched at once
    path = write(tmp_path, "trusted 2.txt", "172.16.0.0/12\n")
    file_url = "file://" + path.replace(" ", "%20")
    gd.update_ip_set(DetectorId=DETECTOR, IpSetId=iid, Location=file_url)
    got = gd.get_ip_set(DetectorId=DETECTOR, IpSetId=iid)
    assert (got["Location"], got["Status"]) == (file_url, "ACTIVE")
    assert backend.in_session(lambda s: s.get(IntelSet, iid)).content == "172.16.0.0/12\n"
    gd.delete_ip_set(DetectorId=DETECTOR, IpSetId=iid)
    assert gd.list_ip_sets(DetectorId=DETECTOR)["IpSetIds"] == []


def test_stix_and_otx_csv_sets_load(sqlite_backend: BackendThread, lists: ListServer) -> None:
    gd = sqlite_backend.guardduty()
    for name, fmt, text in (("stix", "STIX", STIX), ("otx", "OTX_CSV", OTX)):
        sid = gd.create_threat_intel_set(
            DetectorId=DETECTOR, Name=name, Format=fmt, Location=lists.serve(f"/{name}", text), Activate=True
        )["ThreatIntelSetId"]
        got = gd.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=sid)
        assert (got["Format"], got["Status"]) == (fmt, "ACTIVE"), got
        assert REASON not in got["Tags"]
    # the same STIX text read as TXT is not a list
    sid = gd.create_threat_intel_set(
        DetectorId=DETECTOR, Name="stix as txt", Format="TXT", Location=lists.url + "/stix", Activate=True
    )["ThreatIntelSetId"]
    got = gd.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=sid)
    assert got["Status"] == "ERROR" and got["Tags"][REASON].startswith("no indicator could be read"), got


def test_list_pagination(sqlite_backend: BackendThread, tmp_path: Path) -> None:
    gd = sqlite_backend.guardduty()
    path = write(tmp_path, "l.txt", PLAIN)
    ids = [
        gd.create_threat_intel_set(DetectorId=DETECTOR, Name=f"list-{i}", Format="TXT", Location=path, Activate=True)[
            "ThreatIntelSetId"
        ]
        for i in range(6)
    ]
    first = gd.list_threat_intel_sets(DetectorId=DETECTOR, MaxResults=4)
    assert first["ThreatIntelSetIds"] == ids[:4] and first["NextToken"]
    second = gd.list_threat_intel_sets(DetectorId=DETECTOR, MaxResults=4, NextToken=first["NextToken"])
    assert second["ThreatIntelSetIds"] == ids[4:] and not second.get("NextToken")
    pages = gd.get_paginator("list_threat_intel_sets").paginate(DetectorId=DETECTOR, PaginationConfig={"PageSize": 2})
    assert [i for p in pages for i in p["ThreatIntelSetIds"]] == ids
    assert "nextToken" in error_of(lambda: gd.list_threat_intel_sets(DetectorId=DETECTOR, NextToken="garbage!"))


# -- refusals -----------------------------------------------------------------------------------------------------


def test_refused_requests_say_why(backend: BackendThread, tmp_path: Path) -> None:
    gd = backend.guardduty()
    path = write(tmp_path, "l.txt", PLAIN)

    def create(**kw: object) -> None:
        args: dict[str, object] = {"DetectorId": DETECTOR, "Name": "x", "Format": "TXT", "Location": path}
        args.update(kw)
        args.setdefault("Activate", True)
        gd.create_threat_intel_set(**args)

    msg = error_of(lambda: create(Location="s3://my-bucket/list.txt"))
    assert "no access to S3" in msg and "https://" in msg and "file:///" in msg
    msg = error_of(lambda: create(Format="ALIEN_VAULT"))
    assert "ALIEN_VAULT is not supported" in msg and "TXT" in msg
    assert "one of TXT, STIX, OTX_CSV" in error_of(lambda: create(Format="CSV"))
    assert "absolute path" in error_of(lambda: create(Location="lists/l.txt"))
    assert "host" in error_of(lambda: create(Location="file://otherhost/etc/l.txt"))
    assert "letters, digits, spaces" in error_of(lambda: create(Name="bad/name"))
    msg = error_of(lambda: create(Tags={"category": "nonsense"}))
    assert "tags.category" in msg and "c2" in msg and "mining" in msg
    assert "set by the backend" in error_of(lambda: create(Tags={REASON: "x"}))
    # a trusted list has no category
    msg = error_of(
        lambda: gd.create_ip_set(
            DetectorId=DETECTOR, Name="t", Format="TXT", Location=path, Activate=True, Tags={"category": "c2"}
        )
    )
    assert "trusted" in msg
    # nothing of the above was stored
    assert gd.list_threat_intel_sets(DetectorId=DETECTOR)["ThreatIntelSetIds"] == []
    assert gd.list_ip_sets(DetectorId=DETECTOR)["IpSetIds"] == []

    create(Name="dup")
    assert "already exists" in error_of(lambda: create(Name="dup"))
    # names are unique per kind: an IP set may share a threat intel set's name
    iid = gd.create_ip_set(DetectorId=DETECTOR, Name="dup", Format="TXT", Location=path, Activate=True)["IpSetId"]
    other = gd.create_threat_intel_set(DetectorId=DETECTOR, Name="other", Format="TXT", Location=path, Activate=True)
    msg = error_of(
        lambda: gd.update_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=other["ThreatIntelSetId"], Name="dup")
    )
    assert "already exists" in msg
    assert "no such resource" in error_of(
        lambda: gd.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId="0" * 32)
    )
    assert "no such resource" in error_of(
        lambda: gd.update_ip_set(DetectorId=DETECTOR, IpSetId="not-an-id", Activate=False)
    )
    # GuardDuty's quotas: one IP set, six threat intel sets per detector
    msg = error_of(lambda: gd.create_ip_set(DetectorId=DETECTOR, Name="t2", Format="TXT", Location=path, Activate=True))
    assert "limit is 1 per detector" in msg
    for i in range(4):
        create(Name=f"more-{i}")
    assert "limit is 6 per detector" in error_of(lambda: create(Name="seventh"))
    assert len(gd.list_threat_intel_sets(DetectorId=DETECTOR)["ThreatIntelSetIds"]) == 6
    gd.delete_ip_set(DetectorId=DETECTOR, IpSetId=iid)
    gd.create_ip_set(DetectorId=DETECTOR, Name="t2", Format="TXT", Location=path, Activate=True)


def test_other_accounts_sets_are_invisible(sqlite_backend: BackendThread, tmp_path: Path) -> None:
    mine = sqlite_backend.guardduty()
    tid = mine.create_threat_intel_set(
        DetectorId=DETECTOR, Name="mine", Format="TXT", Location=write(tmp_path, "l.txt", PLAIN), Activate=True
    )["ThreatIntelSetId"]
    theirs = sqlite_backend.guardduty(account="222222222222")
    their_detector = tenancy.detector_id_for("222222222222", REGION)
    assert "not owned" in error_of(lambda: theirs.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid))
    assert "not owned" in error_of(lambda: theirs.delete_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid))
    msg = error_of(lambda: theirs.get_threat_intel_set(DetectorId=their_detector, ThreatIntelSetId=tid))
    assert "no such resource" in msg
    assert theirs.list_threat_intel_sets(DetectorId=their_detector)["ThreatIntelSetIds"] == []
    assert mine.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=tid)["Status"] == "ACTIVE"


# -- lists that cannot be used --------------------------------------------------------------------------------


def test_unreadable_lists_are_in_error_with_the_reason(
    backend: BackendThread, lists: ListServer, tmp_path: Path
) -> None:
    gd = backend.guardduty()
    cases = {
        "refused": (f"http://127.0.0.1:{closed_port()}/list.txt", "GET http://127.0.0.1:"),
        "http 404": (lists.url + "/missing.txt", "answered HTTP 404"),
        "missing file": (str(tmp_path / "nope.txt"), "No such file or directory"),
        "directory": (str(tmp_path), "not a regular file"),
        "empty": (write(tmp_path, "empty.txt", "# nothing yet\n"), "the list is empty"),
        "garbage": (write(tmp_path, "garbage.txt", "hello world\n"), "more than one value on the line"),
        "binary": (lists.serve("/bin", b"\xff\xfe\x00\x01" * 10), "not UTF-8"),
        "metadata": ("http://169.254.169.254/latest/meta-data/", "link-local"),
    }
    for name, (location, expected) in cases.items():
        sid = gd.create_threat_intel_set(
            DetectorId=DETECTOR, Name=name, Format="TXT", Location=location, Activate=True
        )["ThreatIntelSetId"]
        got = gd.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=sid)
        assert got["Status"] == "ERROR", (name, got)
        assert expected in got["Tags"][REASON], (name, got["Tags"])
        assert len(got["Tags"][REASON]) <= 256
        gd.delete_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=sid)
    stix_xml = write(tmp_path, "stix1.xml", '<?xml version="1.0"?><stix:STIX_Package/>')
    iid = gd.create_ip_set(DetectorId=DETECTOR, Name="x", Format="STIX", Location=stix_xml, Activate=True)["IpSetId"]
    got = gd.get_ip_set(DetectorId=DETECTOR, IpSetId=iid)
    assert got["Status"] == "ERROR" and "STIX 1.x XML is not supported" in got["Tags"][REASON]
    # fixing the location brings the set back
    sid = gd.create_threat_intel_set(
        DetectorId=DETECTOR, Name="later", Format="TXT", Location=lists.url + "/later.txt", Activate=True
    )["ThreatIntelSetId"]
    assert gd.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=sid)["Status"] == "ERROR"
    gd.update_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=sid, Location=lists.serve("/ok.txt", PLAIN))
    got = gd.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=sid)
    assert got["Status"] == "ACTIVE" and REASON not in got["Tags"]


def test_skipped_lines_are_reported_on_an_active_set(sqlite_backend: BackendThread, tmp_path: Path) -> None:
    gd = sqlite_backend.guardduty()
    path = write(tmp_path, "mixed.txt", "198.51.100.7\nnot a valid line\n300.1.2.3\n")
    sid = gd.create_threat_intel_set(DetectorId=DETECTOR, Name="mixed", Format="TXT", Location=path, Activate=True)[
        "ThreatIntelSetId"
    ]
    got = gd.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=sid)
    assert got["Status"] == "ACTIVE"
    reason = got["Tags"][REASON]
    assert reason.startswith("1 indicators loaded; skipped: ") and ":2: more than one value" in reason, reason


def test_status_reason_through_the_aws_cli(sqlite_backend: BackendThread, tmp_path: Path) -> None:
    import json

    key = sqlite_backend.access_key()
    home = tmp_path / "home"
    home.mkdir()
    made = aws_cli(
        sqlite_backend, key, REGION, "create-threat-intel-set", "--detector-id", DETECTOR, "--name", "cli",
        "--format", "TXT", "--location", str(tmp_path / "absent.txt"), "--activate", home=home,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    sid = json.loads(made.stdout)["ThreatIntelSetId"]
    got = aws_cli(
        sqlite_backend, key, REGION, "get-threat-intel-set", "--detector-id", DETECTOR, "--threat-intel-set-id", sid,
        home=home,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout)
    assert out["Status"] == "ERROR" and "cannot read" in out["Tags"][REASON]
    s3 = aws_cli(
        sqlite_backend, key, REGION, "create-ip-set", "--detector-id", DETECTOR, "--name", "s3", "--format", "TXT",
        "--location", "s3://bucket/key.txt", "--activate", home=home,
    )  # fmt: skip
    assert s3.returncode != 0 and "(BadRequestException)" in s3.stderr and "no access to S3" in s3.stderr


def _refresh(backend: BackendThread, limits: FetchLimits) -> None:
    db = backend.server.db
    assert db is not None
    backend.call(lambda: intel_sets.refresh_sets(db.sessions, limits, DETECTOR))


def test_refresh_keeps_the_last_good_list_when_the_feed_fails(backend: BackendThread, lists: ListServer) -> None:
    gd = backend.guardduty()
    url = lists.serve("/feed.txt", PLAIN)
    sid = gd.create_threat_intel_set(DetectorId=DETECTOR, Name="feed", Format="TXT", Location=url, Activate=True)[
        "ThreatIntelSetId"
    ]
    limits = FetchLimits()
    lists.serve("/feed.txt", "down for maintenance", status=503)
    _refresh(backend, limits)
    row = backend.in_session(lambda s: s.get(IntelSet, sid))
    assert (row.status, row.content) == ("ACTIVE", PLAIN)
    got = gd.get_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=sid)
    assert got["Status"] == "ACTIVE" and "refresh failed" in got["Tags"][REASON] and "503" in got["Tags"][REASON]
    lists.serve("/feed.txt", "192.0.2.99\n")
    _refresh(backend, limits)
    row = backend.in_session(lambda s: s.get(IntelSet, sid))
    assert (row.status, row.content, row.error) == ("ACTIVE", "192.0.2.99\n", None)
    # a location the user changed to a broken one is an error, not the old list
    gd.update_threat_intel_set(DetectorId=DETECTOR, ThreatIntelSetId=sid, Location=lists.url + "/gone.txt")
    row = backend.in_session(lambda s: s.get(IntelSet, sid))
    assert (row.status, row.content) == ("ERROR", "")


def test_a_running_backend_refreshes_feeds_by_itself(tmp_path: Path, lists: ListServer) -> None:
    b = BackendThread(f"sqlite:///{tmp_path / 'b.db'}", intel_refresh_interval_s=0.3).start()
    try:
        gd = b.guardduty()
        url = lists.serve("/feed.txt", PLAIN)
        sid = gd.create_threat_intel_set(DetectorId=DETECTOR, Name="feed", Format="TXT", Location=url, Activate=True)[
            "ThreatIntelSetId"
        ]
        lists.serve("/feed.txt", "192.0.2.55\n")
        deadline = time.monotonic() + 10
        while (row := b.in_session(lambda s: s.get(IntelSet, sid))).content != "192.0.2.55\n":
            assert time.monotonic() < deadline, row.content
            time.sleep(0.1)
        assert row.status == "ACTIVE"
    finally:
        b.stop()


# -- the fetcher's bounds ---------------------------------------------------------------------------------------


async def test_fetch_bounds_size_time_and_redirects(lists: ListServer) -> None:
    small = FetchLimits(max_bytes=1000, timeout_s=1.0)
    assert await fetch_location(Location("http", lists.serve("/ok", "x" * 1000)), small) == b"x" * 1000
    with pytest.raises(ListFetchError, match="over the 1000 byte limit"):
        await fetch_location(Location("http", lists.serve("/big", "x" * 1001)), small)
    # no Content-Length: counted while reading
    with pytest.raises(ListFetchError, match="over the 1000 byte limit"):
        await fetch_location(Location("http", lists.serve("/stream", "x" * 5000, headers={"no-length": "1"})), small)
    started = time.monotonic()
    with pytest.raises(ListFetchError, match="within 1 s"):
        await fetch_location(Location("http", lists.url + "/slow"), small)
    assert time.monotonic() - started < 2.5
    lists.serve("/moved", "", status=302, headers={"Location": "/ok"})
    assert await fetch_location(Location("http", lists.url + "/moved"), small) == b"x" * 1000
    lists.serve("/to-metadata", "", status=307, headers={"Location": "http://169.254.170.2/v2/credentials"})
    with pytest.raises(ListFetchError, match="link-local"):
        await fetch_location(Location("http", lists.url + "/to-metadata"), small)
    lists.serve("/loop", "", status=302, headers={"Location": "/loop"})
    with pytest.raises(ListFetchError, match="more than 5 redirects"):
        await fetch_location(Location("http", lists.url + "/loop"), small)
    assert lists.hits["/loop"] == 6


async def test_fetch_reads_only_regular_files_under_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "lists"
    root.mkdir()
    (root / "ok.txt").write_text(PLAIN)
    (tmp_path / "secret.txt").write_text("10.0.0.1\n")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    os.mkfifo(root / "fifo")
    limits = FetchLimits(file_roots=(str(root),))
    assert await fetch_location(Location("file", str(root / "ok.txt")), limits) == PLAIN.encode()
    for outside in (tmp_path / "secret.txt", root / "link.txt", root / ".." / "secret.txt"):
        with pytest.raises(ListFetchError, match="outside the directories"):
            await fetch_location(Location("file", str(outside)), limits)
    with pytest.raises(ListFetchError, match="not a regular file"):
        await fetch_location(Location("file", str(root / "fifo")), limits)
    with pytest.raises(ListFetchError, match="not a regular file"):
        await fetch_location(Location("file", "/dev/zero"), FetchLimits())
    with pytest.raises(ListFetchError, match="over the 10 byte limit"):
        await fetch_location(Location("file", str(root / "ok.txt")), FetchLimits(max_bytes=10))

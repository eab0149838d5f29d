"""Backend benchmark: agent ingest throughput and GuardDuty API latency, on SQLite and PostgreSQL.

    .venv/bin/python -m bench.backend [--quick]      (or: python -m bench backend)

A real backend (`runtime-backend serve`, its own process, as in production) answers over HTTP on loopback; the
load comes from this process, as agents and clients send it (tokens, keys and the bulk fill go straight to the
same database):

- ingest: batches of 100 findings (gzip JSON, the shipper's default batch), 1 agent then 50 agents posting at
  once; then updates of the same findings (aggregated counts growing);
- queries, with the store filled to 1,000,000 findings (rows written straight into the table, shaped by the
  ingest code: ingesting a million over HTTP would only measure ingest again): ListFindings with a two-field
  criterion (severity >= 7 in one cluster, newest first, 50 per page), ListFindings by type among unarchived,
  GetFindings of 50 ids, GetFindingsStatistics by severity, through boto3 (SigV4 signing and parsing included:
  what a script or the CLI pays).

PostgreSQL runs as a throwaway cluster (tests/db_fixtures.running_postgres, fsync off as in the tests: the
figures compare the backend's own cost, not a disk).
"""

from __future__ import annotations

import asyncio
import gzip
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import orjson
from botocore.config import Config

from bench import main_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from backend_env import BackendThread, sample_finding
from db_fixtures import running_postgres

from backend import tenancy

ACCOUNT, REGION = "111111111111", "us-east-1"
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)
BATCH = 100


def _findings(n: int) -> list[dict[str, Any]]:
    types = [
        ("Execution:Runtime/ReverseShell", 8.0),
        ("Execution:Runtime/NewBinaryExecuted", 5.0),
        ("Discovery:Runtime/SuspiciousCommand", 2.0),
        ("CryptoCurrency:Runtime/BitcoinTool.B", 8.0),
    ]
    out = []
    for i in range(n):
        t, sev = types[i % len(types)]
        out.append(
            sample_finding(
                type=t, severity=sev, cluster=f"c{i % 8}", task=f"{i % 500:016x}", family=f"svc{i % 20}",
                exe=f"/usr/bin/tool{i % 50}", created=1_760_000_000 + i,
            )
        )  # fmt: skip
    return out


async def _post_all(url: str, batches: list[tuple[str, bytes]], agents: int) -> list[float]:
    latencies: list[float] = []
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for item in batches:
        queue.put_nowait(item)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=agents)) as session:

        async def agent() -> None:
            while not queue.empty():
                token, body = queue.get_nowait()
                headers = {"Authorization": f"Bearer {token}", "Content-Encoding": "gzip",
                           "Content-Type": "application/json"}  # fmt: skip
                t0 = time.perf_counter()
                async with session.post(url + "/agent/v1/findings", data=body, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(agent() for _ in range(agents)))
    return latencies


def _gz_batches(findings: list[dict[str, Any]]) -> list[bytes]:
    return [
        gzip.compress(
            orjson.dumps({"batchId": uuid.uuid4().hex, "agentId": "bench", "findings": findings[i : i + BATCH]})
        )
        for i in range(0, len(findings), BATCH)
    ]


def _ingest(url: str, tokens: dict[str, str], findings: list[dict[str, Any]], agents: int) -> dict[str, Any]:
    """All findings through `agents` concurrent agents (each cluster's batches with that cluster's token)."""
    batches: list[tuple[str, bytes]] = []
    by_cluster: dict[str, list[dict[str, Any]]] = {}
    for f in findings:
        by_cluster.setdefault(f["resource"]["ecsClusterDetails"]["name"], []).append(f)
    for cluster, fs in by_cluster.items():
        batches += [(tokens[cluster], gz) for gz in _gz_batches(fs)]
    t0 = time.perf_counter()
    lat = asyncio.run(_post_all(url, batches, agents))
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "agents": agents,
        "findings_per_s": round(len(findings) / elapsed),
        "batch_p50_ms": round(statistics.median(lat) * 1000, 1),
        "batch_p99_ms": round(lat[max(0, int(len(lat) * 0.99) - 1)] * 1000, 1),
    }


def _timed(fn: Any, n: int) -> dict[str, float]:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return {
        "p50_ms": round(statistics.median(lat) * 1000, 1),
        "p99_ms": round(lat[max(0, int(len(lat) * 0.99) - 1)] * 1000, 1),
    }


def _bulk_fill(b: BackendThread, template: dict[str, Any], have: int, total: int) -> float:
    """Rows straight into the store, shaped by the ingest code, up to `total` findings (API latency at scale)."""
    from backend.findings import FINDINGS, columns_of

    types = [("Execution:Runtime/ReverseShell", 8.0), ("Discovery:Runtime/SuspiciousCommand", 2.0),
             ("Execution:Runtime/NewBinaryExecuted", 5.0), ("CryptoCurrency:Runtime/BitcoinTool.B", 8.0)]  # fmt: skip
    t0 = time.perf_counter()
    base_cols = columns_of(template)
    body = orjson.dumps(template).decode()
    chunk: list[dict[str, Any]] = []

    async def flush(rows: list[dict[str, Any]]) -> None:
        assert b.server.db is not None
        async with b.server.db.sessions() as session, session.begin():
            await session.execute(FINDINGS.insert(), rows)

    for i in range(have, total):
        t, sev = types[i % len(types)]
        ms = (1_760_000_000 + i) * 1000
        chunk.append({
            **base_cols, "detector_id": DETECTOR, "id": f"{i:032x}", "type": t, "severity": sev,
            "cluster_name": f"c{i % 8}", "task_family": f"svc{i % 20}", "created_at": ms, "updated_at": ms,
            "epoch_created": ms, "epoch_count": 1, "archived": False, "received_at": ms, "document": body,
        })  # fmt: skip
        if len(chunk) == 20_000:
            rows, chunk = chunk, []
            b.call(lambda rows=rows: flush(rows))  # type: ignore[misc]
    if chunk:
        b.call(lambda: flush(chunk))
    # what the backend does by itself every 20,000 stored findings (rows written here bypass ingest)
    from backend.app import refresh_statistics

    assert b.server.db is not None
    db = b.server.db
    b.call(lambda: refresh_statistics(db))
    return time.perf_counter() - t0


def _serve(url: str) -> tuple[subprocess.Popen[str], str]:
    """`runtime-backend serve` as its own process, as in production (the load is not sharing its GIL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "--database-url", url, "--log-level", "WARNING", "serve", "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"listening on (\S+)", line)
    if m is None:
        proc.kill()
        raise RuntimeError(f"runtime-backend serve did not start: {line!r}")
    return proc, m.group(1)


def _one(url: str, n: int, total: int) -> dict[str, Any]:
    b = BackendThread(url).start()  # setup only: tokens, keys, the bulk fill
    server, served = _serve(url)
    try:
        findings = _findings(n)
        tokens = {f"c{i}": b.token(cluster=f"c{i}") for i in range(8)}  # a token speaks for one cluster
        res: dict[str, Any] = {"findings_ingested": n, "findings_stored": total}
        third = n // 3
        res["ingest_1_agent"] = _ingest(served, tokens, findings[:third], 1)
        res["ingest_50_agents"] = _ingest(served, tokens, findings[third:], 50)
        for f in findings[third:]:  # the agents' aggregates grew
            f["service"]["count"] = 5
            f["updatedAt"] = f["service"]["eventLastSeen"] = "2025-10-10T00:00:00.000Z"
        res["ingest_updates_50_agents"] = _ingest(served, tokens, findings[third:], 50)
        res["bulk_fill_s"] = round(_bulk_fill(b, findings[0], n, total), 1)
        kid, secret = b.access_key()
        gd = boto3.client(
            "guardduty", endpoint_url=served, region_name=REGION, aws_access_key_id=kid,
            aws_secret_access_key=secret, config=Config(retries={"max_attempts": 1}),
        )  # fmt: skip
        crit = {"Criterion": {"severity": {"Gte": 7}, "resource.ecsClusterDetails.name": {"Eq": ["c3"]}}}
        sort = {"AttributeName": "updatedAt", "OrderBy": "DESC"}
        ids = gd.list_findings(DetectorId=DETECTOR, FindingCriteria=crit, SortCriteria=sort)["FindingIds"]
        assert len(ids) == 50, len(ids)
        reps = 50
        res["list_findings_two_fields"] = _timed(
            lambda: gd.list_findings(DetectorId=DETECTOR, FindingCriteria=crit, SortCriteria=sort), reps
        )
        type_crit = {
            "Criterion": {"type": {"Eq": ["Execution:Runtime/ReverseShell"]}, "service.archived": {"Eq": ["false"]}}
        }
        res["list_findings_type_unarchived"] = _timed(
            lambda: gd.list_findings(DetectorId=DETECTOR, FindingCriteria=type_crit), reps
        )
        res["get_findings_50"] = _timed(lambda: gd.get_findings(DetectorId=DETECTOR, FindingIds=ids), reps)
        res["statistics_by_severity"] = _timed(
            lambda: gd.get_findings_statistics(DetectorId=DETECTOR, FindingStatisticTypes=["COUNT_BY_SEVERITY"]), 5
        )
        return res
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        b.stop()


def run(quick: bool = False) -> dict[str, Any]:
    n, total = (6_000, 100_000) if quick else (60_000, 1_000_000)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["sqlite"] = _one(f"sqlite:///{tmp}/bench.db", n, total)
    with running_postgres() as pg, pg.fresh_database() as url:
        out["postgresql"] = _one(url, n, total)
    return out


def report(r: dict[str, Any]) -> str:
    lines = [
        "| engine | ingest, 1 agent (findings/s, batch p50/p99 ms) | ingest, 50 agents | updates, 50 agents "
        "| ListFindings, 2 fields (p50/p99 ms) | ListFindings, type + unarchived | GetFindings 50 | stats by severity "
        "(p50 ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ing(x: dict[str, Any]) -> str:
        return f"{x['findings_per_s']:,} ({x['batch_p50_ms']} / {x['batch_p99_ms']})"

    def lat(x: dict[str, Any]) -> str:
        return f"{x['p50_ms']} / {x['p99_ms']}"

    for engine, x in r.items():
        lines.append(
            f"| {engine} | {ing(x['ingest_1_agent'])} | {ing(x['ingest_50_agents'])} "
            f"| {ing(x['ingest_updates_50_agents'])} | {lat(x['list_findings_two_fields'])} "
            f"| {lat(x['list_findings_type_unarchived'])} | {lat(x['get_findings_50'])} "
            f"| {x['statistics_by_severity']['p50_ms']} |"
        )
    first = next(iter(r.values()))
    lines.append(
        f"\n{first['findings_ingested']:,} findings ingested over HTTP, then the store filled to "
        f"{first['findings_stored']:,} findings for the query figures."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main_for("backend", "backend: ingest and GuardDuty API", run, report)

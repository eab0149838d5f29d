"""Backend benchmark: agent ingest throughput and GuardDuty API latency, on SQLite and PostgreSQL.

    .venv/bin/python -m bench.backend [--quick]      (or: python -m bench backend)

A real backend (backend.app.Server) runs in its own thread and event loop; the load comes over HTTP from this
process, as agents and clients send it:

- ingest: batches of 100 findings (gzip JSON, the shipper's default batch), 4 agents posting at once, first new
  findings, then updates of the same findings (aggregated counts growing);
- queries, with the store holding that many findings: ListFindings with criteria (severity >= 7 in one cluster,
  newest first, 50 per page), GetFindings of 50 ids, GetFindingsStatistics by type, through boto3 (SigV4 signing
  and parsing included: what a script or the CLI pays).

PostgreSQL runs as a throwaway cluster (tests/db_fixtures.running_postgres, fsync off as in the tests: the
figures compare the backend's own cost, not a disk).
"""

from __future__ import annotations

import asyncio
import gzip
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import main_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from backend_env import BackendThread, sample_finding
from db_fixtures import running_postgres

from backend import tenancy

ACCOUNT, REGION = "111111111111", "us-east-1"
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)
BATCH = 100
AGENTS = 4


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


async def _post_all(url: str, token: str, batches: list[bytes]) -> list[float]:
    latencies: list[float] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    headers = {"Authorization": f"Bearer {token}", "Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:

        async def agent() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                t0 = time.perf_counter()
                async with session.post(url + "/agent/v1/findings", data=body, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(agent() for _ in range(AGENTS)))
    return latencies


def _gz_batches(findings: list[dict[str, Any]]) -> list[bytes]:
    return [
        gzip.compress(
            orjson.dumps({"batchId": uuid.uuid4().hex, "agentId": "bench", "findings": findings[i : i + BATCH]})
        )
        for i in range(0, len(findings), BATCH)
    ]


def _ingest(b: BackendThread, token: str, findings: list[dict[str, Any]]) -> dict[str, float]:
    batches = _gz_batches(findings)
    t0 = time.perf_counter()
    lat = asyncio.run(_post_all(b.url, token, batches))
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "findings_per_s": round(len(findings) / elapsed),
        "batch_p50_ms": round(statistics.median(lat) * 1000, 1),
        "batch_p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 1),
    }


def _timed(fn: Any, n: int) -> dict[str, float]:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return {"p50_ms": round(statistics.median(lat) * 1000, 1), "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 1)}


def _one(url: str, n: int) -> dict[str, Any]:
    b = BackendThread(url).start()
    try:
        token = b.token(cluster="c0")
        findings = _findings(n)
        # a token speaks for one cluster: one per cluster, as in production
        tokens = {f"c{i}": b.token(cluster=f"c{i}") for i in range(8)}
        by_cluster: dict[str, list[dict[str, Any]]] = {}
        for f in findings:
            by_cluster.setdefault(f["resource"]["ecsClusterDetails"]["name"], []).append(f)
        res: dict[str, Any] = {"findings": n}
        t0 = time.perf_counter()
        new = [_ingest(b, tokens[c], fs) for c, fs in by_cluster.items()]
        res["ingest_new"] = {
            "findings_per_s": round(n / (time.perf_counter() - t0)),
            "batch_p50_ms": round(statistics.median(x["batch_p50_ms"] for x in new), 1),
            "batch_p99_ms": max(x["batch_p99_ms"] for x in new),
        }
        for f in findings:  # the agents' aggregates grew
            f["service"]["count"] = 5
            f["updatedAt"] = f["service"]["eventLastSeen"] = "2025-10-10T00:00:00.000Z"
        t0 = time.perf_counter()
        upd = [_ingest(b, tokens[c], fs) for c, fs in by_cluster.items()]
        res["ingest_updates"] = {
            "findings_per_s": round(n / (time.perf_counter() - t0)),
            "batch_p50_ms": round(statistics.median(x["batch_p50_ms"] for x in upd), 1),
            "batch_p99_ms": max(x["batch_p99_ms"] for x in upd),
        }
        del token
        gd = b.guardduty()
        crit = {"Criterion": {"severity": {"Gte": 7}, "resource.ecsClusterDetails.name": {"Eq": ["c3"]}}}
        sort = {"AttributeName": "updatedAt", "OrderBy": "DESC"}
        ids = gd.list_findings(DetectorId=DETECTOR, FindingCriteria=crit, SortCriteria=sort)["FindingIds"]
        assert len(ids) == 50, len(ids)
        reps = 20 if n <= 10_000 else 50
        res["list_findings"] = _timed(
            lambda: gd.list_findings(DetectorId=DETECTOR, FindingCriteria=crit, SortCriteria=sort), reps
        )
        res["get_findings_50"] = _timed(lambda: gd.get_findings(DetectorId=DETECTOR, FindingIds=ids), reps)
        res["statistics_by_type"] = _timed(
            lambda: gd.get_findings_statistics(DetectorId=DETECTOR, GroupBy="FINDING_TYPE"), reps
        )
        return res
    finally:
        b.stop()


def run(quick: bool = False) -> dict[str, Any]:
    n = 5_000 if quick else 50_000
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["sqlite"] = _one(f"sqlite:///{tmp}/bench.db", n)
    with running_postgres() as pg, pg.fresh_database() as url:
        out["postgresql"] = _one(url, n)
    return out


def report(r: dict[str, Any]) -> str:
    lines = [
        "| engine | findings | ingest new (findings/s) | ingest updates (findings/s) | batch p50 / p99 (ms) "
        "| ListFindings p50 / p99 (ms) | GetFindings 50 p50 / p99 (ms) | stats by type p50 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for engine, x in r.items():
        lines.append(
            f"| {engine} | {x['findings']:,} | {x['ingest_new']['findings_per_s']:,} "
            f"| {x['ingest_updates']['findings_per_s']:,} "
            f"| {x['ingest_new']['batch_p50_ms']} / {x['ingest_new']['batch_p99_ms']} "
            f"| {x['list_findings']['p50_ms']} / {x['list_findings']['p99_ms']} "
            f"| {x['get_findings_50']['p50_ms']} / {x['get_findings_50']['p99_ms']} "
            f"| {x['statistics_by_type']['p50_ms']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main_for("backend", "backend: ingest and GuardDuty API", run, report)

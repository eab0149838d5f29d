"""Several backend replicas on one PostgreSQL database, as behind a load balancer."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from backend_env import BackendThread, sample_finding

from backend import tenancy

ACCOUNT, REGION = "111111111111", "us-east-1"
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)


def test_replicas_share_tokens_findings_and_rules(postgres_url: str, tmp_path: Path) -> None:
    a = BackendThread(postgres_url).start()
    b = BackendThread(postgres_url).start()  # migrates the same database at start: a no-op the second time
    try:
        token = a.token()  # created through one replica, honoured by the other
        key = b.access_key()
        gd_a, gd_b = a.guardduty(key=key), b.guardduty(key=key)
        gd_a.create_filter(DetectorId=DETECTOR, Name="mute-id", Action="ARCHIVE",
                           FindingCriteria={"Criterion": {"service.runtimeDetails.process.executablePath": {
                               "Eq": ["/usr/bin/id"]}}})  # fmt: skip
        findings = [sample_finding() for _ in range(40)] + [sample_finding(exe="/usr/bin/id")]
        batch = uuid.uuid4().hex
        results: dict[str, tuple[int, dict[str, object]]] = {}

        # the same batch delivered to both replicas at once (a retry after a timeout, through the LB)
        def deliver(name: str, replica: BackendThread) -> None:
            results[name] = replica.send(token, findings, batch_id=batch)

        threads = [threading.Thread(target=deliver, args=(n, r)) for n, r in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert {s for s, _ in results.values()} == {200}, results
        assert sum(int(str(out["new"])) for _, out in results.values()) == len(findings)
        ids = [i for p in gd_b.get_paginator("list_findings").paginate(DetectorId=DETECTOR) for i in p["FindingIds"]]
        assert sorted(ids) == sorted(f["id"] for f in findings)  # each stored once
        archived = gd_a.list_findings(
            DetectorId=DETECTOR, FindingCriteria={"Criterion": {"service.archived": {"Eq": ["true"]}}}
        )
        assert archived["FindingIds"] == [findings[-1]["id"]]  # fmt: skip
        # two versions of one aggregate racing through both replicas: the newest wins, whatever the order
        base = sample_finding(count=1)
        v3 = sample_finding(fid=base["id"], count=3, updated=1_760_000_300)
        v5 = sample_finding(fid=base["id"], count=5, updated=1_760_000_500)
        assert a.send(token, [base])[0] == 200
        racers = [
            threading.Thread(target=lambda r=r, v=v: r.send(token, [v]))
            for _ in range(5)
            for r, v in ((a, v5), (b, v3), (b, v5), (a, v3))
        ]
        for t in racers:
            t.start()
        for t in racers:
            t.join(60)
        (got,) = gd_b.get_findings(DetectorId=DETECTOR, FindingIds=[base["id"]])["Findings"]
        assert got["Service"]["Count"] == 5
    finally:
        a.stop()
        b.stop()

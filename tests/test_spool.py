"""The spool: real segment files in tmp_path, real processes killed with SIGKILL, a real read-only mount."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from sidecar.spool import Spool, severity_label

REPO = Path(__file__).resolve().parent.parent


def finding(fid: str, severity: float = 5.0, count: int = 1, pad: int = 0) -> bytes:
    return orjson.dumps({"id": fid, "severity": severity, "service": {"count": count}, "pad": "x" * pad})


def put(spool: Spool, fid: str, severity: float = 5.0, count: int = 1, pad: int = 0) -> bool:
    return spool.put(fid, severity, finding(fid, severity, count, pad))


def ids(spool: Spool) -> list[str]:
    return [item.fid for item in spool.peek(100_000, 1 << 40)]


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("seg-*.spool"))


def test_severity_labels_follow_guardduty_bands() -> None:
    assert [severity_label(s) for s in (1.0, 3.9, 4.0, 6.9, 7.0, 8.9, 9.0, 10.0)] == [
        "LOW", "LOW", "MEDIUM", "MEDIUM", "HIGH", "HIGH", "CRITICAL", "CRITICAL"
    ]  # fmt: skip


def test_reopen_after_sigkill_keeps_everything_not_acknowledged(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    # A real process spools, acknowledges some, and is killed without closing anything.
    script = textwrap.dedent(
        f"""
        import os, signal, orjson
        from sidecar.spool import Spool
        s = Spool({str(d)!r})
        for i in range(50):
            s.put(f"f{{i}}", 5.0, orjson.dumps({{"id": f"f{{i}}", "n": i}}))
        s.ack([item.seq for item in s.peek(10, 1 << 30)])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == -9
    spool = Spool(d)
    assert not spool.memory_only
    assert ids(spool) == [f"f{i}" for i in range(10, 50)]
    items = spool.peek(3, 1 << 30)
    assert [orjson.loads(i.data)["n"] for i in items] == [10, 11, 12]
    assert "torn" not in spool.snapshot()
    # new puts continue after the replayed ones, and another reopen still sees both
    put(spool, "late")
    spool.close()
    again = Spool(d)
    assert ids(again) == [f"f{i}" for i in range(10, 50)] + ["late"]
    again.close()


def test_a_torn_tail_is_skipped_and_counted(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    spool = Spool(d)
    for i in range(5):
        put(spool, f"f{i}")
    spool.close()
    last = segments(d)[-1]
    data = last.read_bytes()
    # a crash in the middle of writing the last record: only part of it reached the file
    last.write_bytes(data[:-7])
    spool = Spool(d)
    assert ids(spool) == ["f0", "f1", "f2", "f3"]
    snap = spool.snapshot()
    assert snap["torn"] == 1 and snap["tornBytes"] > 0
    # it goes on working: new records are in a fresh segment, readable after another reopen
    put(spool, "f5")
    spool.close()
    spool = Spool(d)
    assert ids(spool) == ["f0", "f1", "f2", "f3", "f5"]
    spool.close()


def test_a_corrupt_record_ends_its_segment_not_the_spool(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    spool = Spool(d)
    for i in range(4):
        put(spool, f"f{i}", pad=100)
    spool.close()
    seg = segments(d)[-1]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot inside the third record (of four, equal sizes)
    seg.write_bytes(bytes(data))
    spool = Spool(d)
    assert ids(spool) == ["f0", "f1"]
    assert spool.snapshot()["torn"] == 1
    # garbage where a segment should be is counted too
    spool.close()
    (d / "seg-000000000099.spool").write_bytes(b"\x00" * 16)
    spool = Spool(d)
    assert ids(spool) == ["f0", "f1"]
    assert spool.snapshot()["torn"] == 2
    spool.close()


def test_full_spool_drops_lowest_severity_oldest_first_with_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_findings=4)
    put(spool, "low-1", 2.0)
    put(spool, "high-1", 8.0)
    put(spool, "low-2", 2.0)
    put(spool, "med-1", 5.0)
    assert put(spool, "crit-1", 9.5)  # evicts the oldest LOW
    assert ids(spool) == ["high-1", "low-2", "med-1", "crit-1"]
    assert put(spool, "med-2", 5.0)  # evicts the other LOW
    assert put(spool, "med-3", 5.0)  # then the oldest MEDIUM
    assert ids(spool) == ["high-1", "crit-1", "med-2", "med-3"]
    # a newcomer less severe than everything spooled is the one dropped
    assert not put(spool, "low-3", 1.0)
    assert ids(spool) == ["high-1", "crit-1", "med-2", "med-3"]
    snap = spool.snapshot()
    assert snap["droppedBySeverity"] == {"LOW": 3, "MEDIUM": 1, "HIGH": 0, "CRITICAL": 0}
    assert snap["dropped"] == 4 and snap["spooled"] == 4
    spool.close()
    # the drops were recorded: a reopened spool holds the same four
    spool = Spool(tmp_path / "spool", max_findings=4)
    assert ids(spool) == ["high-1", "crit-1", "med-2", "med-3"]
    spool.close()


def test_byte_bound_and_a_smaller_bound_at_reopen(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    spool = Spool(d, max_bytes=10_000)
    for i in range(30):
        put(spool, f"f{i}", 5.0, pad=900)
    assert spool.bytes <= 10_000
    kept = ids(spool)
    assert kept == [f"f{i}" for i in range(30 - len(kept), 30)] and len(kept) >= 9
    spool.close()
    # configured smaller after a restart: the oldest go
    spool = Spool(d, max_bytes=5_000)
    assert spool.bytes <= 5_000 and ids(spool) == kept[-len(ids(spool)) :]
    assert spool.snapshot()["dropped"] == len(kept) - len(ids(spool))
    spool.close()


def test_an_update_supersedes_the_spooled_version(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    spool = Spool(d, max_findings=2)
    put(spool, "agg", 5.0, count=1)
    put(spool, "other", 5.0)
    # full, but an update of a spooled finding replaces it instead of evicting anything
    assert put(spool, "agg", 5.0, count=7)
    assert len(spool) == 2 and spool.snapshot()["dropped"] == 0
    items = {i.fid: orjson.loads(i.data) for i in spool.peek(10, 1 << 30)}
    assert items["agg"]["service"]["count"] == 7
    assert spool.snapshot()["superseded"] == 1
    spool.close()
    spool = Spool(d, max_findings=2)
    items = {i.fid: orjson.loads(i.data) for i in spool.peek(10, 1 << 30)}
    assert items["agg"]["service"]["count"] == 7 and len(spool) == 2
    spool.close()


def test_acknowledging_an_old_version_keeps_the_newer_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    put(spool, "agg", count=1)
    in_flight = spool.peek(10, 1 << 30)
    put(spool, "agg", count=2)  # updated while the batch was being sent
    assert spool.ack([i.seq for i in in_flight]) == 0
    items = spool.peek(10, 1 << 30)
    assert [orjson.loads(i.data)["service"]["count"] for i in items] == [2]
    assert spool.ack([i.seq for i in items]) == 1 and len(spool) == 0
    spool.close()


def test_disk_use_stays_bounded_under_churn_and_with_a_pinned_finding(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    spool = Spool(d, max_bytes=50_000, segment_bytes=8_000)
    put(spool, "pinned", 9.0, pad=500)  # never acknowledged: keeps the oldest segment alive
    peak = 0
    for i in range(600):
        put(spool, f"f{i}", 5.0, pad=400)
        if i % 5 == 4:
            spool.ack([it.seq for it in spool.peek(10, 1 << 30) if it.fid != "pinned"])
        peak = max(peak, sum(p.stat().st_size for p in segments(d)))
    assert peak <= 2 * 50_000 + 8_000 + 2_000
    assert spool.snapshot().get("compactions", 0) > 0
    spool.ack([it.seq for it in spool.peek(1000, 1 << 30) if it.fid != "pinned"])
    assert ids(spool) == ["pinned"]
    spool.close()
    spool = Spool(d, max_bytes=50_000, segment_bytes=8_000)
    assert ids(spool) == ["pinned"]
    assert orjson.loads(spool.peek(1, 1 << 30)[0].data)["pad"] == "x" * 500
    assert sum(p.stat().st_size for p in segments(d)) <= 2 * 50_000 + 8_000
    spool.close()


def test_memory_only_when_a_file_stands_where_the_directory_should_be(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    spool = Spool(blocker / "spool", memory_max_bytes=5_000)
    assert spool.memory_only
    assert "unusable" in str(spool.memory_only_reason) and "Not a directory" in str(spool.memory_only_reason)
    for i in range(20):
        put(spool, f"f{i}", pad=400)
    assert spool.bytes <= 5_000  # the memory bound, not the disk one
    got = spool.peek(100, 1 << 30)
    assert got and got[-1].fid == "f19"
    assert spool.ack([i.seq for i in got]) == len(got) and len(spool) == 0
    assert spool.snapshot()["memoryOnly"] is True
    spool.close()


def test_memory_only_on_a_read_only_mount(tmp_path: Path) -> None:
    """What a task with readonlyRootFilesystem gives: EROFS, which stops root too (unlike chmod)."""
    state = tmp_path / "state"
    state.mkdir()
    script = (
        "import orjson; from sidecar.spool import Spool; "
        f"s = Spool({str(state / 'spool')!r}); s.put('a', 5.0, b'{{}}'); "
        "print(orjson.dumps(s.snapshot()).decode())"
    )
    cmd = f'mount --bind {state} {state} && mount -o remount,bind,ro {state} && {sys.executable} -c "{script}"'
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", cmd],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode != 0:
        pytest.fail(f"cannot stage a read-only mount (needs root and unshare): {r.stderr}")
    snap = orjson.loads(r.stdout.strip().splitlines()[-1])
    assert snap["memoryOnly"] is True and "Read-only file system" in snap["memoryOnlyReason"]
    assert snap["spooled"] == 1
    assert not list(state.iterdir()), "nothing could be written there"


def test_a_second_sidecar_on_the_same_directory_stays_in_memory(tmp_path: Path) -> None:
    first = Spool(tmp_path / "spool")
    second = Spool(tmp_path / "spool")
    assert not first.memory_only and second.memory_only
    assert "another sidecar" in str(second.memory_only_reason)
    put(second, "x")
    first.close()
    second.close()
    # the second one's finding never reached the directory
    assert ids(Spool(tmp_path / "spool")) == []


def test_a_full_disk_turns_the_spool_memory_only_without_raising(tmp_path: Path) -> None:
    """A real ENOSPC: a 64 KiB tmpfs in a private mount namespace."""
    d = tmp_path / "small"
    d.mkdir()
    script = (
        "import orjson; from sidecar.spool import Spool; "
        f"s = Spool({str(d / 'spool')!r}, memory_max_bytes=1 << 20); "
        "ok = [s.put(f'f{i}', 5.0, orjson.dumps({'id': f'f{i}', 'pad': 'x' * 1000})) for i in range(200)]; "
        "got = [i.fid for i in s.peek(1000, 1 << 30)]; "
        "print(orjson.dumps({'ok': all(ok), 'got': got, 'snap': s.snapshot()}).decode())"
    )
    cmd = f'mount -t tmpfs -o size=64k tmpfs {d} && {sys.executable} -c "{script}"'
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", cmd],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode != 0:
        pytest.fail(f"cannot stage a small tmpfs (needs root and unshare): {r.stderr}")
    out = orjson.loads(r.stdout.strip().splitlines()[-1])
    assert out["ok"], "no put failed"
    assert out["got"] == [f"f{i}" for i in range(200)], "the findings on disk and those kept in memory"
    snap = out["snap"]
    assert snap["memoryOnly"] and "No space left on device" in snap["memoryOnlyReason"]
    assert snap["writeErrors"] == 1


def test_peek_respects_count_and_bytes_but_returns_at_least_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    for i in range(10):
        put(spool, f"f{i}", pad=1000)
    assert len(spool.peek(3, 1 << 30)) == 3
    assert len(spool.peek(100, 2500)) == 2
    assert len(spool.peek(100, 10)) == 1
    age = spool.oldest_age()
    assert age is not None and 0 <= age < 5
    spool.close()


def test_a_storm_of_findings_and_updates_stays_within_its_bounds(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    spool = Spool(d, max_findings=500, max_bytes=1 << 20, segment_bytes=64 << 10)
    peak_files = 0
    for i in range(30_000):
        # 1500 distinct findings (375 of them critical), and 50 updated again and again; all severity bands
        fid = f"f{i % 1500}" if i % 2 else f"hot{i % 50}"
        severity = (2.0, 5.0, 8.0, 9.5)[i % 4]
        spool.put(fid, severity, finding(fid, severity, count=i, pad=600))
        if i % 500 == 0:
            peak_files = max(peak_files, sum(p.stat().st_size for p in segments(d)))
    assert len(spool) <= 500 and spool.bytes <= 1 << 20
    assert len(spool._heap) <= 2 * len(spool) + 65, "stale heap items are cleaned up"
    assert peak_files <= 2 * (1 << 20) + (64 << 10) + (8 << 10)
    snap = spool.snapshot()
    assert snap["dropped"] > 0 and snap["superseded"] > 0
    assert snap["droppedBySeverity"]["CRITICAL"] == 0, "the 375 critical ones fit: only less severe ones dropped"
    assert sum(1 for item in spool.peek(1000, 1 << 30) if orjson.loads(item.data)["severity"] == 9.5) == 375
    spool.close()
    assert len(Spool(d, max_findings=500, max_bytes=1 << 20)) == len(spool._by_seq)

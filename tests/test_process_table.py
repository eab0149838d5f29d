"""ProcessTable: pid reuse, lineage, bounds."""

from __future__ import annotations

from collectors.events import ProcessInfo
from collectors.process_table import ProcessTable


def proc(pid: int, start: int, uuid: str, parent: str | None, ppid: int = 1) -> ProcessInfo:
    return ProcessInfo(
        pid=pid, nspid=pid, ppid=ppid, name=f"p{pid}", executable_path=f"/bin/p{pid}", executable_deleted=False,
        executable_sha256=None, command_line=f"p{pid}", cwd="/", uid=0, euid=0, gid=0, egid=0, user="root",
        euser=None, start_ticks=start, start_time=float(start), uuid=uuid, parent_uuid=parent, ld_preload=None,
        ld_library_path=None, container=None, mnt_ns=None,
    )  # fmt: skip


def test_lineage_walks_to_the_root_nearest_first() -> None:
    t = ProcessTable()
    t.add(proc(1, 1, "init", None, 0))
    t.add(proc(10, 2, "sh", "init"))
    t.add(proc(11, 3, "curl", "sh", 10))
    leaf = t.get(11)
    assert leaf is not None
    assert [p.uuid for p in t.lineage(leaf)] == ["sh", "init"]


def test_lineage_survives_the_exit_of_ancestors() -> None:
    t = ProcessTable()
    t.add(proc(1, 1, "init", None, 0))
    t.add(proc(10, 2, "sh", "init"))
    t.add(proc(11, 3, "payload", "sh", 10))
    t.remove(10)  # the shell exits first, as in `sh -c 'payload &'`
    leaf = t.get(11)
    assert leaf is not None
    assert [p.uuid for p in t.lineage(leaf)] == ["sh", "init"]


def test_pid_reuse_is_harmless() -> None:
    t = ProcessTable()
    t.add(proc(1, 1, "init", None, 0))
    t.add(proc(50, 2, "old", "init"))
    old = t.add(proc(50, 900, "new", "init"))  # same pid, later start: another process
    assert old is not None and old.uuid == "old"
    assert t.get(50) is not None and t.get(50).uuid == "new"  # type: ignore[union-attr]
    assert t.by_uuid("old") is not None  # still there for the lineage of its children
    child = proc(51, 3, "child-of-old", "old", 50)
    t.add(child)
    assert [p.uuid for p in t.lineage(child)] == ["old", "init"]


def test_cycle_in_parent_links_terminates() -> None:
    t = ProcessTable()
    a = proc(1, 1, "a", "b")
    b = proc(2, 1, "b", "a")
    t.add(a)
    t.add(b)
    assert len(t.lineage(a)) <= 2


def test_bounded_in_memory() -> None:
    t = ProcessTable(max_live=100, max_exited=50)
    for i in range(10_000):
        t.add(proc(i + 2, i, f"u{i}", None))
        if i % 2:
            t.remove(i + 1)
    assert len(t) <= 100
    assert len(t._exited) <= 50
    assert len(t._by_uuid) <= 150
    assert t.evicted > 0

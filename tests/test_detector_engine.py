"""The detection core: catalog, finding shape, aggregation, isolation of failing detectors.

Detectors are exercised against real behaviour in their own test modules; here the engine is driven with small
test detectors over real processes (this test process and a child), since what is under test is the engine.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from collectors.exe_hash import ExeHasher
from collectors.process import ProcessCollector
from collectors.process_table import ProcessTable
from detectors import catalog, registry
from detectors.base import Detection, Detector, DetectorContext
from detectors.build import FindingScope
from detectors.engine import DetectorEngine
from detectors.finding import Finding
from sidecar.catalog_cli import coverage


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def real_process() -> Iterator[tuple[ProcessTable, ProcessInfo]]:
    """A real child (sleep) captured from /proc by the process collector, with its parent (us) in the table."""
    child = subprocess.Popen(["sleep", "30"])
    table = ProcessTable()
    collector = ProcessCollector(lambda e: None, table=table, hasher=ExeHasher(), hash_executables=False)
    try:
        me = collector.capture(__import__("os").getpid())
        info = collector.capture(child.pid)
        assert me is not None and info is not None
        info.container = ContainerRef(name="app", id="abc123", image="example/app:1")
        yield table, info
    finally:
        child.kill()
        child.wait()
        collector.hasher.shutdown()


class SeesExec(Detector):
    name = "test_exec"
    types = ("Execution:Runtime/SuspiciousTool",)
    kinds = ("process.exec",)

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        assert event.process is not None
        target = (event.data or {}).get("target", "x")
        yield Detection(
            self.types[0],
            event.process,
            context={"toolName": "sleep", "toolCategory": "scanner", "commandLineExample": event.process.command_line},
            key=(target,),
            level="dual_use",
            time=event.time,
        )


class Broken(Detector):
    name = "broken"
    types = ("Execution:Runtime/ReverseShell",)
    kinds = ("process.exec",)

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        raise KeyError("a bug")


def engine(table: ProcessTable, out: list[dict[str, Any]], clock: Clock, **kw: Any) -> DetectorEngine:
    scope = FindingScope(account_id="123456789012", region="eu-west-1", cluster_name="prod", task_arn="arn:t/1")
    return DetectorEngine(
        DetectorContext(table=table, self_pids=frozenset()),
        scope,
        lambda f: out.append(orjson.loads(orjson.dumps(f))),
        clock=clock,
        **kw,
    )


def test_every_catalog_type_has_a_detector_or_says_why_not() -> None:
    cov = coverage()
    for name, ft in catalog.catalog().items():
        assert cov[name] or ft.unseen, f"{name}: no detector emits it and the catalog gives no reason"
        if ft.unseen:
            assert not cov[name], f"{name} is marked unseen but {cov[name]} emit it"
    # and no detector emits a type the catalog does not define
    assert set(cov) == set(catalog.catalog())


def test_catalog_entries_are_consistent() -> None:
    for ft in catalog.catalog().values():
        assert ":Runtime/" in ft.name
        assert ft.mitre and all(t.startswith("T") for t in ft.mitre)
        assert ft.severity in {2.0, 5.0, 8.0}, ft.name
        assert bool(ft.levels) == bool(ft.varies)
        assert catalog.render(ft.title, {}) and catalog.render(ft.description, {})


def test_bad_catalogs_are_refused_with_the_reason() -> None:
    good = (
        '[[type]]\nname="A:Runtime/X"\nseverity=5.0\nmitre=["T1"]\ntactic="t"\nsources=[]\ntitle="t"\ndescription="d"\n'
    )
    assert "A:Runtime/X" in catalog.parse_catalog(good)
    with pytest.raises(catalog.CatalogError, match="outside GuardDuty's bands"):
        catalog.parse_catalog(good.replace("5.0", "9.5"))
    with pytest.raises(catalog.CatalogError, match="listed twice"):
        catalog.parse_catalog(good + good)
    with pytest.raises(catalog.CatalogError, match="missing title"):
        catalog.parse_catalog(good.replace('title="t"\n', ""))
    with pytest.raises(catalog.CatalogError, match="levels given without 'varies'"):
        catalog.parse_catalog(good + "[type.levels]\nhigh = 8.0\n")


def test_a_detector_type_missing_from_the_catalog_is_refused(real_process: tuple[ProcessTable, ProcessInfo]) -> None:
    class Stray(SeesExec):
        name = "stray"
        types = ("Execution:Runtime/NotAType",)

    with pytest.raises(catalog.CatalogError, match="not in the catalog"):
        engine(real_process[0], [], Clock(), detectors=[Stray])


def test_finding_shape(real_process: tuple[ProcessTable, ProcessInfo]) -> None:
    table, info = real_process
    out: list[dict[str, Any]] = []
    clock = Clock()
    eng = engine(table, out, clock, detectors=[SeesExec])
    eng.on_event(RuntimeEvent("process.exec", info, time=clock.now - 1))
    assert len(out) == 1
    f = Finding.model_validate(out[0])
    assert f.type == "Execution:Runtime/SuspiciousTool" and f.severity == 2.0  # the dual_use level
    assert f.accountId == "123456789012" and f.region == "eu-west-1"
    assert f.resource.resourceType == "ECSCluster"
    task = f.resource.ecsClusterDetails.taskDetails  # type: ignore[union-attr]
    assert task is not None and task.containers and task.containers[0].name == "app"
    assert task.containers[0].image == "example/app:1"
    proc = f.service.runtimeDetails.process  # type: ignore[union-attr]
    assert proc is not None and proc.pid == info.pid and proc.executablePath == info.executable_path
    # lineage: the test process is the parent of the sleep
    assert proc.lineage and proc.lineage[0].pid == info.ppid
    assert f.service.count == 1 and f.service.eventFirstSeen == f.service.eventLastSeen
    assert "sleep" in f.title and "app" in f.title
    assert f.arn and f.arn.endswith("/finding/" + f.id) and len(f.id) == 32


def test_repeats_aggregate_and_updates_are_rate_limited(real_process: tuple[ProcessTable, ProcessInfo]) -> None:
    table, info = real_process
    out: list[dict[str, Any]] = []
    clock = Clock()
    eng = engine(table, out, clock, detectors=[SeesExec], update_interval=10.0)
    for _ in range(5):
        clock.now += 1
        eng.on_event(RuntimeEvent("process.exec", info, time=clock.now))
    assert len(out) == 1, "repeats within the interval are held"
    assert eng.flush() == 0
    clock.now += 10
    assert eng.flush() == 1
    assert out[-1]["service"]["count"] == 5 and out[-1]["id"] == out[0]["id"]
    assert out[-1]["service"]["eventLastSeen"] > out[-1]["service"]["eventFirstSeen"]
    # another pattern key is another finding
    eng.on_event(RuntimeEvent("process.exec", info, data={"target": "y"}))
    assert len({f["id"] for f in out}) == 2
    # stop: pending updates go out
    eng.on_event(RuntimeEvent("process.exec", info, data={"target": "y"}))
    assert eng.flush(force=True) == 1 and out[-1]["service"]["count"] == 2


def test_a_new_engine_adopts_the_old_ones_aggregates(real_process: tuple[ProcessTable, ProcessInfo]) -> None:
    """A new policy swaps the engine: the counts of aggregated findings go on, pending updates are not lost."""
    table, info = real_process
    out: list[dict[str, Any]] = []
    clock = Clock()
    old = engine(table, out, clock, detectors=[SeesExec], update_interval=10.0)
    for _ in range(3):
        clock.now += 1
        old.on_event(RuntimeEvent("process.exec", info, time=clock.now))
    new = engine(table, out, clock, detectors=[SeesExec], update_interval=10.0)
    new.adopt(old)
    assert out[-1]["service"]["count"] == 3  # the old engine's pending update went out
    clock.now += 1
    new.on_event(RuntimeEvent("process.exec", info, time=clock.now))
    assert new.flush(force=True) == 1
    assert out[-1]["service"]["count"] == 4 and out[-1]["id"] == out[0]["id"]


def test_ids_are_stable_across_engines(real_process: tuple[ProcessTable, ProcessInfo]) -> None:
    table, info = real_process
    a: list[dict[str, Any]] = []
    b: list[dict[str, Any]] = []
    engine(table, a, Clock(), detectors=[SeesExec]).on_event(RuntimeEvent("process.exec", info))
    engine(table, b, Clock(), detectors=[SeesExec]).on_event(RuntimeEvent("process.exec", info))
    assert a[0]["id"] == b[0]["id"]


def test_aggregator_memory_is_bounded(real_process: tuple[ProcessTable, ProcessInfo]) -> None:
    table, info = real_process
    out: list[dict[str, Any]] = []
    clock = Clock()
    eng = engine(table, out, clock, detectors=[SeesExec], max_findings=50, update_interval=60)
    for i in range(500):
        eng.on_event(RuntimeEvent("process.exec", info, data={"target": i}))
        eng.on_event(RuntimeEvent("process.exec", info, data={"target": i}))  # a pending update each
    assert len(eng.aggregator) == 50
    # forgotten findings had their pending update emitted first: nothing counted is lost
    assert sum(1 for f in out if f["service"]["count"] == 2) == 450
    assert eng.aggregator.stats["forgotten"] == 450


def test_a_failing_detector_does_not_blind_the_others(real_process: tuple[ProcessTable, ProcessInfo]) -> None:
    table, info = real_process
    out: list[dict[str, Any]] = []
    eng = engine(table, out, Clock(), detectors=[Broken, SeesExec])
    for _ in range(3):
        eng.on_event(RuntimeEvent("process.exec", info))
    assert len(out) == 1
    assert eng.snapshot()["errors"] == {"broken": 3}


def test_the_sidecars_own_processes_are_never_findings(real_process: tuple[ProcessTable, ProcessInfo]) -> None:
    table, info = real_process
    out: list[dict[str, Any]] = []
    scope = FindingScope()
    ctx = DetectorContext(table=table, self_pids=frozenset({info.pid}))
    DetectorEngine(ctx, scope, out.append, detectors=[SeesExec]).on_event(RuntimeEvent("process.exec", info))
    assert out == []


def test_all_registered_detectors_load_and_declare_catalog_types() -> None:
    classes = registry.detector_classes()
    assert len({c.name for c in classes}) == len(classes), "detector names are unique"
    for cls in classes:
        assert cls.kinds and cls.types, cls.name
    eng = DetectorEngine(DetectorContext(table=ProcessTable()), FindingScope(), lambda f: None)
    assert len(eng.detectors) == len(classes)


def test_finding_types_command_prints_the_catalog() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "finding-types", "--json"], capture_output=True, text=True, check=True
    ).stdout
    entries = __import__("json").loads(out)
    assert {e["type"] for e in entries} == set(catalog.catalog())
    vmw = next(e for e in entries if e["type"].endswith("ProcessInjection.VirtualMemoryWrite"))
    assert vmw["unseen"] and not vmw["detectors"]
    table = subprocess.run(
        [sys.executable, "-m", "sidecar", "finding-types"], capture_output=True, text=True, check=True
    ).stdout
    assert "Execution:Runtime/ReverseShell" in table and "reverse_shell" in table


def test_the_readme_policy_example_is_valid() -> None:
    import yaml

    from detectors.policy import Policy

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- policy-example:start -->")[1].split("<!-- policy-example:end -->")[0]
    text = block.split("```yaml\n")[1].split("```")[0]
    policy = Policy.parse(yaml.safe_load(text), source="README.md")
    assert [s.name for s in policy.threat_lists] == ["our-c2-feed", None]
    assert "Custom:Runtime/PasteSiteDownload" in policy.custom_types()

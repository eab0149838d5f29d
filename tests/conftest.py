"""Shared fixtures: the emulated ECS task (tests/taskenv.py).

Function-scoped: a task starts in about 0.1 s, and each test gets fresh processes, an empty event stream and its
own metadata endpoint. Tests that need another layout (other containers, a non-root container) use
``with TaskEnv(tmp_path_factory.mktemp("task"), [...]) as task:`` directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from taskenv import TaskEnv


def _task(tmp_path_factory: pytest.TempPathFactory, *, net_raw: bool) -> Iterator[TaskEnv]:
    if os.geteuid() != 0:
        pytest.fail("the emulated ECS task needs root (namespaces, mounts, cgroups): run the tests as root")
    with TaskEnv(tmp_path_factory.mktemp("task"), net_raw=net_raw) as task:
        yield task


TASK_FIXTURES = frozenset({"task_env", "task_env_no_netraw"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that stage real behaviour in the emulated task get one rerun.

    They drive a polling sensor on a shared 2-core machine: a process that lives a millisecond is missed now and
    then (the README's figures say how often), and that is the product's nature, not a bug in the test. One rerun
    keeps such a miss from failing CI, and pytest reports every rerun (an "R" and the rerun summary), so a test
    that needs them often is visible; a real regression fails both runs.
    """
    for item in items:
        if TASK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=1))


@pytest.fixture
def task_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskEnv]:
    """A running Fargate task: containers "app" and "worker", the "runtime-sidecar" container (not started:
    task_env.start_sidecar(...)), Fargate's capabilities for the sidecar (defaults + SYS_PTRACE)."""
    yield from _task(tmp_path_factory, net_raw=True)


@pytest.fixture
def task_env_no_netraw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskEnv]:
    """The same task, with NET_RAW dropped from the sidecar container (no packet capture possible)."""
    yield from _task(tmp_path_factory, net_raw=False)


# the backend's databases on both engines; a running backend; AWS as moto in server mode
pytest_plugins = ["db_fixtures", "backend_env", "moto_server"]

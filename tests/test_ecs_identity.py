"""ECS identity from a real task metadata v4 server, and the process -> container resolver on real processes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from ecs_metadata_server import (
    MetadataServer,
    cgroup_v1_text,
    docker_id_of,
    ec2_task_json,
    ecs_cgroup_path,
    fargate_task_json,
)

from collectors import procfs
from collectors.events import ContainerRef
from sidecar import ecs
from sidecar.ecs import ContainerResolver, MetadataRefresher, TaskIdentity, load_identity, refresh_containers

pytestmark = pytest.mark.timeout(60)

TASK_ID = "5e1f0b8a3c2d4e6f8a9b0c1d2e3f4a5b"
SIDECAR = "runtime-sidecar"
SHA256 = "sha256:" + "ab" * 32


# -- helpers ------------------------------------------------------------------------------------------------------


@pytest.fixture
def fargate() -> Iterator[tuple[MetadataServer, dict[str, Any]]]:
    task = fargate_task_json(task_id=TASK_ID)
    server = MetadataServer(task)
    server.start()
    try:
        yield server, task
    finally:
        server.stop()


def load(server: MetadataServer, task: dict[str, Any], name: str = SIDECAR, **kw: Any) -> TaskIdentity:
    """load_identity from sync tests (the resolver is sync; the loader is not)."""
    return asyncio.run(load_identity(server.container_uri(docker_id_of(task, name)), **kw))


_CHILD = "import sys, time; print('ready', flush=True); time.sleep(60)"
# unshare(CLONE_NEWNS) through libc: Python 3.11 has no os.unshare.
_UNSHARE_CHILD = (
    "import ctypes, sys, time; r = ctypes.CDLL(None, use_errno=True).unshare(0x00020000); "
    "print('ready' if r == 0 else 'failed', flush=True); time.sleep(60)"
)


@contextmanager
def child(env: dict[str, str] | None = None, *, own_mount_ns: bool = False) -> Iterator[subprocess.Popen[str]]:
    """A real sleeping process, after its exec (so /proc shows its own environment)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _UNSHARE_CHILD if own_mount_ns else _CHILD],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            pytest.fail("cannot create a mount namespace here (the tests need root with CAP_SYS_ADMIN)")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def raw_of(proc: subprocess.Popen[str], **changes: Any) -> procfs.RawProcess:
    return dataclasses.replace(procfs.read_process(proc.pid), **changes)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v4/{TASK_ID}-1234567890"


def reachable_strings(root: object) -> Iterator[str | bytes]:
    """Every str/bytes reachable from an object's state: dicts, sequences, __dict__, __slots__, bound methods."""
    seen: set[int] = set()
    stack: list[object] = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, str | bytes | bytearray):
            yield bytes(obj) if isinstance(obj, bytearray) else obj
            continue
        if isinstance(obj, int | float | type(None) | type | types.ModuleType | types.FunctionType):
            continue
        if isinstance(obj, types.MethodType):
            stack.append(obj.__self__)
            continue
        if isinstance(obj, dict | types.MappingProxyType):
            stack.extend(obj.keys())
            stack.extend(obj.values())
            continue
        if isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
            continue
        if hasattr(obj, "__dict__"):
            stack.append(vars(obj))
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if hasattr(obj, slot):
                    stack.append(getattr(obj, slot))


# -- identity -----------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_fargate_identity_from_the_endpoint(fargate: tuple[MetadataServer, dict[str, Any]]) -> None:
    server, task = fargate
    sidecar_id = docker_id_of(task, SIDECAR)
    identity = await load_identity(server.container_uri(sidecar_id))

    assert identity.mode == "ecs" and not identity.is_local
    assert identity.cluster_name == "prod"
    assert identity.cluster_arn == "arn:aws:ecs:us-east-1:123456789012:cluster/prod"
    assert identity.task_arn == f"arn:aws:ecs:us-east-1:123456789012:task/prod/{TASK_ID}"
    assert identity.task_id == TASK_ID
    assert (identity.family, identity.revision) == ("web", "7")
    assert identity.launch_type == "FARGATE"
    assert identity.availability_zone == "us-east-1a"
    assert (identity.region, identity.account_id, identity.partition) == ("us-east-1", "123456789012", "aws")
    by_name = {c.name: c for c in identity.containers}
    assert set(by_name) == {"app", SIDECAR}
    app = by_name["app"]
    assert app.docker_id == docker_id_of(task, "app")
    assert app.docker_id.startswith(f"{TASK_ID}-") and len(app.docker_id.split("-")[1]) == 10
    assert app.image == "public.ecr.aws/docker/library/python:3.11-slim"
    assert app.image_digest == task["Containers"][0]["ImageID"]
    assert app.image_digest is not None and app.image_digest.startswith("sha256:")
    assert identity.self_container is not None
    assert (identity.self_container.name, identity.self_container.docker_id) == (SIDECAR, sidecar_id)
    assert identity.endpoint_ids == {sidecar_id: sidecar_id}
    assert identity.metadata_uri == server.container_uri(sidecar_id)
    assert f"/v4/{sidecar_id}" in server.requests and f"/v4/{sidecar_id}/task" in server.requests
    summary = identity.summary()
    json.dumps(summary)  # heartbeats and logs serialise it
    assert summary["taskArn"] == identity.task_arn and summary["selfContainer"] == SIDECAR


@pytest.mark.asyncio
async def test_ec2_identity_short_cluster_name_and_pinned_digest() -> None:
    task = ec2_task_json(cluster="batch", family="jobs", revision=12, region="eu-west-1", account="111122223333")
    pinned = "111122223333.dkr.ecr.eu-west-1.amazonaws.com/app@" + SHA256
    task["Containers"][0]["Image"] = pinned
    del task["Containers"][0]["ImageID"]
    task["Revision"] = 12  # a number instead of the documented string must still parse
    with MetadataServer(task) as server:
        identity = await load_identity(server.container_uri(docker_id_of(task, SIDECAR)))
    assert identity.mode == "ecs" and identity.launch_type == "EC2"
    assert identity.cluster_name == "batch"
    assert identity.cluster_arn == "arn:aws:ecs:eu-west-1:111122223333:cluster/batch"
    assert (identity.region, identity.account_id, identity.revision) == ("eu-west-1", "111122223333", "12")
    app = identity.container(docker_id_of(task, "app"))
    assert app is not None and len(app.docker_id) == 64
    assert app.image == pinned and app.image_digest == SHA256


def test_parse_task_arn_both_formats() -> None:
    long = ecs.parse_task_arn(f"arn:aws-cn:ecs:cn-north-1:123456789012:task/my_cluster-1/{TASK_ID}")
    assert (long.partition, long.region, long.account_id) == ("aws-cn", "cn-north-1", "123456789012")
    assert (long.cluster, long.task_id) == ("my_cluster-1", TASK_ID)
    old = ecs.parse_task_arn("arn:aws:ecs:us-west-2:123456789012:task/1dc5c17a-422b-4dc4-b493-371970c6c4d6")
    assert old.cluster is None and old.task_id == "1dc5c17a-422b-4dc4-b493-371970c6c4d6"
    bad_arns = ("", "arn:aws:ecs:us-east-1:1234:task/c/t", "arn:aws:s3:::bucket", "arn:aws:ecs:us-east-1:123456789012:")
    for bad in bad_arns:
        with pytest.raises(ValueError, match="not an ECS task ARN"):
            ecs.parse_task_arn(bad)


def test_image_digest_sources() -> None:
    assert ecs.image_digest("repo:1", SHA256) == SHA256
    assert ecs.image_digest("repo@" + SHA256, None) == SHA256
    assert ecs.image_digest("repo:1", "sha256:short") is None
    assert ecs.image_digest(None, None) is None


@pytest.mark.asyncio
async def test_endpoint_down_gives_local_mode_quickly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar.ecs")
    started = time.monotonic()
    identity = await load_identity(closed_port_url(), timeout=1.0, retries=3)
    assert time.monotonic() - started < 2.0
    assert identity.mode == "local" and identity.cluster_name == "local"
    assert identity.local_reason is not None and "unavailable" in identity.local_reason
    assert any(r.name == "sidecar.ecs" and "unreachable after 3 attempts" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_malformed_json_gives_local_mode_and_a_clear_error(
    fargate: tuple[MetadataServer, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    server, task = fargate
    server.set_mode("malformed")
    identity = await load_identity(server.container_uri(docker_id_of(task, SIDECAR)), retries=2)
    assert identity.mode == "local"
    errors = [r for r in caplog.records if r.name == "sidecar.ecs" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "malformed JSON" in message and "/task" in message and "local mode" in message


@pytest.mark.asyncio
async def test_json_of_another_shape_is_named(
    fargate: tuple[MetadataServer, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    server, task = fargate
    server.set_mode("wrong-shape")
    identity = await load_identity(server.container_uri(docker_id_of(task, SIDECAR)), retries=1)
    assert identity.mode == "local"
    [error] = [r for r in caplog.records if r.name == "sidecar.ecs" and r.levelno == logging.ERROR]
    assert "not TaskMetadata" in error.getMessage() and "TaskARN" in error.getMessage()


@pytest.mark.asyncio
async def test_task_arn_without_account_is_refused(
    fargate: tuple[MetadataServer, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    server, task = fargate
    server.set_task({**task, "TaskARN": "arn:aws:ecs:us-east-1:task/prod/x"})
    identity = await load_identity(server.container_uri(docker_id_of(task, SIDECAR)), retries=1)
    assert identity.mode == "local"
    assert any("not an ECS task ARN" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


@pytest.mark.asyncio
async def test_retries_through_transient_500s(fargate: tuple[MetadataServer, dict[str, Any]]) -> None:
    server, task = fargate
    server.set_mode("ok", fail_first=2)
    uri = server.container_uri(docker_id_of(task, SIDECAR))
    identity = await load_identity(uri, retries=3)
    assert identity.mode == "ecs" and identity.task_id == TASK_ID
    assert server.requests.count(f"/v4/{docker_id_of(task, SIDECAR)}/task") == 3


@pytest.mark.asyncio
async def test_persistent_500_stops_after_the_retries(fargate: tuple[MetadataServer, dict[str, Any]]) -> None:
    server, task = fargate
    server.set_mode("error")
    identity = await load_identity(server.container_uri(docker_id_of(task, SIDECAR)), retries=4)
    assert identity.mode == "local"
    assert len(server.requests) == 4


@pytest.mark.asyncio
async def test_unknown_endpoint_id_is_not_retried(fargate: tuple[MetadataServer, dict[str, Any]]) -> None:
    server, _ = fargate
    identity = await load_identity(server.container_uri(f"{TASK_ID}-999"), retries=3)
    assert identity.mode == "local" and identity.local_reason is not None and "404" in identity.local_reason
    assert server.requests == [f"/v4/{TASK_ID}-999/task"]


@pytest.mark.asyncio
async def test_hanging_endpoint_times_out(fargate: tuple[MetadataServer, dict[str, Any]]) -> None:
    server, task = fargate
    server.set_mode("hang")
    started = time.monotonic()
    identity = await load_identity(server.container_uri(docker_id_of(task, SIDECAR)), timeout=0.3, retries=2)
    assert identity.mode == "local"
    assert 0.6 <= time.monotonic() - started < 3.0
    assert len(server.requests) == 2


@pytest.mark.asyncio
async def test_without_the_variable_the_host_is_the_identity() -> None:
    identity = await load_identity(None, account_id="111122223333", region="eu-central-1")
    assert identity.mode == "local" and identity.local_reason is None
    assert identity.cluster_name == "local" and identity.task_id == socket.gethostname()
    assert (identity.account_id, identity.region) == ("111122223333", "eu-central-1")
    assert identity.task_arn == f"arn:aws:ecs:eu-central-1:111122223333:task/local/{socket.gethostname()}"
    assert identity.containers == () and identity.self_container is None
    default = await load_identity("")
    assert (default.account_id, default.region) == ("000000000000", "local")


@pytest.mark.asyncio
async def test_refresh_keeps_identity_when_the_endpoint_goes_down(
    fargate: tuple[MetadataServer, dict[str, Any]],
) -> None:
    server, task = fargate
    identity = await load_identity(server.container_uri(docker_id_of(task, SIDECAR)))
    server.stop()
    assert await refresh_containers(identity, timeout=0.5) is identity


# -- the test server itself ---------------------------------------------------------------------------------------


def test_metadata_server_routes(fargate: tuple[MetadataServer, dict[str, Any]]) -> None:
    server, task = fargate
    app = docker_id_of(task, "app")

    def get(path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(server.base + path, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None

    assert get(f"/v4/{app}") == (200, task["Containers"][0])
    assert get(f"/v4/{app}/task") == (200, task)
    status, stats = get(f"/v4/{app}/stats")
    assert status == 200 and stats["id"] == app
    status, task_stats = get(f"/v4/{app}/task/stats")
    assert status == 200 and set(task_stats) == {c["DockerId"] for c in task["Containers"]}
    assert get("/v4/nope")[0] == 404 and get(f"/v4/{app}/other")[0] == 404 and get("/")[0] == 404
    assert server.requests[0] == f"/v4/{app}"


# -- the resolver -------------------------------------------------------------------------------------------------


def test_fargate_cgroup_v1_names_the_container(fargate: tuple[MetadataServer, dict[str, Any]]) -> None:
    server, task = fargate
    resolver = ContainerResolver(load(server, task))
    with child() as proc:
        for name in ("app", SIDECAR):
            ref = resolver(raw_of(proc, cgroup=cgroup_v1_text(ecs_cgroup_path(task, name))))
            assert ref is not None
            assert (ref.name, ref.id, ref.source) == (name, docker_id_of(task, name), "cgroup")
        app = resolver(raw_of(proc, cgroup=cgroup_v1_text(ecs_cgroup_path(task, "app"))))
    assert app is not None and app.image == "public.ecr.aws/docker/library/python:3.11-slim"
    assert app.image_digest == task["Containers"][0]["ImageID"]
    assert resolver.stats["cgroup"] == 3 and resolver.stats["environ"] == 0


def test_ec2_cgroup_names_the_container_in_any_driver_layout() -> None:
    task = ec2_task_json(task_id=TASK_ID)
    app_id = docker_id_of(task, "app")
    with MetadataServer(task) as server:
        resolver = ContainerResolver(load(server, task))
    texts = [
        cgroup_v1_text(ecs_cgroup_path(task, "app")),
        f"0::/ecs/{TASK_ID}/{app_id}\n",
        f"0::/system.slice/docker-{app_id}.scope\n",
        f"12:memory:/docker/{app_id}\n0::/\n",
    ]
    with child() as proc:
        for text in texts:
            ref = resolver(raw_of(proc, cgroup=text))
            assert ref is not None and (ref.name, ref.id, ref.source) == ("app", app_id, "cgroup"), text


def test_unknown_task_container_gets_its_cgroup_id_and_asks_for_a_refresh(
    fargate: tuple[MetadataServer, dict[str, Any]],
) -> None:
    server, task = fargate
    asked: list[str] = []
    resolver = ContainerResolver(load(server, task), on_unknown=asked.append, report_interval=60)
    late = f"{TASK_ID}-4242424242"
    with child() as proc:
        raw = raw_of(proc, cgroup=cgroup_v1_text(f"/ecs/{TASK_ID}/{late}"), mnt_ns=4026599001)
        first = resolver(raw)
        second = resolver(raw)
    assert first == ContainerRef(name=None, id=late, source="cgroup")
    assert second == first
    assert asked == [late]  # rate-limited: one request per id per report_interval


def test_local_mode_host_processes_and_host_containers() -> None:
    resolver = ContainerResolver(asyncio.run(load_identity(None)))
    cid = "f" * 64
    with child() as proc:
        assert resolver(raw_of(proc)) is None  # the host's own mount namespace: a host process
        for text in (
            f"12:pids:/docker/{cid}\n",
            f"0::/system.slice/docker-{cid}.scope\n",
            f"0::/kubepods.slice/kubepods-burstable.slice/cri-containerd-{cid}.scope\n",
        ):
            ref = resolver(raw_of(proc, cgroup=text))
            assert ref == ContainerRef(name=None, id=cid, source="cgroup"), text


def test_environ_maps_the_process_and_keeps_no_secret(
    fargate: tuple[MetadataServer, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server, task = fargate
    identity = load(server, task)
    resolver = ContainerResolver(identity)
    app_id = docker_id_of(task, "app")
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    env = {
        "DB_PASSWORD": secret,
        "ECS_CONTAINER_METADATA_URI_V4": server.container_uri(app_id),
        "AWS_SECRET_ACCESS_KEY": secret + "-key",
    }
    with child(env) as app_proc, child() as plain:
        # cgroup v2 with a cgroup namespace: the path names nothing
        ref = resolver(raw_of(app_proc, cgroup="0::/\n"))
        assert ref is not None and (ref.name, ref.id, ref.source) == ("app", app_id, "environ")
        # same mount namespace, no variable: the namespace cache answers while the mapped process lives
        cached = resolver(raw_of(plain, cgroup="0::/\n"))
        assert cached is ref and resolver.stats["mntns_cache"] == 1

        strings = list(reachable_strings(resolver))
        assert identity.task_arn in strings  # the walk does reach the resolver's state
        assert not any(secret.encode() in s if isinstance(s, bytes) else secret in s for s in strings)
        assert secret not in repr(resolver) and secret not in repr(vars(resolver))
        assert secret not in caplog.text

        app_proc.kill()
        app_proc.wait()
        # The mapped process is gone, so its namespace may be too: look again. The sidecar's
        # own namespace (this test's) and no variable: the sidecar's container.
        again = resolver(raw_of(plain, cgroup="0::/\n"))
    assert again is not None and (again.name, again.source) == (SIDECAR, "self")


def test_process_without_the_variable_in_its_own_namespace_gets_a_mntns_id(
    fargate: tuple[MetadataServer, dict[str, Any]],
) -> None:
    server, task = fargate
    ecs_resolver = ContainerResolver(load(server, task))
    local_resolver = ContainerResolver(asyncio.run(load_identity(None)))
    with child(own_mount_ns=True) as proc:
        raw = raw_of(proc, cgroup="0::/\n")
        assert raw.mnt_ns is not None and raw.mnt_ns != ecs_resolver.self_mnt_ns
        expected = ContainerRef(name=None, id=f"mntns:{raw.mnt_ns}", source="mntns")
        assert ecs_resolver(raw) == expected
        assert ecs_resolver(raw) == expected and ecs_resolver.stats["mntns_cache"] == 1
        assert local_resolver(raw) == expected
        # systemd sandboxing gives host services a private mount namespace: still the host
        fresh_local = ContainerResolver(local_resolver.identity)
        assert fresh_local(raw_of(proc, cgroup="0::/system.slice/chronyd.service\n")) is None


def test_odd_input_and_vanished_processes_never_raise(fargate: tuple[MetadataServer, dict[str, Any]]) -> None:
    server, task = fargate
    resolvers = [ContainerResolver(load(server, task)), ContainerResolver(asyncio.run(load_identity(None)))]
    with child() as proc:
        raw = procfs.read_process(proc.pid)
    # reaped: the pid is gone (or reused by another process, which the start time gives away)
    odd_cgroups = [None, "", "0::/", "0::/\n", "garbage", ":::", "\x00\ufffd", "1:cpu:/docker/" + "z" * 64, "::" * 500]
    for resolver in resolvers:
        for cgroup in odd_cgroups:
            for mnt_ns in (None, 4026599002, resolver.self_mnt_ns):
                ref = resolver(dataclasses.replace(raw, cgroup=cgroup, mnt_ns=mnt_ns))
                assert ref is None or isinstance(ref, ContainerRef)
        assert resolver.stats["errors"] == 0
    ref = resolvers[0](dataclasses.replace(raw, cgroup="0::/", mnt_ns=4026599003))
    assert ref == ContainerRef(name=None, id="mntns:4026599003", source="mntns")


def test_caches_are_bounded(fargate: tuple[MetadataServer, dict[str, Any]]) -> None:
    server, task = fargate
    resolver = ContainerResolver(load(server, task), cache_size=32, on_unknown=lambda _: None)
    with child() as proc:
        raw = procfs.read_process(proc.pid)
        for i in range(300):
            resolver(dataclasses.replace(raw, cgroup=f"0::/ecs/{TASK_ID}/{TASK_ID}-{i}\n", mnt_ns=4026600000 + i))
    info = resolver.cache_info()
    assert 0 < info["cgroup"] <= 32 and 0 < info["mntns"] <= 32 and 0 < info["reported"] <= 256


@pytest.mark.asyncio
async def test_container_started_later_is_named_after_a_refresh(
    fargate: tuple[MetadataServer, dict[str, Any]],
) -> None:
    server, task = fargate
    identity = await load_identity(server.container_uri(docker_id_of(task, SIDECAR)))
    resolver = ContainerResolver(identity)
    refresher = MetadataRefresher(resolver, min_interval=0)
    bigger = fargate_task_json(
        task_id=TASK_ID, containers=[("app", "python:3.11"), (SIDECAR, "sidecar:0.1"), ("worker", "busybox:1.36")]
    )
    server.set_task(bigger)
    worker_id = docker_id_of(bigger, "worker")
    with child() as proc:
        raw = raw_of(proc, cgroup=cgroup_v1_text(ecs_cgroup_path(bigger, "worker")))
        before = resolver(raw)
        assert before == ContainerRef(name=None, id=worker_id, source="cgroup")
        await refresher.wait()
        after = resolver(raw)
    assert refresher.refreshes == 1
    assert after is not None and (after.name, after.id, after.image) == ("worker", worker_id, "busybox:1.36")
    assert resolver.identity.container(worker_id) is not None
    assert server.requests.count(f"/v4/{docker_id_of(task, SIDECAR)}/task") == 2


@pytest.mark.asyncio
async def test_ec2_endpoint_ids_are_looked_up_on_their_own_endpoint() -> None:
    # The EC2 agent puts its own UUID, not the DockerId, at the end of each container's URI.
    task = ec2_task_json(task_id=TASK_ID)
    app_id = docker_id_of(task, "app")
    endpoint_id = str(uuid.uuid4())
    with MetadataServer(task) as server:
        server.add_endpoint_alias(endpoint_id, app_id)
        identity = await load_identity(server.container_uri(docker_id_of(task, SIDECAR)))
        resolver = ContainerResolver(identity, self_mnt_ns=1)  # this test's namespace plays an app container's
        refresher = MetadataRefresher(resolver, min_interval=0)
        with child({"ECS_CONTAINER_METADATA_URI_V4": f"{server.base}/v4/{endpoint_id}"}) as proc:
            raw = raw_of(proc, cgroup="0::/\n")
            before = resolver(raw)
            assert before is not None and before.name is None and before.source == "mntns"
            await refresher.wait()
            after = resolver(raw)
        assert f"/v4/{endpoint_id}" in server.requests
    assert resolver.identity.endpoint_ids[endpoint_id] == app_id
    assert after is not None and (after.name, after.id, after.source) == ("app", app_id, "environ")


def test_endpoint_id_from_environ_reads_only_that_variable() -> None:
    key = b"ECS_CONTAINER_METADATA_URI_V4="
    uri = b"http://169.254.170.2/v4/" + TASK_ID.encode() + b"-1234567890"
    expected = f"{TASK_ID}-1234567890"
    assert ecs.endpoint_id_from_environ(key + uri + b"\0HOME=/root\0") == expected
    assert ecs.endpoint_id_from_environ(b"A=1\0" + key + uri + b"/\0B=2\0") == expected
    assert ecs.endpoint_id_from_environ(b"A=1\0" + key + uri) == expected
    assert ecs.endpoint_id_from_environ(b"A=1\0B=2\0") is None
    assert ecs.endpoint_id_from_environ(b"") is None
    # another variable ending with the same name is not it
    assert ecs.endpoint_id_from_environ(b"MY_" + key + uri + b"\0") is None
    assert ecs.endpoint_id_from_environ(b"X=1\0" + key + b"http://x/v4/\xff\xfe\0") is None
    assert ecs.endpoint_id_from_environ(key + b"http://x/v4/a b\0") is None

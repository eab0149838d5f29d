"""`runtime-manager inject`: the sidecar added to task definitions, checked by botocore's model, registered in moto."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import botocore.session
import pytest
from botocore.validate import validate_parameters

from backend.manager import cli, inject
from backend.manager.inject import (
    FARGATE_SIZES,
    READ_ONLY_KEYS,
    InjectError,
    SidecarSpec,
    fargate_size,
    has_sidecar,
    is_valid_fargate_size,
)

if TYPE_CHECKING:
    from moto_server import MotoEndpoint

ROOT = Path(__file__).resolve().parent.parent
MANAGER = [str(ROOT / ".venv" / "bin" / "python"), "-m", "backend.manager.cli"]
SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:runtime-sidecar/agent-token-AbCdEf"
SPEC = SidecarSpec(
    image="123456789012.dkr.ecr.us-east-1.amazonaws.com/runtime-sidecar:0.1.0",
    collector_url="https://collector.example.com",
    token_secret_arn=SECRET,
    region="us-east-1",
)
ECS_MODEL = botocore.session.get_session().get_service_model("ecs")


def valid_for_register(doc: dict[str, Any]) -> None:
    """Raises botocore's ParamValidationError if RegisterTaskDefinition would refuse ``doc`` client-side."""
    validate_parameters(doc, ECS_MODEL.operation_model("RegisterTaskDefinition").input_shape)


def fargate_task(task_cpu: str = "512", task_memory: str = "1024", **container: object) -> dict[str, Any]:
    return {
        "family": "web",
        "requiresCompatibilities": ["FARGATE"],
        "networkMode": "awsvpc",
        "cpu": task_cpu,
        "memory": task_memory,
        "executionRoleArn": "arn:aws:iam::123456789012:role/ecsTaskExecutionRole",
        "containerDefinitions": [
            {
                "name": "web",
                "image": "public.ecr.aws/docker/library/nginx:1.27",
                "essential": True,
                "logConfiguration": {
                    "logDriver": "awslogs",
                    "options": {
                        "awslogs-group": "/ecs/web",
                        "awslogs-region": "us-east-1",
                        "awslogs-stream-prefix": "w",
                    },
                },
                **container,
            },
            {"name": "worker", "image": "public.ecr.aws/docker/library/python:3.11", "essential": True},
        ],
    }


def sidecar_of(doc: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any]
    (c,) = [c for c in doc["containerDefinitions"] if c["name"] == "runtime-sidecar"]
    return c


def test_fargate_task_gets_the_sidecar_as_the_issue_specifies() -> None:
    original = fargate_task()
    before = copy.deepcopy(original)
    out = inject.inject(original, SPEC)
    assert original == before, "the input must not be modified"
    valid_for_register(out)
    assert out["pidMode"] == "task"
    side = sidecar_of(out)
    assert side["essential"] is False
    assert side["image"] == SPEC.image
    assert "SYS_PTRACE" in side["linuxParameters"]["capabilities"]["add"]
    assert "NET_RAW" not in side["linuxParameters"]["capabilities"]["drop"], "packet capture needs NET_RAW"
    assert side["secrets"] == [{"name": "RUNTIME_SIDECAR_TOKEN", "valueFrom": SECRET}]
    env = {e["name"]: e["value"] for e in side["environment"]}
    assert env["RUNTIME_SIDECAR_COLLECTOR_URL"] == SPEC.collector_url
    assert "RUNTIME_SIDECAR_TOKEN" not in env
    assert side["readonlyRootFilesystem"] is True
    (mount,) = side["mountPoints"]
    assert mount["containerPath"] == env["RUNTIME_SIDECAR_STATE_DIR"] and mount["readOnly"] is False
    assert {"name": mount["sourceVolume"]} in out["volumes"]
    assert side["logConfiguration"]["logDriver"] == "awslogs"
    # no log group given: the app's (its execution role already writes there), the sidecar's own stream prefix
    assert side["logConfiguration"]["options"]["awslogs-group"] == "/ecs/web"
    assert side["logConfiguration"]["options"]["awslogs-stream-prefix"] == "runtime-sidecar"
    assert (side["cpu"], side["memoryReservation"], side["memory"]) == (128, 128, 256)
    for app in out["containerDefinitions"][1:]:
        assert {"containerName": "runtime-sidecar", "condition": "START"} in app["dependsOn"], app["name"]
    assert "dependsOn" not in side


def test_inject_is_idempotent_and_leaves_other_dependencies() -> None:
    task = fargate_task(dependsOn=[{"containerName": "worker", "condition": "START"}])
    once = inject.inject(task, SPEC)
    twice = inject.inject(once, SPEC)
    assert twice == once
    web = next(c for c in once["containerDefinitions"] if c["name"] == "web")
    assert web["dependsOn"] == [
        {"containerName": "worker", "condition": "START"},
        {"containerName": "runtime-sidecar", "condition": "START"},
    ]
    assert has_sidecar(once) and not has_sidecar(task)


def test_has_sidecar_by_image_repository_under_another_name() -> None:
    task = fargate_task()
    task["containerDefinitions"].append(
        {"name": "agent", "image": "111111111111.dkr.ecr.eu-west-1.amazonaws.com/runtime-sidecar@sha256:" + "a" * 64}
    )
    assert has_sidecar(task)
    assert inject.inject(task, SPEC) == inject.register_input(task)


def test_describe_output_from_moto_is_accepted_registered_and_recognised(moto_endpoint: MotoEndpoint) -> None:
    ecs = moto_endpoint.client("ecs")
    registered = ecs.register_task_definition(**fargate_task())["taskDefinition"]
    described = ecs.describe_task_definition(taskDefinition="web", include=["TAGS"])
    described.pop("ResponseMetadata")
    assert any(k in described["taskDefinition"] for k in READ_ONLY_KEYS), "moto should return read-only keys"
    out = inject.inject(described, SPEC)
    assert not set(READ_ONLY_KEYS) & set(out)
    valid_for_register(out)
    second = ecs.register_task_definition(**out)["taskDefinition"]
    assert second["revision"] == registered["revision"] + 1
    again = ecs.describe_task_definition(taskDefinition="web")
    again.pop("ResponseMetadata")
    assert has_sidecar(again)
    assert inject.inject(again, SPEC) == inject.register_input(again), "a registered injected revision is final"
    assert again["taskDefinition"]["pidMode"] == "task"


@pytest.mark.parametrize(
    ("change", "platform_version", "message"),
    [
        ({"runtimePlatform": {"operatingSystemFamily": "WINDOWS_SERVER_2022_CORE"}}, None, "Windows"),
        ({"pidMode": "host"}, None, "not available on Fargate"),
        ({"requiresCompatibilities": ["EC2"], "pidMode": "host"}, None, "daemon service"),
        ({}, "1.3.0", "needs 1.4.0"),
        ({}, "1.0.0", "needs 1.4.0"),
        ({"cpu": None}, None, "task-level cpu and memory"),
    ],
)
def test_refusals_say_why(change: dict[str, Any], platform_version: str | None, message: str) -> None:
    task = fargate_task()
    task.update(change)
    if task.get("cpu") is None:
        del task["cpu"]
    with pytest.raises(InjectError, match=message):
        inject.inject(task, SPEC, platform_version=platform_version)


@pytest.mark.parametrize("version", ["1.4.0", "LATEST", "1.4.1", None])
def test_platform_versions_that_have_pid_mode_task(version: str | None) -> None:
    assert inject.inject(fargate_task(), SPEC, platform_version=version)["pidMode"] == "task"


def test_no_room_for_an_eleventh_container_or_beyond_fargate_largest_size() -> None:
    task = fargate_task()
    task["containerDefinitions"] += [{"name": f"c{i}", "image": "busybox"} for i in range(8)]
    with pytest.raises(InjectError, match="10 containers"):
        inject.inject(task, SPEC)
    largest = fargate_task("16 vCPU", "120 GB")
    largest["containerDefinitions"][0]["cpu"] = 16384
    with pytest.raises(InjectError, match="no room"):
        inject.inject(largest, SPEC)


@pytest.mark.parametrize(
    ("spec_change", "message"),
    [
        ({"token_secret_arn": "my-token"}, "Secrets Manager secret ARN or an SSM parameter ARN"),
        ({"extra_environment": {"RUNTIME_SIDECAR_TOKEN": "x"}}, "never the environment"),
        ({"collector_url": "collector:443"}, "expected https"),
        ({"memory": 100, "memory_reservation": 128}, "exceeds its limit"),
    ],
)
def test_bad_specs_are_refused(spec_change: dict[str, Any], message: str) -> None:
    spec = SidecarSpec(**{**SPEC.__dict__, **spec_change})
    with pytest.raises(InjectError, match=message):
        inject.inject(fargate_task(), spec)


def test_ssm_parameter_token_is_accepted() -> None:
    spec = SidecarSpec(**{**SPEC.__dict__, "token_secret_arn": "arn:aws:ssm:us-east-1:123456789012:parameter/rs/token"})
    assert sidecar_of(inject.inject(fargate_task(), spec))["secrets"][0]["valueFrom"].endswith("parameter/rs/token")


@pytest.mark.parametrize(
    ("cpu", "memory", "web", "expected"),
    [
        # app containers without their own memory were sized to the whole task: it grows by the sidecar's share
        ("256", "512", {}, ("256", "1024")),
        ("512", "1024", {}, ("512", "2048")),
        ("1 vCPU", "2 GB", {}, ("1024", "3072")),
        # declared sizes that leave room: nothing changes
        ("1024", "4096", {"cpu": 512, "memory": 2048}, None),
        ("512", "1024", {"cpu": 384, "memory": 768, "memoryReservation": 512}, None),
        # declared sizes without room: the cheapest valid size that holds them and the sidecar
        ("512", "1024", {"cpu": 512, "memory": 1024}, ("1024", "2048")),
        ("256", "2048", {"cpu": 256, "memory": 1792}, ("512", "2048")),
    ],
)
def test_fargate_task_size_stays_valid(
    cpu: str, memory: str, web: dict[str, Any], expected: tuple[str, str] | None
) -> None:
    task = fargate_task(cpu, memory, **web)
    if web:
        task["containerDefinitions"].pop()  # only the declared container
    out = inject.inject(task, SPEC)
    got = (out["cpu"], out["memory"])
    assert got == (expected or (str(inject.parse_cpu(cpu)), str(inject.parse_memory(memory))))
    assert is_valid_fargate_size(int(got[0]), int(got[1]))
    valid_for_register(out)


def test_fargate_size_is_the_cheapest_valid_combination_for_every_need() -> None:
    pairs = [(c, m) for c, ms in FARGATE_SIZES.items() for m in ms]
    assert len(pairs) == 3 + 4 + 7 + 13 + 23 + 12 + 12  # the official table's counts per CPU size

    def price(p: tuple[int, int]) -> float:
        return p[0] / 1024 * 9.1 + p[1] / 1024

    cpus = [128, 256, 300, 512, 1024, 1500, 2048, 4096, 8192, 16384, 20000]
    memories = [1, 512, 700, 1024, 2000, 4096, 8192, 16384, 30720, 40000, 61440, 122880, 130000]
    for cpu, mem in itertools.product(cpus, memories):
        holding = [p for p in pairs if p[0] >= cpu and p[1] >= mem]
        got = fargate_size(cpu, mem)
        if not holding:
            assert got is None, (cpu, mem)
            continue
        assert got in holding, (cpu, mem, got)
        assert price(got) == min(price(p) for p in holding), (cpu, mem, got)


def test_ec2_without_task_size_keeps_none_and_warns_about_bridge_networking(caplog: pytest.LogCaptureFixture) -> None:
    task = {
        "family": "legacy",
        "containerDefinitions": [{"name": "app", "image": "busybox", "memory": 256, "essential": True}],
    }
    with caplog.at_level(logging.WARNING, logger="backend.manager.inject"):
        out = inject.inject(task, SPEC)
    assert "cpu" not in out and "memory" not in out
    assert any("network events limited" in r.getMessage() for r in caplog.records)
    valid_for_register(out)


def test_ec2_task_with_task_size_grows_exactly() -> None:
    task = {
        "family": "ec2",
        "requiresCompatibilities": ["EC2"],
        "networkMode": "awsvpc",
        "cpu": "256",
        "memory": "600",
        "containerDefinitions": [{"name": "app", "image": "busybox", "cpu": 256, "memory": 512}],
    }
    out = inject.inject(task, SPEC)
    assert (out["cpu"], out["memory"]) == ("384", "768")


def test_log_group_explicit_or_created_when_the_app_has_none() -> None:
    task = fargate_task()
    for c in task["containerDefinitions"]:
        c.pop("logConfiguration", None)
    opts = sidecar_of(inject.inject(task, SPEC))["logConfiguration"]["options"]
    assert opts["awslogs-group"] == inject.DEFAULT_LOG_GROUP and opts["awslogs-create-group"] == "true"
    spec = SidecarSpec(**{**SPEC.__dict__, "log_group": "/security/agents"})
    opts = sidecar_of(inject.inject(fargate_task(), spec))["logConfiguration"]["options"]
    assert opts["awslogs-group"] == "/security/agents" and "awslogs-create-group" not in opts


def test_extra_environment_is_passed() -> None:
    spec = SidecarSpec(**{**SPEC.__dict__, "extra_environment": {"RUNTIME_SIDECAR_LOG_LEVEL": "DEBUG"}})
    env = {e["name"]: e["value"] for e in sidecar_of(inject.inject(fargate_task(), spec))["environment"]}
    assert env["RUNTIME_SIDECAR_LOG_LEVEL"] == "DEBUG"


# -- the command ----------------------------------------------------------------------------------------------
def run_manager(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MANAGER, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT)


INJECT_FLAGS = ["--image", SPEC.image, "--collector-url", SPEC.collector_url, "--token-secret-arn", SECRET]


def test_cli_inject_file_and_describe_output_on_stdin(tmp_path: Path) -> None:
    path = tmp_path / "td.json"
    path.write_text(json.dumps(fargate_task()))
    done = run_manager("inject", str(path), *INJECT_FLAGS, "--env", "RUNTIME_SIDECAR_LOG_LEVEL=DEBUG")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    valid_for_register(out)
    side = sidecar_of(out)
    # the region comes from the secret's ARN when --region is not given
    assert side["logConfiguration"]["options"]["awslogs-region"] == "us-east-1"
    assert {"name": "RUNTIME_SIDECAR_LOG_LEVEL", "value": "DEBUG"} in side["environment"]
    described = {"taskDefinition": {**out, "revision": 3, "status": "ACTIVE", "taskDefinitionArn": "arn:x"}}
    again = run_manager("--region", "us-east-1", "inject", "-", *INJECT_FLAGS, stdin=json.dumps(described))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == out


def test_cli_inject_refusal_is_one_line_and_exit_1(tmp_path: Path) -> None:
    task = fargate_task()
    task["runtimePlatform"] = {"operatingSystemFamily": "WINDOWS_SERVER_2019_FULL"}
    path = tmp_path / "td.json"
    path.write_text(json.dumps(task))
    done = run_manager("inject", str(path), *INJECT_FLAGS)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "Windows" in done.stderr and "Traceback" not in done.stderr
    bad = run_manager("inject", str(tmp_path / "missing.json"), *INJECT_FLAGS)
    assert bad.returncode == 2 and "missing.json" in bad.stderr


def test_cli_skips_command_modules_not_written_yet_but_not_broken_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = cli.build_parser(["backend.manager.inject", "backend.manager.no_such_module"])
    args = parser.parse_args(["--endpoint-url", "http://127.0.0.1:1", "inject", "x.json", *INJECT_FLAGS])
    assert args.func is not None and args.endpoint_url == "http://127.0.0.1:1"
    (tmp_path / "manager_cmd_broken.py").write_text("import manager_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="manager_dependency_that_is_missing"):
        cli.build_parser(["manager_cmd_broken"])
    sys.modules.pop("manager_cmd_broken", None)

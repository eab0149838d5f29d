"""task-definitions/: each file valid for RegisterTaskDefinition (botocore's model, then moto), the sidecar as the
issue specifies, sized from the README's benchmark figures, and what `runtime-manager inject` would produce."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import botocore.session
import pytest
from botocore.validate import validate_parameters

from backend.manager import inject

if TYPE_CHECKING:
    from moto_server import MotoEndpoint


ROOT = Path(__file__).resolve().parent.parent
TASK_DEFINITIONS = ROOT / "task-definitions"
EXAMPLES = ["fargate-example.json", "ec2-example.json"]
ECS_MODEL = botocore.session.get_session().get_service_model("ecs")
REGISTER = ECS_MODEL.operation_model("RegisterTaskDefinition").input_shape


def load(name: str) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads((TASK_DEFINITIONS / name).read_text()))


def sidecar(doc: dict[str, Any]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in doc["containerDefinitions"] if c["name"] == inject.CONTAINER_NAME]
    assert len(found) == 1, "exactly one runtime-sidecar container"
    return found[0]


def spec_of(doc: dict[str, Any]) -> inject.SidecarSpec:
    """The SidecarSpec that produced this file's sidecar container."""
    side = sidecar(doc)
    env = {e["name"]: e["value"] for e in side["environment"]}
    return inject.SidecarSpec(
        image=side["image"],
        collector_url=env.pop("RUNTIME_SIDECAR_COLLECTOR_URL"),
        token_secret_arn=side["secrets"][0]["valueFrom"],
        region=side["logConfiguration"]["options"]["awslogs-region"],
        cpu=side["cpu"],
        memory=side["memory"],
        memory_reservation=side["memoryReservation"],
        log_group=side["logConfiguration"]["options"]["awslogs-group"],
        extra_environment={k: v for k, v in env.items() if k != "RUNTIME_SIDECAR_STATE_DIR"},
    )


def without_sidecar(doc: dict[str, Any]) -> dict[str, Any]:
    """The app's own task definition, as a user would have it before adding the sidecar."""
    app = copy.deepcopy(doc)
    app["containerDefinitions"] = [c for c in app["containerDefinitions"] if c["name"] != inject.CONTAINER_NAME]
    for c in app["containerDefinitions"]:
        c["dependsOn"] = [d for d in c.get("dependsOn", []) if d["containerName"] != inject.CONTAINER_NAME]
        if not c["dependsOn"]:
            del c["dependsOn"]
    app["volumes"] = [v for v in app.get("volumes", []) if v["name"] != inject.STATE_VOLUME]
    if not app["volumes"]:
        del app["volumes"]
    del app["pidMode"]
    return app


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_registers_and_has_the_sidecar_as_specified(name: str, moto_endpoint: MotoEndpoint) -> None:
    doc = load(name)
    validate_parameters(doc, REGISTER)
    ecs = moto_endpoint.client("ecs")
    registered = ecs.register_task_definition(**doc)["taskDefinition"]
    assert registered["status"] == "ACTIVE"
    described = ecs.describe_task_definition(taskDefinition=registered["taskDefinitionArn"])["taskDefinition"]
    assert inject.has_sidecar(described)
    assert described["pidMode"] == "task"
    side = sidecar(described)
    assert side["essential"] is False
    assert side["linuxParameters"]["capabilities"]["add"] == ["SYS_PTRACE"]
    assert [s["name"] for s in side["secrets"]] == ["RUNTIME_SIDECAR_TOKEN"]
    assert "RUNTIME_SIDECAR_TOKEN" not in {e["name"] for e in side["environment"]}
    assert side["logConfiguration"]["logDriver"] == "awslogs"
    assert side["readonlyRootFilesystem"] is True
    state = {e["name"]: e["value"] for e in side["environment"]}["RUNTIME_SIDECAR_STATE_DIR"]
    assert [m["containerPath"] for m in side["mountPoints"]] == [state]
    apps = [c for c in described["containerDefinitions"] if c is not side]
    assert apps
    for app in apps:
        assert {"containerName": inject.CONTAINER_NAME, "condition": "START"} in app["dependsOn"], app["name"]
    assert described["networkMode"] == "awsvpc", "bridge mode would hide the app's sockets from the sidecar"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_is_what_inject_makes_of_the_app_alone(name: str) -> None:
    doc = load(name)
    assert inject.inject(without_sidecar(doc), spec_of(doc)) == doc


def test_fargate_example_is_a_valid_fargate_size_holding_its_containers() -> None:
    doc = load("fargate-example.json")
    assert doc["requiresCompatibilities"] == ["FARGATE"]
    cpu, memory = int(doc["cpu"]), int(doc["memory"])
    assert inject.is_valid_fargate_size(cpu, memory)
    assert sum(c.get("cpu", 0) for c in doc["containerDefinitions"]) <= cpu
    assert sum(c["memory"] for c in doc["containerDefinitions"]) <= memory


def test_ec2_example_is_for_ec2() -> None:
    doc = load("ec2-example.json")
    assert doc["requiresCompatibilities"] == ["EC2"]
    # without task-level sizes each container must carry its memory
    assert all(c.get("memory") or c.get("memoryReservation") for c in doc["containerDefinitions"])


def test_sidecar_snippet_merges_into_an_app_task_definition(moto_endpoint: MotoEndpoint) -> None:
    snippet = load("sidecar-container.json")
    assert set(snippet) == {"pidMode", "volumes", "containerDefinitions"}
    (container,) = snippet["containerDefinitions"]
    validate_parameters(container, REGISTER.members["containerDefinitions"].member)
    assert container == sidecar(load("fargate-example.json"))
    app = without_sidecar(load("fargate-example.json"))
    merged = {
        **app,
        "pidMode": snippet["pidMode"],
        "volumes": snippet["volumes"],
        "containerDefinitions": [
            container,
            *[
                {**c, "dependsOn": [{"containerName": container["name"], "condition": "START"}]}
                for c in app["containerDefinitions"]
            ],
        ],
    }
    validate_parameters(merged, REGISTER)
    assert inject.has_sidecar(moto_endpoint.client("ecs").register_task_definition(**merged)["taskDefinition"])


def _readme_figure(pattern: str) -> float:
    text = (ROOT / "README.md").read_text()
    m = re.search(pattern, text)
    if m is None:
        pytest.fail(f"README.md no longer has the benchmark figure {pattern!r}: size the sidecar from the new one")
    return float(m.group(1))


@pytest.mark.parametrize("name", [*EXAMPLES, "sidecar-container.json"])
def test_sidecar_is_sized_from_the_readme_benchmarks(name: str) -> None:
    side = sidecar(load(name))
    # "| task, /proc polling | 0.95% of a core | 67.6 MB |": idle CPU and peak RSS of the task setup
    idle_pct = _readme_figure(r"\| task, /proc polling \| ([\d.]+)% of a core \| [\d.]+ MB \|")
    peak_rss_mb = _readme_figure(r"\| task, /proc polling \| [\d.]+% of a core \| ([\d.]+) MB \|")
    user_list_mib = _readme_figure(r"loads in [\d.]+ s and adds ([\d.]+) MiB of RSS")
    # a CPU share ten times the idle use; under load the sidecar's own CPU budget (20% of a core) caps it
    assert side["cpu"] / 1024 * 100 >= 10 * idle_pct
    assert side["cpu"] <= 256, "more than a quarter vCPU would price the sidecar above a small task's app"
    # the reservation holds the measured peak; the hard limit holds it plus a 250,000-entry user list, with room
    assert side["memoryReservation"] >= peak_rss_mb
    assert side["memory"] >= peak_rss_mb + user_list_mib + 64

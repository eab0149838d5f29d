"""Configuration: precedence, and clear errors that name the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from sidecar import config


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("RUNTIME_SIDECAR_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], env=full, capture_output=True, text=True, timeout=30
    )


def test_bad_environment_value_exits_2_naming_the_variable() -> None:
    r = run_cli(["run"], {"RUNTIME_SIDECAR_POLL_IDLE_INTERVAL_MS": "-3"})
    assert r.returncode == 2
    line = orjson.loads(r.stderr.strip().splitlines()[-1])
    assert line["level"] == "ERROR"
    assert "RUNTIME_SIDECAR_POLL_IDLE_INTERVAL_MS" in line["msg"]
    assert "-3" in line["msg"]


def test_every_problem_is_listed_at_once() -> None:
    r = run_cli(["run"], {"RUNTIME_SIDECAR_PROCESS_SOURCE": "ebpf", "RUNTIME_SIDECAR_HASH_EXECUTABLES": "maybe"})
    assert r.returncode == 2
    assert "RUNTIME_SIDECAR_PROCESS_SOURCE" in r.stderr and "RUNTIME_SIDECAR_HASH_EXECUTABLES" in r.stderr


def test_bad_flag_value_names_the_flag() -> None:
    r = run_cli(["run", "--collector-url", "ftp://x"])
    assert r.returncode == 2
    assert "--collector-url" in r.stderr


def test_malformed_config_file_is_reported_with_its_path(tmp_path: Path) -> None:
    f = tmp_path / "sidecar.toml"
    f.write_text("poll_idle_interval_ms = [unclosed\n")
    r = run_cli(["run", "--config", str(f)])
    assert r.returncode == 2
    assert str(f) in r.stderr and "TOML" in r.stderr


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "sidecar.json"
    f.write_text('{"poll_idle_interval": 5}')
    with pytest.raises(config.ConfigError, match="unknown setting"):
        config.load(config_file=str(f))


def test_precedence_flag_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "s.toml"
    f.write_text('events_out = "/from/file"\nfindings_out = "/file/findings"\nlog_level = "DEBUG"\n')
    monkeypatch.setenv("RUNTIME_SIDECAR_FINDINGS_OUT", "/from/env")
    monkeypatch.setenv("RUNTIME_SIDECAR_LOG_LEVEL", "WARNING")
    s = config.load({"log_level": "ERROR"}, config_file=str(f))
    assert s.events_out == "/from/file"
    assert s.findings_out == "/from/env"
    assert s.log_level == "ERROR"


def test_idle_interval_must_not_be_below_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_SIDECAR_POLL_FAST_INTERVAL_MS", "50")
    monkeypatch.setenv("RUNTIME_SIDECAR_POLL_IDLE_INTERVAL_MS", "10")
    with pytest.raises(config.ConfigError, match="POLL_IDLE_INTERVAL_MS"):
        config.load()


def test_metadata_uri_comes_from_ecs_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", "http://169.254.170.2/v4/abc")
    assert config.load().metadata_uri == "http://169.254.170.2/v4/abc"


def test_readme_configuration_table_is_current() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("<!-- config-table:start -->") + len("<!-- config-table:start -->")
    end = readme.index("<!-- config-table:end -->")
    assert readme[start:end].strip() == config.markdown_table(), "regenerate with: python -m sidecar.config"


def test_a_bad_policy_stops_the_sidecar_with_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text(
        "rules:\n"
        "  - id: r1\n    description: d\n    type: Custom:Runtime/X\n    events: [process.exec]\n"
        "    condition: {field: proc.nam, equals: x}\n"
        "exceptions:\n  - {container: app}\n"
    )
    r = run_cli(["run", "--policy-file", str(bad)])
    assert r.returncode == 2
    msg = orjson.loads(r.stderr.strip().splitlines()[-1])["msg"]
    assert "RUNTIME_SIDECAR_POLICY_FILE" in msg and str(bad) in msg
    assert "rules[0]" in msg and "proc.nam" in msg  # the unknown field, where it is
    assert "severity" in msg  # a custom type needs one
    assert "exceptions[0]" in msg and "reason" in msg
    # and a missing file is an error too, not an empty policy
    r = run_cli(["run"], {"RUNTIME_SIDECAR_POLICY_FILE": str(tmp_path / "nope.yaml")})
    assert r.returncode == 2 and "nope.yaml" in r.stderr

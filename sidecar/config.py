"""Configuration: RUNTIME_SIDECAR_* environment variables, an optional file, CLI flags.

Precedence: command-line flag > environment variable > config file > default.
ECS configures containers through the environment and ``secrets``, so every
setting has a variable. Bad values stop the sidecar with exit code 2 and a
message naming the variable and what is wrong.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "RUNTIME_SIDECAR_"


class ConfigError(Exception):
    """A configuration problem, worded for the operator."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    findings_out: str | None = Field(None, description="Write findings as JSON lines to this path ('-' for stdout).")
    events_out: str | None = Field(
        None, description="Write every runtime event as JSON lines to this path ('-' for stdout)."
    )
    collector_url: str | None = Field(None, description="Base URL of the backend's collector API.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    process_source: Literal["auto", "proc_connector", "proc_poll"] = Field(
        "auto", description="Process event source; auto picks the best one the probe finds."
    )
    sources: str = Field(
        "auto",
        pattern=r"^(auto|none|((sock_diag|packet|file_watch|kernel_traces)(,(sock_diag|packet|file_watch|kernel_traces))*))$",
        description="Event sources besides processes: auto (all the probe allows), none, or a comma list of "
        "sock_diag, packet, file_watch, kernel_traces.",
    )
    poll_fast_interval_ms: float = Field(2.0, gt=0.1, le=1000, description="Polling interval right after activity.")
    poll_idle_interval_ms: float = Field(50.0, gt=0.1, le=10000, description="Polling interval when nothing happens.")
    poll_sweep_interval_s: float = Field(2.0, gt=0, le=3600, description="Full /proc reconciliation period.")
    poll_inotify_wakeups: bool = Field(True, description="Wake on exec through inotify on binary and library dirs.")
    cpu_budget_pct: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Most of one core the process sources may use (over it, new pids are counted, not read); "
        "default 20 inside a task (polling), 50 for a host daemon (proc connector).",
    )
    nice: int = Field(
        0,
        ge=0,
        le=19,
        description="Niceness. Above 0 the task's work wins a contended CPU, but a CPU-bound attacker "
        "(a miner) then starves the sidecar.",
    )
    hash_executables: bool = Field(True, description="Compute the SHA-256 of executables (cached per file).")
    hash_max_bytes: int = Field(256 << 20, ge=0, description="Do not hash executables larger than this.")
    max_processes: int = Field(65536, ge=64, description="Live processes kept in the process table.")
    max_exited_processes: int = Field(4096, ge=0, description="Exited processes kept for lineage.")
    output_queue_max: int = Field(100_000, ge=100, description="Events buffered for an output before dropping.")
    stats_interval_s: float = Field(60.0, gt=0, description="Period of the counters log line.")
    metadata_uri: str | None = Field(
        None, description="ECS task metadata v4 URI; defaults to ECS_CONTAINER_METADATA_URI_V4 set by ECS."
    )
    policy_file: str | None = Field(
        None,
        description="Detection policy (YAML/JSON/TOML): threat and trusted lists, exceptions, user rules.",
    )
    threat_intel: bool = Field(True, description="Match connections, DNS and hashes against threat lists.")
    finding_update_interval_s: float = Field(
        30.0, ge=0, le=3600, description="Most frequent re-emission of an aggregated finding whose count grew."
    )
    max_findings: int = Field(10_000, ge=10, description="Findings held for aggregation (least recent forgotten).")
    account_id: str = Field("000000000000", pattern=r"^\d{12}$", description="Account id in local mode.")
    region: str = Field("local", description="Region in local mode.")
    token: SecretStr | None = Field(
        None,
        description="Agent token for the collector API (pass it as an ECS secret). Never logged; no command-line "
        "flag, since a process's arguments are readable in /proc.",
    )
    ca_bundle: str | None = Field(
        None, description="PEM file of CA certificates for the collector's TLS (added trust; verification stays on)."
    )
    state_dir: str = Field(
        "/var/lib/runtime-sidecar",
        description="The sidecar's state (spool, remote threat lists), in the task's ephemeral storage.",
    )
    spool_dir: str | None = Field(
        None,
        description="Findings waiting for the collector; default: spool/ in the state directory. Unwritable "
        "(read-only root file system): kept in memory only.",
    )
    spool_max_bytes: int = Field(64 << 20, ge=1 << 20, description="Most bytes of findings the spool keeps.")
    spool_max_findings: int = Field(20_000, ge=10, description="Most findings the spool keeps.")
    spool_memory_max_bytes: int = Field(
        8 << 20, ge=64 << 10, description="Most bytes of findings kept when the spool is memory-only."
    )
    batch_max_findings: int = Field(100, ge=1, le=500, description="Findings per request to the collector.")
    batch_max_age_s: float = Field(
        2.0, gt=0, le=300, description="Longest a finding waits for its batch to fill before it is sent."
    )
    heartbeat_interval_s: float = Field(60.0, ge=1, le=3600, description="Period of heartbeats to the collector.")
    remote_config: bool = Field(True, description="Fetch the detection policy and threat lists from the collector.")
    ship_events: bool = Field(
        True, description="Send runtime events (sampled) to the collector: the timelines of the console's findings."
    )
    events_max_per_s: float = Field(
        200.0, gt=0, le=100_000, description="Most runtime events sent per second (the rest are counted, not sent)."
    )
    config_poll_interval_s: float = Field(
        60.0, ge=1, le=3600, description="Period of remote configuration checks (If-None-Match: cheap)."
    )
    stop_flush_timeout_s: float = Field(
        5.0,
        ge=0,
        le=25,
        description="At SIGTERM, how long to try sending spooled findings (ECS stops the task after 30 s).",
    )

    @field_validator("collector_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v

    @field_validator("ca_bundle")
    @classmethod
    def _readable(cls, v: str | None) -> str | None:
        if v is not None and not os.access(v, os.R_OK):
            raise ValueError("no readable file there")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))


class _FileSource(PydanticBaseSettingsSource):
    """The file named by RUNTIME_SIDECAR_CONFIG (or --config): TOML or JSON, same keys."""

    path: str | None = None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _FileSource.path or os.environ.get(ENV_PREFIX + "CONFIG")
        if not path:
            return {}
        return load_file(path)


def load_file(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode()) if p.suffix != ".json" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table of settings")
    known = set(Settings.model_fields)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return data


def _describe(err: dict[str, Any], env_names: dict[str, str]) -> str:
    loc = str(err["loc"][0]) if err["loc"] else "?"
    name = env_names.get(loc, ENV_PREFIX + loc.upper())
    got = err.get("input")
    return f"{name}: {err['msg']} (got {got!r})"


def load(cli: dict[str, Any] | None = None, config_file: str | None = None) -> Settings:
    """Build the settings or raise ConfigError with every problem listed."""
    _FileSource.path = config_file
    overrides = {k: v for k, v in (cli or {}).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        names = {k: ENV_PREFIX + k.upper() for k in Settings.model_fields}
        for k in overrides:
            names[k] = "--" + k.replace("_", "-")
        problems = "; ".join(_describe(e, names) for e in exc.errors())  # type: ignore[arg-type]
        raise ConfigError(f"invalid configuration: {problems}") from None
    finally:
        _FileSource.path = None
    if settings.metadata_uri is None:
        settings.metadata_uri = os.environ.get("ECS_CONTAINER_METADATA_URI_V4") or None
    if settings.poll_idle_interval_ms < settings.poll_fast_interval_ms:
        raise ConfigError(
            f"invalid configuration: {ENV_PREFIX}POLL_IDLE_INTERVAL_MS ({settings.poll_idle_interval_ms}) "
            f"must be >= {ENV_PREFIX}POLL_FAST_INTERVAL_MS ({settings.poll_fast_interval_ms})"
        )
    return settings


def describe_settings() -> list[tuple[str, str, str]]:
    """(variable, default, description) for the README's configuration table."""
    out = []
    for name, field in Settings.model_fields.items():
        default = field.default
        out.append((ENV_PREFIX + name.upper(), "" if default is None else str(default), field.description or ""))
    return out


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{name}` | {default} | {desc} |" for name, default, desc in describe_settings()]
    return "\n".join(rows)


if __name__ == "__main__":  # `python -m sidecar.config` prints the README's table
    print(markdown_table())

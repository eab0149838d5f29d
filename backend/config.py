"""The backend's settings: RUNTIME_BACKEND_* environment variables or CLI flags (flags win).

Bad values stop the backend with exit code 2 and a message naming the variable.
"""

from __future__ import annotations

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "RUNTIME_BACKEND_"


class ConfigError(Exception):
    """A configuration problem, worded for the operator."""


class BackendSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    database_url: str = Field(
        "sqlite:///runtime-backend.db",
        description="sqlite:///PATH (default, nothing to install) or postgresql://user:pass@host/db (replicas).",
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 behind a load balancer).")
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on (0: any free port).")
    tls_cert: str | None = Field(None, description="PEM certificate chain: serve HTTPS (else plain HTTP).")
    tls_key: str | None = Field(None, description="PEM private key for tls_cert.")
    default_region: str = Field("us-east-1", description="Region of tokens and keys created without one.")
    # agent side
    max_body_bytes: int = Field(4 << 20, ge=1024, description="Largest request body accepted, as sent.")
    max_decompressed_bytes: int = Field(32 << 20, ge=1024, description="Largest gzip body once decompressed.")
    max_batch_findings: int = Field(500, ge=1, description="Most findings in one agent batch.")
    event_retention_hours: float = Field(72.0, gt=0, description="How long runtime events (timelines) are kept.")
    max_events_per_task: int = Field(20_000, ge=100, description="Runtime events kept per task (oldest go first).")
    event_prune_interval_s: float = Field(300.0, gt=0, description="How often old runtime events are pruned.")
    heartbeat_misses: int = Field(
        3, ge=1, description="Heartbeat intervals without news before a task's agent is UNHEALTHY."
    )
    # query side
    max_api_body_bytes: int = Field(1 << 20, ge=1024, description="Largest GuardDuty API request body.")
    signature_max_skew_s: float = Field(900.0, gt=0, description="Clock skew tolerated in SigV4 dates.")
    # threat-intel and IP sets (CreateThreatIntelSet / CreateIPSet locations)
    intel_file_roots: str = Field(
        "",
        description=(
            "Directories (os.pathsep-separated) that file:// and path locations of threat-intel sets may be read"
            " from. Empty (default): only http(s) locations, since whoever holds an access key could otherwise have"
            " the backend read its own files into a list."
        ),
    )
    intel_max_bytes: int = Field(32 << 20, ge=1024, description="Largest threat-intel or IP list fetched.")
    intel_fetch_timeout_s: float = Field(30.0, gt=0, le=600, description="Time allowed to fetch a list.")
    intel_refresh_interval_s: float = Field(
        3600.0, ge=0, description="Re-fetch every active list this often (feeds change); 0: only when updated."
    )
    # -- exports (backend/exports) ----------------------------------------------------------------------------------
    exports_file: str | None = Field(
        None,
        description=(
            "The exporters' configuration (TOML, YAML or JSON; see backend/exports/config.py): EventBridge, Security"
            " Hub, S3, webhooks. Unset: nothing is exported. Check one with 'runtime-backend exports check FILE'."
        ),
    )
    # -- end of exports ----------------------------------------------------------------------------------------------

    @field_validator("database_url")
    @classmethod
    def _db(cls, v: str) -> str:
        if not v.startswith(("sqlite", "postgresql", "postgres://")):
            raise ValueError("must be sqlite:///PATH or postgresql://...")
        return v


def load(overrides: dict[str, object] | None = None) -> BackendSettings:
    """Settings from the environment, with non-None ``overrides`` (CLI flags) on top."""
    try:
        return BackendSettings(**{k: v for k, v in (overrides or {}).items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{ENV_PREFIX}{loc.upper()}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid backend settings:\n" + "\n".join(problems)) from None

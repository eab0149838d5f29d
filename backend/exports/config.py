"""The exporters' configuration file: which targets get findings, and how (TOML, YAML or JSON, by extension).

One list, ``exporters``, each entry one target; ``type`` says which backend it is (the fields each type takes
are the classes below). A mistake is reported with the file, the exporter's position and name, and the field::

    exports.toml: exporters[1] (s3 "lake"): bucket: Field required

Example (TOML)::

    [[exporters]]
    name = "bus"
    type = "eventbridge"
    region = "eu-west-1"

    [[exporters]]
    name = "lake"
    type = "s3"
    region = "eu-west-1"
    bucket = "security-lake-raw"
    format = "ocsf"
    kms_key_id = "arn:aws:kms:eu-west-1:111111111111:key/..."

    [[exporters]]
    name = "soar"
    type = "webhook"
    url = "https://soar.example.com/hooks/runtime"
    secret_env = "RUNTIME_WEBHOOK_SECRET"
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# GuardDuty's FindingPublishingFrequency values, in seconds
FREQUENCIES = {"FIFTEEN_MINUTES": 900, "ONE_HOUR": 3600, "SIX_HOURS": 21600}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")  # ExportPublished.exporter is 64 characters
ACCOUNT_RE = re.compile(r"^\d{12}$")
REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


class ExportsConfigError(ValueError):
    """The exports file cannot be used, worded for the operator (one problem per line)."""


class ExporterConfig(BaseModel):
    """What every exporter takes: which findings, how often updates go out, queue, batching and retries."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Unique; dead letters and the console name the exporter by it.")
    enabled: bool = True
    min_severity: float = Field(0.0, ge=0, le=10, description="Only findings at least this severe.")
    accounts: list[str] | None = Field(None, description="Only these accounts' findings (default: all).")
    publishing_frequency: Literal["DETECTOR", "FIFTEEN_MINUTES", "ONE_HOUR", "SIX_HOURS"] | int = Field(
        "DETECTOR",
        description=(
            "How often an aggregated finding's updates (its count grew) are sent again: GuardDuty's values, a number"
            " of seconds, or DETECTOR (default): the detector's findingPublishingFrequency, as GuardDuty does."
        ),
    )
    archive_updates: bool = Field(
        False, description="Send a finding again when someone archives or unarchives it (Security Hub: default on)."
    )
    queue_size: int = Field(10_000, ge=1, le=1_000_000, description="Findings waiting; beyond: dead letters.")
    batch_size: int = Field(10, ge=1, le=10_000, description="Most findings per delivery.")
    batch_max_wait_s: float = Field(1.0, ge=0, le=3600, description="Longest a finding waits for its batch.")
    max_attempts: int = Field(5, ge=1, le=100, description="Deliveries tried before the dead letter.")
    backoff_base_s: float = Field(1.0, gt=0, le=600, description="First retry within this (full jitter).")
    backoff_max_s: float = Field(60.0, gt=0, le=3600, description="Longest wait between two attempts.")
    timeout_s: float = Field(10.0, gt=0, le=300, description="One delivery's connect and read timeout.")
    catch_up_s: float = Field(
        3600.0,
        ge=0,
        le=30 * 86400,
        description=(
            "At start, findings received this recently that this exporter never sent are sent (they were queued"
            " when the backend stopped, or the exporter is new)."
        ),
    )
    sweep_interval_s: float = Field(5.0, gt=0, le=3600, description="How often held-back updates are checked.")
    max_dead_letters: int = Field(100_000, ge=1, description="Oldest dead letters beyond this are deleted.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("1 to 64 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit")
        return v

    @field_validator("accounts")
    @classmethod
    def _accounts(cls, v: list[str] | None) -> list[str] | None:
        for a in v or ():
            if not ACCOUNT_RE.match(a):
                raise ValueError(f"account ids are 12 digits, got {a!r}")
        return v

    @field_validator("publishing_frequency")
    @classmethod
    def _frequency(cls, v: str | int) -> str | int:
        if isinstance(v, int) and v < 0:
            raise ValueError("a number of seconds must be 0 or more")
        return v

    @model_validator(mode="after")
    def _backoff(self) -> ExporterConfig:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be at least backoff_base_s")
        return self

    def frequency_s(self, detector_frequency: str | None) -> int:
        f = self.publishing_frequency
        if isinstance(f, int):
            return f
        if f == "DETECTOR":
            return FREQUENCIES.get(detector_frequency or "", FREQUENCIES["FIFTEEN_MINUTES"])
        return FREQUENCIES[f]


class AwsExporterConfig(ExporterConfig):
    region: str = Field(description="The region of the target service.")
    endpoint_url: str | None = Field(
        None, description="Another endpoint than AWS's (a VPC endpoint's DNS name, or a test double)."
    )

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        if not REGION_RE.match(v):
            raise ValueError(f"a region looks like us-east-1, got {v!r}")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("an http:// or https:// URL")
        return v


class EventBridgeConfig(AwsExporterConfig):
    type: Literal["eventbridge"]
    event_bus_name: str = Field("default", min_length=1, max_length=1600, description="Name or ARN of the bus.")
    source: str = Field("aws.guardduty", min_length=1, max_length=256)
    detail_type: str = Field("GuardDuty Finding", min_length=1, max_length=128)
    coverage_events: bool = Field(True, description="Also send coverage changes (healthy <-> unhealthy tasks).")
    coverage_interval_s: float = Field(60.0, gt=0, le=3600, description="How often task coverage is checked.")
    healthy_detail_type: str = Field("GuardDuty Runtime Protection Healthy", min_length=1, max_length=128)
    unhealthy_detail_type: str = Field("GuardDuty Runtime Protection Unhealthy", min_length=1, max_length=128)
    batch_size: int = Field(10, ge=1, le=10_000)


class SecurityHubConfig(AwsExporterConfig):
    type: Literal["securityhub"]
    product_account: str | None = Field(
        None,
        description=(
            "The account whose default product imports the findings (the caller's account). Default: each"
            " finding's own account, which is right when every account's backend exports to its own hub."
        ),
    )
    archive_updates: bool = True
    batch_size: int = Field(100, ge=1, le=10_000)
    batch_max_wait_s: float = Field(2.0, ge=0, le=3600)

    @field_validator("product_account")
    @classmethod
    def _account(cls, v: str | None) -> str | None:
        if v is not None and not ACCOUNT_RE.match(v):
            raise ValueError(f"an account id is 12 digits, got {v!r}")
        return v


class S3Config(AwsExporterConfig):
    type: Literal["s3"]
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = Field("findings", max_length=512, description="Key prefix before year=YYYY/...")
    format: Literal["guardduty", "ocsf"] = Field("guardduty", description="One finding per line, in this shape.")
    sse: Literal["aws:kms", "AES256"] | None = Field(None, description="Server-side encryption of each object.")
    kms_key_id: str | None = Field(None, description="KMS key (id, ARN or alias) for aws:kms; implies sse=aws:kms.")
    batch_size: int = Field(500, ge=1, le=100_000, description="Most findings per object.")
    batch_max_wait_s: float = Field(60.0, ge=0, le=3600, description="Oldest finding's age when its object is written.")

    @model_validator(mode="after")
    def _kms(self) -> S3Config:
        if self.kms_key_id is not None:
            if self.sse == "AES256":
                raise ValueError("kms_key_id needs sse 'aws:kms' (or no sse), not 'AES256'")
            self.sse = "aws:kms"
        self.prefix = self.prefix.strip("/")
        return self


class WebhookConfig(ExporterConfig):
    type: Literal["webhook"]
    url: str = Field(description="Where findings are POSTed (https in production).")
    secret: str | None = Field(None, min_length=16, description="HMAC key; prefer secret_env.")
    secret_env: str | None = Field(None, description="Environment variable holding the HMAC key.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers (e.g. an API key).")
    format: Literal["guardduty", "ocsf"] = "guardduty"
    batch_size: int = Field(50, ge=1, le=10_000)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookConfig:
        if (self.secret is None) == (self.secret_env is None):
            raise ValueError("give exactly one of secret or secret_env (the HMAC key receivers verify with)")
        return self

    def signing_key(self) -> bytes:
        if self.secret is not None:
            return self.secret.encode()
        assert self.secret_env is not None
        value = os.environ.get(self.secret_env)
        if not value or len(value) < 16:
            raise ExportsConfigError(
                f"exporter {self.name!r}: environment variable {self.secret_env} must hold the webhook secret"
                " (16 characters or more)"
            )
        return value.encode()


AnyExporterConfig = Annotated[
    EventBridgeConfig | SecurityHubConfig | S3Config | WebhookConfig, Field(discriminator="type")
]
TYPES = ("eventbridge", "securityhub", "s3", "webhook")


class ExportsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exporters: list[AnyExporterConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> ExportsFile:
        seen: set[str] = set()
        for e in self.exporters:
            if e.name in seen:
                raise ValueError(f"two exporters are named {e.name!r}: names must be unique")
            seen.add(e.name)
        return self

    def enabled(self) -> list[AnyExporterConfig]:
        return [e for e in self.exporters if e.enabled]


def _read(path: Path) -> Any:
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return tomllib.loads(text)
    if suffix in (".yaml", ".yml"):
        return yaml.safe_load(text)
    if suffix == ".json":
        return json.loads(text)
    raise ExportsConfigError(f"{path}: use a .toml, .yaml/.yml or .json file")


def _where(data: Any, loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the operator wrote it: exporters[1] (s3 "lake"): bucket."""
    if len(loc) >= 2 and loc[0] == "exporters" and isinstance(loc[1], int):
        entry = data.get("exporters", [])[loc[1]] if isinstance(data, dict) else None
        label = f"exporters[{loc[1]}]"
        if isinstance(entry, dict):
            words = [str(entry["type"])] if isinstance(entry.get("type"), str) else []
            words += [json.dumps(entry["name"])] if isinstance(entry.get("name"), str) else []
            label += f" ({' '.join(words)})" if words else ""
        rest = list(loc[2:])
        # the discriminated union names the branch it tried: the operator knows it as the type they wrote
        if rest and isinstance(entry, dict) and rest[0] == entry.get("type"):
            rest = rest[1:]
        field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in rest).replace(".[", "[")
        return f"{label}: {field}" if field else label
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_exports(data: Any, source: str = "exports") -> ExportsFile:
    if not isinstance(data, dict):
        raise ExportsConfigError(f"{source}: the top level must be a table/mapping with an 'exporters' list")
    try:
        return ExportsFile.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "union_tag_invalid":
                msg = f"type must be one of {', '.join(TYPES)}"
            elif err["type"] == "union_tag_not_found":
                msg = f"type is required (one of {', '.join(TYPES)})"
            lines.append(f"{source}: {_where(data, tuple(err['loc']))}: {msg}")
        raise ExportsConfigError("\n".join(lines)) from None


def load_exports(path: str | Path) -> ExportsFile:
    """Read and validate an exports file (ExportsConfigError with every problem found)."""
    p = Path(path)
    try:
        data = _read(p)
    except OSError as exc:
        raise ExportsConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ExportsConfigError(f"{p}: not valid {p.suffix.lstrip('.').upper()}: {exc}") from None
    cfg = parse_exports(data, str(p))
    for e in cfg.enabled():
        if isinstance(e, WebhookConfig):
            e.signing_key()  # a missing secret stops the backend at start, not at the first delivery
    return cfg

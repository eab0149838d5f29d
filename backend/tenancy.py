"""Who may do what: detectors (one per account and region), agent tokens, API access keys.

An agent token is bound to (account, region, cluster): it may write that cluster's findings and heartbeats and
read that cluster's configuration, nothing else. An access key is bound to an account: it may query that
account's detectors through the GuardDuty API. Tokens are stored as SHA-256 only (they carry 256 random bits,
so a slow hash adds nothing); access key secrets are stored as IAM does, because HMAC verification needs them.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import time
from dataclasses import dataclass

import orjson
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.models import AccessKey, AgentToken, Detector

ACCOUNT_RE = re.compile(r"^\d{12}$")
REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
CLUSTER_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
TOKEN_PREFIX = "rtm_"
# How often a token's last_used_at is written (every request would make ingest write twice).
LAST_USED_RESOLUTION_MS = 60_000


def now_ms() -> int:
    return int(time.time() * 1000)


def detector_id_for(account_id: str, region: str) -> str:
    """The same id the sidecar computes (detectors.build.FindingScope.detector), so findings agree with the API."""
    return hashlib.md5(f"{account_id}/{region}".encode()).hexdigest()


def check_identity(account_id: str, region: str, cluster: str | None = None) -> None:
    if not ACCOUNT_RE.match(account_id):
        raise ValueError(f"account id must be 12 digits, got {account_id!r}")
    if not REGION_RE.match(region):
        raise ValueError(f"region must look like us-east-1, got {region!r}")
    if cluster is not None and not CLUSTER_RE.match(cluster):
        raise ValueError(f"cluster name must be 1-255 letters, digits, '-' or '_', got {cluster!r}")


async def ensure_detector(session: AsyncSession, account_id: str, region: str) -> Detector:
    did = detector_id_for(account_id, region)
    det = await session.get(Detector, did)
    if det is None:
        t = now_ms()
        det = Detector(
            id=did,
            account_id=account_id,
            region=region,
            status="ENABLED",
            finding_publishing_frequency="FIFTEEN_MINUTES",
            tags=orjson.dumps({}).decode(),
            created_at=t,
            updated_at=t,
        )
        session.add(det)
        await session.flush()
    return det


# -- agent tokens ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """What an authenticated agent may speak for."""

    token_id: str
    account_id: str
    region: str
    cluster_name: str

    @property
    def detector_id(self) -> str:
        return detector_id_for(self.account_id, self.region)


def _hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_token(
    session: AsyncSession, account_id: str, region: str, cluster: str, description: str = ""
) -> tuple[str, str]:
    """A new agent token: (token id, secret). The secret is shown once and never stored."""
    check_identity(account_id, region, cluster)
    await ensure_detector(session, account_id, region)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    tid = "tok-" + secrets.token_hex(8)
    session.add(
        AgentToken(
            id=tid,
            secret_sha256=_hash_token(secret),
            account_id=account_id,
            region=region,
            cluster_name=cluster,
            description=description,
            created_at=now_ms(),
        )
    )
    await session.flush()
    return tid, secret


async def authenticate_token(session: AsyncSession, secret: str) -> TokenIdentity | None:
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
        return None
    row = (
        await session.execute(select(AgentToken).where(AgentToken.secret_sha256 == _hash_token(secret)))
    ).scalar_one_or_none()
    # the lookup is by hash: the secret itself never meets a comparison that could leak timing
    if row is None or row.revoked_at is not None:
        return None
    t = now_ms()
    if row.last_used_at is None or t - row.last_used_at > LAST_USED_RESOLUTION_MS:
        await session.execute(update(AgentToken).where(AgentToken.id == row.id).values(last_used_at=t))
    return TokenIdentity(row.id, row.account_id, row.region, row.cluster_name)


async def revoke_token(session: AsyncSession, token_id: str) -> bool:
    res = await session.execute(
        update(AgentToken).where(AgentToken.id == token_id, AgentToken.revoked_at.is_(None)).values(revoked_at=now_ms())
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


async def list_tokens(session: AsyncSession) -> list[AgentToken]:
    return list((await session.execute(select(AgentToken).order_by(AgentToken.created_at))).scalars())


# -- access keys (GuardDuty API) -------------------------------------------------------------------------------

_KEY_ALPHABET = string.ascii_uppercase + string.digits


async def create_access_key(
    session: AsyncSession,
    account_id: str,
    region: str,
    description: str = "",
    *,
    key_id: str | None = None,
    secret: str | None = None,
) -> tuple[str, str]:
    """A new access key for the account (and its detector in ``region``): (access key id, secret access key)."""
    check_identity(account_id, region)
    await ensure_detector(session, account_id, region)
    key_id = key_id or "AKRT" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(16))
    secret = secret or secrets.token_urlsafe(30)[:40]
    existing = await session.get(AccessKey, key_id)
    if existing is not None:
        if existing.secret_access_key != secret or existing.account_id != account_id:
            raise ValueError(f"access key {key_id} exists with another secret or account")
        return key_id, secret
    session.add(
        AccessKey(
            access_key_id=key_id,
            secret_access_key=secret,
            account_id=account_id,
            description=description,
            created_at=now_ms(),
        )
    )
    await session.flush()
    return key_id, secret


async def lookup_access_key(session: AsyncSession, key_id: str) -> tuple[str, str] | None:
    row = await session.get(AccessKey, key_id)
    if row is None or row.revoked_at is not None:
        return None
    return row.secret_access_key, row.account_id


async def revoke_access_key(session: AsyncSession, key_id: str) -> bool:
    res = await session.execute(
        update(AccessKey)
        .where(AccessKey.access_key_id == key_id, AccessKey.revoked_at.is_(None))
        .values(revoked_at=now_ms())
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


async def list_access_keys(session: AsyncSession) -> list[AccessKey]:
    return list((await session.execute(select(AccessKey).order_by(AccessKey.created_at))).scalars())

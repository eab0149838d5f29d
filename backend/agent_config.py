"""What an agent receives from ``GET /agent/v1/config``: its policy and its detector's active lists.

The policy is a ``detectors.policy`` document (named lists, exceptions, user rules) stored per account: cluster
``''`` is the account's default, and a cluster's own policy replaces the default for that cluster (whole, not
merged: what an agent runs is then one document a person wrote and can read). Lists do not live in the policy:
a path in it would name a file on the backend's host, meaningless to an agent. They come from the detector's
threat intel sets and IP sets (``backend.intel_sets``), ACTIVE ones only, and are served with their content; the
sidecar writes each to a file and loads the policy with those paths.

The configuration's etag is the sha256 (hex, first 32) of its canonical JSON without the etag, so equal
configurations have equal etags on every replica. Heartbeats ask for it every minute from every agent: it is
cached by a signature of what goes into it (the policy's text and each list's content digest), which one query
without the lists' content gives.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.intel_sets import CATEGORY_TAG, FORMATS, THREAT, TRUSTED
from backend.models import IntelSet, PolicyRow
from backend.tenancy import ACCOUNT_RE, CLUSTER_RE, TokenIdentity, now_ms
from detectors.policy import Policy, PolicyError

log = logging.getLogger("backend.agent_config")

DEFAULT_CLUSTER = ""
ETAG_CHARS = 32
LIST_KEYS = ("threat_lists", "trusted_lists")
# what the caches may hold: etags are small; bodies carry list contents (up to 32 MiB each)
MAX_CACHED_ETAGS = 4096
MAX_CACHED_BODY_BYTES = 64 << 20


# -- policies ---------------------------------------------------------------------------------------------------


def _check_owner(account_id: str, cluster: str | None) -> str:
    """The policy's cluster key ('' for the account default), after checking both names."""
    if not ACCOUNT_RE.match(account_id):
        raise ValueError(f"account id must be 12 digits, got {account_id!r}")
    if cluster is None or cluster == DEFAULT_CLUSTER:
        return DEFAULT_CLUSTER
    if not CLUSTER_RE.match(cluster):
        raise ValueError(f"cluster name must be 1-255 letters, digits, '-' or '_', got {cluster!r}")
    return cluster


def _source(account_id: str, cluster: str) -> str:
    return f"policy of {account_id}/{cluster or '(default)'}"


def validate_policy(document: Mapping[str, Any], source: str = "<policy>") -> Policy:
    """The parsed policy, or PolicyError (a ValueError) naming every problem, one a line."""
    if not isinstance(document, Mapping):
        raise PolicyError([f"{source}: expected a mapping at the top, got {type(document).__name__}"])
    problems = [
        f"{source}: {key}: lists are not part of a policy the backend serves (a path would name a file on the "
        "backend's host, not on the agents'): create them with CreateThreatIntelSet (threat lists) or CreateIPSet "
        "(trusted lists), and every agent of the detector receives them"
        for key in LIST_KEYS
        if document.get(key)
    ]
    rest = {k: v for k, v in document.items() if k not in LIST_KEYS}
    try:
        policy = Policy.parse(rest, source=source)
    except PolicyError as exc:
        problems.extend(exc.problems)
        policy = None
    if problems or policy is None:
        raise PolicyError(problems)
    return policy


async def set_policy(session: AsyncSession, account_id: str, cluster: str | None, document: dict[str, Any]) -> str:
    """Validate and store the policy of ``account_id`` (``cluster`` None or '' : the account default).

    Returns the policy's digest (sha256 of its canonical JSON). Raises ValueError (PolicyError) with every
    problem of the document, or for a bad account id or cluster name.
    """
    key = _check_owner(account_id, cluster)
    policy = validate_policy(document, _source(account_id, key))
    text = policy.canonical_json().decode()
    row = await session.get(PolicyRow, (account_id, key))
    t = now_ms()
    if row is None:
        session.add(PolicyRow(account_id=account_id, cluster_name=key, document=text, updated_at=t))
    elif row.document != text:
        row.document, row.updated_at = text, t
    await session.flush()
    log.info("policy set", extra={"accountId": account_id, "cluster": key or "(default)", "digest": policy.digest})
    return policy.digest


async def get_policy(session: AsyncSession, account_id: str, cluster: str | None) -> dict[str, Any] | None:
    """The policy stored for exactly that account and cluster ('' or None: the default), or None."""
    key = _check_owner(account_id, cluster)
    row = await session.get(PolicyRow, (account_id, key))
    if row is None:
        return None
    doc: dict[str, Any] = orjson.loads(row.document)
    return doc


async def delete_policy(session: AsyncSession, account_id: str, cluster: str | None) -> bool:
    """Remove that policy (its agents fall back to the default, or to the empty policy); False if none was set."""
    key = _check_owner(account_id, cluster)
    res = await session.execute(
        delete(PolicyRow).where(PolicyRow.account_id == account_id, PolicyRow.cluster_name == key)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


async def list_policies(session: AsyncSession, account_id: str | None = None) -> list[PolicyRow]:
    """The stored policies (of one account, or all), by account then cluster (the default first)."""
    stmt = select(PolicyRow).order_by(PolicyRow.account_id, PolicyRow.cluster_name)
    if account_id is not None:
        stmt = stmt.where(PolicyRow.account_id == account_id)
    return list((await session.execute(stmt)).scalars())


async def effective_policy(session: AsyncSession, account_id: str, cluster: str) -> tuple[str, str]:
    """(the policy's canonical JSON, which one: the cluster's name, '' for the default, or 'empty')."""
    rows = (
        await session.execute(
            select(PolicyRow.cluster_name, PolicyRow.document).where(
                PolicyRow.account_id == account_id,
                or_(PolicyRow.cluster_name == cluster, PolicyRow.cluster_name == DEFAULT_CLUSTER),
            )
        )
    ).all()
    by_cluster = {c: doc for c, doc in rows}
    if cluster and cluster in by_cluster:
        return by_cluster[cluster], cluster
    if DEFAULT_CLUSTER in by_cluster:
        return by_cluster[DEFAULT_CLUSTER], DEFAULT_CLUSTER
    return _EMPTY_POLICY, "empty"


_EMPTY_POLICY = Policy.empty().canonical_json().decode()


# -- the configuration document ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ListHead:
    """What of a served list goes into the signature: everything but the content, which its digest stands for."""

    id: str
    kind: str
    name: str
    format: str
    category: str | None
    content_sha256: str


def _category(kind: str, tags_json: str) -> str | None:
    if kind != THREAT:
        return None
    tags = orjson.loads(tags_json or "{}")
    value = tags.get(CATEGORY_TAG) if isinstance(tags, dict) else None
    return value.lower() if isinstance(value, str) and value else None


def _signature(policy_text: str, heads: list[_ListHead]) -> str:
    parts = [policy_text, [(h.kind, h.name, h.format, h.category, h.content_sha256) for h in heads]]
    return hashlib.sha256(orjson.dumps(parts)).hexdigest()


def _active_sets(detector_id: str, *columns: Any) -> Any:
    return (
        select(*columns)
        .where(IntelSet.detector_id == detector_id, IntelSet.status == "ACTIVE")
        .order_by(IntelSet.created_at, IntelSet.id)
    )


_HEAD_COLUMNS = (IntelSet.id, IntelSet.kind, IntelSet.name, IntelSet.format, IntelSet.tags, IntelSet.content_sha256)


def _head(row: Any) -> _ListHead:
    return _ListHead(row.id, row.kind, row.name, row.format, _category(row.kind, row.tags), row.content_sha256)


class _ConfigCache:
    """signature -> etag, and signature -> body for the most recent bodies (bounded by their total size)."""

    def __init__(self) -> None:
        self.etags: OrderedDict[str, str] = OrderedDict()
        self.bodies: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self.body_bytes = 0

    def etag(self, signature: str) -> str | None:
        etag = self.etags.get(signature)
        if etag is not None:
            self.etags.move_to_end(signature)
        return etag

    def body(self, signature: str) -> tuple[str, bytes] | None:
        found = self.bodies.get(signature)
        if found is not None:
            self.bodies.move_to_end(signature)
        return found

    def put(self, signature: str, etag: str, body: bytes) -> None:
        self.etags[signature] = etag
        self.etags.move_to_end(signature)
        while len(self.etags) > MAX_CACHED_ETAGS:
            self.etags.popitem(last=False)
        if len(body) > MAX_CACHED_BODY_BYTES or signature in self.bodies:
            return
        self.bodies[signature] = (etag, body)
        self.body_bytes += len(body)
        while self.body_bytes > MAX_CACHED_BODY_BYTES:
            _, (_, old) = self.bodies.popitem(last=False)
            self.body_bytes -= len(old)

    def clear(self) -> None:
        self.etags.clear()
        self.bodies.clear()
        self.body_bytes = 0


_cache = _ConfigCache()


def build_config(policy_text: str, lists: list[tuple[_ListHead, str]]) -> tuple[str, bytes]:
    """(etag, body) of the configuration document for a policy and the served lists with their content."""

    def entry(head: _ListHead, content: str) -> dict[str, Any]:
        return {"name": head.name, "format": FORMATS[head.format], "category": head.category, "content": content}

    doc: dict[str, Any] = {
        "policy": orjson.loads(policy_text),
        "threatLists": [entry(h, c) for h, c in lists if h.kind == THREAT],
        "trustedLists": [entry(h, c) for h, c in lists if h.kind == TRUSTED],
    }
    etag = hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()[:ETAG_CHARS]
    doc["etag"] = etag
    return etag, orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


async def config_for(session: AsyncSession, ident: TokenIdentity) -> tuple[str, bytes]:
    """(etag, body) of the configuration the agent of ``ident`` runs, ready to send."""
    policy_text, _ = await effective_policy(session, ident.account_id, ident.cluster_name)
    # one statement for the lists and their content, so that the signature describes exactly this content
    rows = (await session.execute(_active_sets(ident.detector_id, *_HEAD_COLUMNS, IntelSet.content))).all()
    lists = [(_head(r), str(r.content)) for r in rows]
    signature = _signature(policy_text, [h for h, _ in lists])
    cached = _cache.body(signature)
    if cached is not None:
        return cached
    etag, body = build_config(policy_text, lists)
    _cache.put(signature, etag, body)
    return etag, body


async def current_etag(session: AsyncSession, ident: TokenIdentity) -> str:
    """The etag of the agent's configuration (what ``config_for`` would send), without loading list contents."""
    policy_text, _ = await effective_policy(session, ident.account_id, ident.cluster_name)
    heads = [_head(r) for r in (await session.execute(_active_sets(ident.detector_id, *_HEAD_COLUMNS))).all()]
    etag = _cache.etag(_signature(policy_text, heads))
    if etag is not None:
        return etag
    etag, _ = await config_for(session, ident)
    return etag

"""Signed-in browsers: session cookies, their CSRF tokens, and the throttle on failed sign-ins.

The cookie carries 32 random bytes; the table keeps only their SHA-256, so a copy of the database opens no
session. A session lasts 12 hours after its last use (sliding), ends at sign-out, and ends when its operator is
disabled. Each session has its own CSRF token, which the page reads from ``/console/api/session`` and sends back
in ``X-CSRF-Token`` with every state-changing request.
"""

from __future__ import annotations

import collections
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.console.operators import accounts_of
from backend.models import ConsoleSession, Operator
from backend.tenancy import now_ms

COOKIE_NAME = "rtm_session"
COOKIE_PATH = "/console"
SESSION_TTL_MS = 12 * 3_600_000
# How stale last_seen_at may get before a request writes it: every request writing would serialize page loads
# behind ingest on SQLite (one writer), and a minute is nothing against 12 hours.
TOUCH_RESOLUTION_MS = 60_000
MAX_SECRET_CHARS = 128


@dataclass(frozen=True)
class SignedIn:
    """The operator behind a request, as of this request (accounts are re-read, so changes apply at once)."""

    username: str
    accounts: list[str]
    csrf_token: str
    expires_at: int
    # the expiry moved forward on this request: the cookie's Max-Age is sent again to match
    renewed: bool = False


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def open_session(session: AsyncSession, username: str) -> str:
    """A new session for ``username``: the cookie's secret (shown to the browser only)."""
    t = now_ms()
    # sign-ins are rare: a good moment to forget sessions nobody came back to
    await session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < t))
    secret = secrets.token_urlsafe(32)
    session.add(
        ConsoleSession(
            id_sha256=_digest(secret),
            username=username,
            csrf_token=secrets.token_urlsafe(32),
            created_at=t,
            expires_at=t + SESSION_TTL_MS,
            last_seen_at=t,
        )
    )
    await session.flush()
    return secret


async def load_session(session: AsyncSession, secret: str | None) -> SignedIn | None:
    """The signed-in operator for a cookie's secret, or None (unknown, expired, or the operator disabled)."""
    if not secret or len(secret) > MAX_SECRET_CHARS:
        return None
    digest = _digest(secret)
    found = (
        await session.execute(
            select(ConsoleSession, Operator)
            .join(Operator, Operator.username == ConsoleSession.username)
            .where(ConsoleSession.id_sha256 == digest)
        )
    ).first()
    if found is None:
        return None
    row, operator = found
    t = now_ms()
    if row.expires_at <= t or operator.disabled_at is not None:
        await session.execute(delete(ConsoleSession).where(ConsoleSession.id_sha256 == digest))
        return None
    expires_at = row.expires_at
    renewed = t - row.last_seen_at >= TOUCH_RESOLUTION_MS
    if renewed:
        expires_at = t + SESSION_TTL_MS
        await session.execute(
            update(ConsoleSession)
            .where(ConsoleSession.id_sha256 == digest)
            .values(last_seen_at=t, expires_at=expires_at)
            .execution_options(synchronize_session=False)
        )
    return SignedIn(operator.username, accounts_of(operator), row.csrf_token, expires_at, renewed)


async def close_session(session: AsyncSession, secret: str | None) -> None:
    if secret and len(secret) <= MAX_SECRET_CHARS:
        await session.execute(delete(ConsoleSession).where(ConsoleSession.id_sha256 == _digest(secret)))


class LoginThrottle:
    """Failed sign-ins per username and per client address in a sliding window; over the limit, refused.

    In memory, per replica: behind a load balancer each replica counts its own share, which still bounds
    guessing to a small multiple of the limit. A locked username stays locked for whoever tries it (the
    password is not even checked), until its oldest failure leaves the window.
    """

    MAX_KEYS = 10_000

    def __init__(
        self,
        *,
        per_username: int = 5,
        per_address: int = 20,
        window_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_username = per_username
        self.per_address = per_address
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, collections.deque[float]] = {}

    def retry_after(self, username: str, address: str) -> float | None:
        """Seconds until this username and address may try again, or None if they may now."""
        waits = [
            w
            for key, limit in (
                (self._user_key(username), self.per_username),
                (self._addr_key(address), self.per_address),
            )
            if (w := self._wait(key, limit)) is not None
        ]
        return max(waits) if waits else None

    def failed(self, username: str, address: str) -> None:
        now = self.clock()
        for key in (self._user_key(username), self._addr_key(address)):
            q = self._failures.pop(key, None) or collections.deque()
            q.append(now)
            self._failures[key] = q  # re-inserted: dict order is least recently failed first
        self._bound(now)

    def succeeded(self, username: str) -> None:
        self._failures.pop(self._user_key(username), None)

    def _wait(self, key: str, limit: int) -> float | None:
        q = self._failures.get(key)
        if not q:
            return None
        now = self.clock()
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if len(q) < limit:
            return None
        return max(q[-limit] + self.window_s - now, 0.0)

    def _bound(self, now: float) -> None:
        if len(self._failures) <= self.MAX_KEYS:
            return
        for key in [k for k, q in self._failures.items() if not q or q[-1] <= now - self.window_s]:
            del self._failures[key]
        while len(self._failures) > self.MAX_KEYS:
            del self._failures[next(iter(self._failures))]

    @staticmethod
    def _user_key(username: str) -> str:
        return "u:" + username.lower()

    @staticmethod
    def _addr_key(address: str) -> str:
        return "a:" + address

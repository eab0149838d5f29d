"""Console operators: who may sign in, with which password, to see which accounts.

Passwords are hashed with scrypt (hashlib, OpenSSL's implementation), a random salt per operator, and the
parameters written into the hash string (``scrypt$N$r$p$salt$hash``), so that raising the cost later keeps old
hashes verifiable. Verification costs about 50 ms of CPU and 16 MiB: callers run it in a thread.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.models import ConsoleSession, Operator
from backend.tenancy import ACCOUNT_RE, now_ms

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024  # scrypt reads all of it: an unbounded password is free CPU for whoever sends one
ALL_ACCOUNTS = "*"

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
# What a stored hash may ask for: a tampered row must not make one sign-in allocate gigabytes.
MAX_SCRYPT_N = 2**20
SCRYPT_MAXMEM = 256 << 20


class OperatorError(ValueError):
    """A bad username, password or account list, worded for whoever typed it."""


def hash_password(password: str) -> str:
    check_password_text(password)
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=SCRYPT_MAXMEM, dklen=KEY_BYTES
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` was made from (constant time in the comparison)."""
    if len(password) > MAX_PASSWORD_CHARS:
        return False
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        n_i, r_i, p_i = int(n), int(r), int(p)
        salt_b, key_b = _unb64(salt), _unb64(key)
    except ValueError:
        return False
    if scheme != "scrypt" or not 1 < n_i <= MAX_SCRYPT_N or not 0 < r_i <= 32 or not 0 < p_i <= 16 or not key_b:
        return False
    got = hashlib.scrypt(password.encode(), salt=salt_b, n=n_i, r=r_i, p=p_i, maxmem=SCRYPT_MAXMEM, dklen=len(key_b))
    return hmac.compare_digest(got, key_b)


@functools.cache
def dummy_hash() -> str:
    """Checked against when the username does not exist, so that a wrong username costs what a wrong password
    does and response times do not tell which usernames exist."""
    return hash_password(secrets.token_urlsafe(24))


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64") from exc


def check_password_text(password: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise OperatorError(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise OperatorError(f"the password must have at most {MAX_PASSWORD_CHARS} characters")


def check_username(username: str) -> None:
    if not USERNAME_RE.match(username):
        raise OperatorError(f"username: 1 to 64 letters, digits, '.', '_', '@' or '-', got {username!r}")


def parse_accounts(text: str | Sequence[str]) -> list[str]:
    """``*`` (every account) or 12-digit account ids, comma-separated or as a list."""
    items = [a.strip() for a in (text.split(",") if isinstance(text, str) else text) if a.strip()]
    if not items:
        raise OperatorError("accounts: give account ids (111111111111,222222222222) or * for every account")
    if ALL_ACCOUNTS in items:
        if len(items) > 1:
            raise OperatorError("accounts: * means every account; give it alone")
        return [ALL_ACCOUNTS]
    for a in items:
        if not ACCOUNT_RE.match(a):
            raise OperatorError(f"accounts: an account id is 12 digits, got {a!r}")
    return sorted(set(items))


@dataclass(frozen=True)
class OperatorInfo:
    username: str
    accounts: list[str]
    created_at: int
    disabled_at: int | None


def accounts_of(row: Operator) -> list[str]:
    try:
        value = orjson.loads(row.accounts)
    except orjson.JSONDecodeError:
        return []
    return [a for a in value if isinstance(a, str)] if isinstance(value, list) else []


async def create_operator(
    session: AsyncSession, username: str, password: str, accounts: Sequence[str], *, hashed: bool = False
) -> None:
    """A new operator; a disabled one of the same name is enabled again with the new password and accounts.

    ``hashed``: ``password`` is already hash_password's result (hashing takes time: not inside a transaction).
    """
    check_username(username)
    allowed = parse_accounts(accounts)
    password_hash = password if hashed else hash_password(password)
    row = await session.get(Operator, username)
    if row is not None and row.disabled_at is None:
        raise OperatorError(f"operator {username!r} exists (disable it first to replace it)")
    if row is None:
        session.add(
            Operator(
                username=username,
                password_hash=password_hash,
                accounts=orjson.dumps(allowed).decode(),
                created_at=now_ms(),
            )
        )
    else:
        row.password_hash = password_hash
        row.accounts = orjson.dumps(allowed).decode()
        row.disabled_at = None
    await session.flush()


async def list_operators(session: AsyncSession) -> list[OperatorInfo]:
    rows = (await session.execute(select(Operator).order_by(Operator.username))).scalars()
    return [OperatorInfo(r.username, accounts_of(r), r.created_at, r.disabled_at) for r in rows]


async def disable_operator(session: AsyncSession, username: str) -> bool:
    """Disable an operator and end every session they have open; False if there was no enabled one."""
    res = await session.execute(
        update(Operator)
        .where(Operator.username == username, Operator.disabled_at.is_(None))
        .values(disabled_at=now_ms())
        .execution_options(synchronize_session=False)
    )
    await session.execute(delete(ConsoleSession).where(ConsoleSession.username == username))
    return bool(res.rowcount)  # type: ignore[attr-defined]


async def any_operator(session: AsyncSession) -> bool:
    """Whether anyone at all can sign in: without one, the console explains how to create one."""
    n = (
        await session.execute(select(func.count()).select_from(Operator).where(Operator.disabled_at.is_(None)))
    ).scalar_one()
    return bool(n)


async def password_hash_of(session: AsyncSession, username: str) -> str | None:
    """The enabled operator's hash, or None."""
    row = await session.get(Operator, username)
    if row is None or row.disabled_at is not None:
        return None
    return row.password_hash

"""Webhook: a JSON POST per batch to any HTTP endpoint (a SOAR, a chat bridge, a homemade pipeline), signed.

The body::

    {"format": "guardduty", "findings": [ <finding>, ... ]}

each finding in GuardDuty's shape (``format = "guardduty"``) or as an OCSF Detection Finding (``"ocsf"``).

Headers:

- ``X-Runtime-Signature: t=<unix seconds>,v1=<hex>``: ``hex`` is HMAC-SHA256, keyed with the exporter's secret,
  of ``"<t>." + body`` (the exact bytes received). A receiver recomputes it, compares in constant time, and
  refuses a ``t`` more than five minutes from its clock (a replayed request). :func:`verify_signature` does this.
- ``X-Runtime-Delivery: <uuid>``: the same for every attempt of one batch (derived from its content), so that a
  receiver can drop a retry of a delivery it already processed (the timeout may have hit after it did).

Responses: 2xx is delivered. 408, 429, 5xx, a timeout or a refused connection are retried with backoff; any
other 4xx means the receiver will never accept this batch (wrong URL, bad key): dead letter without retrying.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from backend.exports.base import Exporter, Failure, Item, PermanentError
from backend.exports.config import WebhookConfig
from backend.exports.ocsf import to_detection_finding

SIGNATURE_HEADER = "X-Runtime-Signature"
DELIVERY_HEADER = "X-Runtime-Delivery"
TOLERANCE_S = 300
USER_AGENT = "ecs-runtime-monitor-webhook/1"


def sign(key: bytes, body: bytes, timestamp: int) -> str:
    digest = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    key: bytes, header: str | None, body: bytes, *, tolerance_s: int = TOLERANCE_S, now: float | None = None
) -> bool:
    """A receiver's check of ``X-Runtime-Signature`` (any ``v1`` matching, to allow rotating keys)."""
    if not header:
        return False
    parts: dict[str, list[str]] = {}
    for part in header.split(","):
        k, sep, v = part.strip().partition("=")
        if sep:
            parts.setdefault(k, []).append(v)
    try:
        t = int(parts.get("t", [""])[0])
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = sign(key, body, t).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, v) for v in parts.get("v1", []))


class WebhookExporter(Exporter):
    type = "webhook"
    config: WebhookConfig

    def __init__(self, config: WebhookConfig) -> None:
        super().__init__(config)
        self.key = config.signing_key()
        self._session: aiohttp.ClientSession | None = None

    def format(self, finding: dict[str, Any]) -> dict[str, Any]:
        return to_detection_finding(finding) if self.config.format == "ocsf" else finding

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": USER_AGENT})
        return self._session

    async def export(self, items: Sequence[Item]) -> list[Failure]:
        body = orjson.dumps({"format": self.config.format, "findings": [i.body for i in items]})
        delivery = str(uuid.UUID(bytes=hashlib.sha256(body).digest()[:16], version=4))
        headers = {
            **self.config.headers,
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.key, body, int(time.time())),
            DELIVERY_HEADER: delivery,
        }
        # exceptions (refused, timeout) fail the whole batch and are retried by the pipeline
        async with self._client().post(self.config.url, data=body, headers=headers, allow_redirects=False) as resp:
            text = (await resp.text(errors="replace"))[:300]
            if 200 <= resp.status < 300:
                return []
            msg = f"HTTP {resp.status} from {self.config.url}: {text}"
            if resp.status in (408, 429) or resp.status >= 500:
                return [Failure(i, msg, True) for i in items]
            raise PermanentError(msg)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

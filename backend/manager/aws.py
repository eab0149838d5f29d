"""boto3 clients for the manager, and the one retry policy for AWS throttling.

Every command builds its clients with :func:`client` from one :class:`AwsConfig` (region, profile and, for moto in
tests or a private endpoint, ``endpoint_url``). Throttling is retried here, in :class:`Backoff`, rather than only
by botocore: a long-running manager that touches every service of every cluster hits ECS's and EC2's request
rate limits, and a retry policy of its own is visible (logged, counted) and testable without sleeping.
botocore keeps a small number of attempts of its own for connection errors and 5xx.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

log = logging.getLogger("backend.manager.aws")

T = TypeVar("T")

# botocore's standard retry mode's throttling codes, less LimitExceededException: for IAM and ECS that is a quota
# (too many policies, too many task definition revisions), which waiting does not lift.
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    }
)


@dataclass(frozen=True)
class AwsConfig:
    """Where and as whom the manager calls AWS."""

    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    # botocore's own attempts (connection errors, 5xx, and throttling too): Backoff does the long waits
    botocore_max_attempts: int = 3
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AwsConfig:
        """From the common flags cli.py adds (--region, --endpoint-url, --profile)."""
        return cls(
            region=getattr(args, "region", None),
            endpoint_url=getattr(args, "endpoint_url", None),
            profile=getattr(args, "profile", None),
        )


def session(cfg: AwsConfig) -> boto3.session.Session:
    return boto3.session.Session(profile_name=cfg.profile, region_name=cfg.region)


def client(cfg: AwsConfig, service: str, sess: boto3.session.Session | None = None) -> Any:
    """A boto3 client for ``service`` (ecs, ec2, iam, ecr, sts, ...) configured from ``cfg``."""
    sess = sess or session(cfg)
    config = Config(
        retries={"mode": "standard", "total_max_attempts": cfg.botocore_max_attempts},
        connect_timeout=cfg.connect_timeout_s,
        read_timeout=cfg.read_timeout_s,
        user_agent_extra="runtime-manager",
    )
    return sess.client(service, endpoint_url=cfg.endpoint_url, config=config)


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def is_throttling(exc: BaseException) -> bool:
    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return error_code(exc) in THROTTLING_CODES or status == 429


class ThrottledError(Exception):
    """Still throttled after every attempt; ``last`` is the final ClientError."""

    def __init__(self, operation: str, attempts: int, last: ClientError) -> None:
        super().__init__(f"{operation}: still throttled after {attempts} attempts ({error_code(last)})")
        self.operation = operation
        self.attempts = attempts
        self.last = last


@dataclass
class Backoff:
    """Retries a call on throttling with exponential backoff and full jitter (AWS's recommended scheme).

    ``sleep`` and ``rng`` are injectable so tests can see the waits without waiting. ``retries`` counts every
    throttled attempt this instance retried, for the manager's stats.
    """

    max_attempts: int = 8
    base_s: float = 0.5
    cap_s: float = 20.0
    sleep: Callable[[float], None] = time.sleep
    rng: Callable[[], float] = random.random
    retries: int = 0
    waited_s: float = 0.0
    delays: list[float] = field(default_factory=list)

    def delay(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (1-based): uniform in [0, min(cap, base * 2**attempt))."""
        return self.rng() * min(self.cap_s, self.base_s * 2.0**attempt)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried while AWS says it is throttled; other errors propagate at once."""
        name = getattr(fn, "__name__", repr(fn))
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(*args, **kwargs)
            except ClientError as exc:
                if not is_throttling(exc):
                    raise
                if attempt >= self.max_attempts:
                    raise ThrottledError(name, attempt, exc) from exc
                wait = self.delay(attempt)
                self.retries += 1
                self.waited_s += wait
                self.delays.append(wait)
                log.warning(
                    "throttled, backing off",
                    extra={"operation": name, "code": error_code(exc), "attempt": attempt, "waitSeconds": wait},
                )
                self.sleep(wait)

    def pages(
        self,
        fn: Callable[..., dict[str, Any]],
        *,
        token_in: str = "nextToken",
        token_out: str | None = None,
        **kwargs: Any,
    ) -> Iterator[dict[str, Any]]:
        """Each page of a listing, every page call under :meth:`call`.

        botocore's paginators retry nothing themselves, and a throttle in the middle of one would restart the
        listing; here only the throttled page is asked again. ``token_in``/``token_out`` name the pagination
        token: ``nextToken`` (ECS, ECR), ``NextToken`` (EC2), ``Marker`` in and out (IAM).
        """
        token_out = token_out or token_in
        token: str | None = None
        while True:
            page = self.call(fn, **kwargs, **({token_in: token} if token else {}))
            yield page
            nxt = page.get(token_out)
            if not nxt or (token_out == "Marker" and not page.get("IsTruncated")):
                return
            token = str(nxt)

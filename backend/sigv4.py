"""AWS Signature Version 4 verification for the GuardDuty-compatible API.

The canonical request is rebuilt from the request as received, following the SigV4 specification the way
botocore (boto3, the aws CLI) signs it for non-S3 services:

- the path as sent (already percent-encoded once by the client), dot segments and repeated slashes removed,
  then percent-encoded a second time (``%`` becomes ``%25``): non-S3 services sign the double-encoded path;
- the query string decoded and re-encoded with only ``A-Za-z0-9-_.~`` left bare, pairs sorted;
- the headers named in ``SignedHeaders``, lowercased, values trimmed and inner whitespace runs collapsed,
  repeated headers joined with ``,``;
- the body's SHA-256, or the client's ``x-amz-content-sha256`` (which is then checked against the body).

Errors are AWS's (``backend.errors``), with messages that say what is wrong and what to do about it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, unquote

from backend.errors import IncompleteSignature, InvalidSignature, MissingAuthenticationToken, UnrecognizedClient

ALGORITHM = "AWS4-HMAC-SHA256"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
SIGNATURE_RE = re.compile(r"^[0-9a-f]{64}$")
SHA256_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
# IAM's access key ids are 16 to 128 word characters; anything else cannot be a key, so it is not looked up.
ACCESS_KEY_RE = re.compile(r"^\w{1,128}$")

KeyLookup = Callable[[str], Awaitable[tuple[str, str] | None]]


@dataclass(frozen=True)
class Principal:
    """Who signed a request: the key, the account it belongs to, and the region its credential scope names."""

    access_key_id: str
    account_id: str
    region: str


@dataclass(frozen=True)
class AuthorizationHeader:
    access_key_id: str
    scope_date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def credential_scope(self) -> str:
        return f"{self.scope_date}/{self.region}/{self.service}/aws4_request"


class SigV4Verifier:
    """Checks SigV4-signed requests against access keys that ``lookup`` resolves.

    ``lookup(access_key_id)`` returns ``(secret_access_key, account_id)``, or None for a key that does not
    exist or was revoked. ``clock`` is injectable so tests can move the server's time.
    """

    def __init__(
        self,
        lookup: KeyLookup,
        service: str = "guardduty",
        max_skew_s: float = 900,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lookup = lookup
        self.service = service
        self.max_skew_s = max_skew_s
        self._clock = clock

    async def verify(
        self, method: str, raw_path: str, query_string: str, headers: Mapping[str, str], body: bytes
    ) -> Principal:
        """The request's principal, or an ApiError saying why the request is not authentic.

        ``raw_path`` and ``query_string`` are as received, still percent-encoded (aiohttp:
        ``request.rel_url.raw_path`` and ``request.rel_url.raw_query_string``); a ``?...`` left on ``raw_path``
        is ignored.
        """
        header_values = _lowercase_headers(headers)
        raw_path = raw_path.partition("?")[0]
        authorization = _single(header_values, "authorization")
        if authorization is None:
            if any(k.lower() in ("x-amz-signature", "x-amz-credential") for k, _ in _query_pairs(query_string)):
                raise MissingAuthenticationToken(
                    "presigned URLs (a signature in the query string) are not accepted: "
                    "send the signature in the Authorization header"
                )
            raise MissingAuthenticationToken(
                "Missing Authentication Token: the request has no Authorization header. Sign it with AWS "
                "Signature Version 4 (boto3 and the aws CLI do) using an access key this backend issued."
            )
        auth = parse_authorization(authorization)
        if "x-amz-security-token" in header_values:
            raise UnrecognizedClient(
                "The security token included in the request is invalid: this backend issues no session tokens. "
                "Use one of its long-term access keys, without a session token (unset AWS_SESSION_TOKEN)."
            )

        if "host" not in auth.signed_headers:
            raise IncompleteSignature("'host' must be among the SignedHeaders of the Authorization header")
        timestamp, signed_at = self._request_time(header_values, auth)
        for name in auth.signed_headers:
            if name not in header_values:
                raise IncompleteSignature(f"the header '{name}' is in SignedHeaders but not in the request")
        if auth.service != self.service:
            raise InvalidSignature(
                f"Credential should be scoped to correct service: '{self.service}' "
                f"(its scope names '{auth.service}': sign with a {self.service} client)"
            )
        if not REGION_RE.match(auth.region):
            raise InvalidSignature(f"Credential should be scoped to a valid region, not '{auth.region[:40]}'")
        self._check_skew(timestamp, signed_at)

        key = await self._lookup(auth.access_key_id) if ACCESS_KEY_RE.match(auth.access_key_id) else None
        if key is None:
            raise UnrecognizedClient(
                f"The access key ID '{auth.access_key_id[:128]}' is not one this backend issued, or it was revoked"
            )
        secret, account_id = key

        body_sha256 = hashlib.sha256(body).hexdigest()
        claimed_sha256 = _single(header_values, "x-amz-content-sha256")
        if claimed_sha256 is not None and not SHA256_HEX_RE.match(claimed_sha256):
            raise IncompleteSignature(
                f"x-amz-content-sha256 must be the body's SHA-256 in hex; '{claimed_sha256[:64]}' is not "
                "(this API does not accept unsigned or streaming payloads)"
            )
        payload_hash = claimed_sha256 if claimed_sha256 is not None else body_sha256

        creq = canonical_request(
            method,
            raw_path,
            query_string,
            header_values=header_values,
            signed_headers=auth.signed_headers,
            payload_hash=payload_hash,
        )
        sts = string_to_sign(timestamp, auth.credential_scope, creq)
        expected = signature(secret, auth.scope_date, auth.region, auth.service, sts)
        if not hmac.compare_digest(expected, auth.signature):
            raise InvalidSignature(
                "The request signature we calculated does not match the signature you provided. Check your "
                "secret access key and signing method.\n\nThe Canonical String for this request should have been\n"
                f"'{creq}'\n\nThe String-to-Sign should have been\n'{sts}'\n"
            )
        # After the signature: a request signed with a wrong secret is reported as that, not as a body problem.
        if claimed_sha256 is not None and not hmac.compare_digest(claimed_sha256.lower(), body_sha256):
            raise InvalidSignature(
                "x-amz-content-sha256 does not match the SHA-256 of the body received: the body was changed "
                "or cut after it was signed"
            )
        return Principal(access_key_id=auth.access_key_id, account_id=account_id, region=auth.region)

    def _request_time(self, header_values: Mapping[str, list[str]], auth: AuthorizationHeader) -> tuple[str, datetime]:
        """The signing time (``YYYYMMDDTHHMMSSZ``) from X-Amz-Date, or from Date when X-Amz-Date is absent."""
        amz_date = _single(header_values, "x-amz-date")
        if amz_date is not None:
            source = "x-amz-date"
            try:
                signed_at = datetime.strptime(amz_date.strip(), AMZ_DATE_FORMAT).replace(tzinfo=UTC)
            except ValueError:
                raise IncompleteSignature(
                    f"X-Amz-Date must be a UTC time of the form YYYYMMDDTHHMMSSZ, got '{amz_date[:40]}'"
                ) from None
        else:
            http_date = _single(header_values, "date")
            if http_date is None:
                raise IncompleteSignature(
                    "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header"
                )
            source = "date"
            try:
                parsed = parsedate_to_datetime(http_date)
            except (TypeError, ValueError):
                raise IncompleteSignature(f"the Date header is not an HTTP date: '{http_date[:40]}'") from None
            # "-0000" (botocore's formatdate) parses as a naive datetime; HTTP dates are UTC regardless
            signed_at = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
        if source not in auth.signed_headers:
            raise IncompleteSignature(f"'{source}' must be among the SignedHeaders of the Authorization header")
        timestamp = signed_at.strftime(AMZ_DATE_FORMAT)
        if auth.scope_date != timestamp[:8]:
            raise InvalidSignature(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
                f"'{auth.scope_date}' != '{timestamp[:8]}', from '{source}'"
            )
        return timestamp, signed_at

    def _check_skew(self, timestamp: str, signed_at: datetime) -> None:
        now = self._clock()
        skew = signed_at.timestamp() - now
        window = f"{self.max_skew_s / 60:g} min."
        if skew < -self.max_skew_s:
            raise InvalidSignature(
                f"Signature expired: {timestamp} is now earlier than {_amz(now - self.max_skew_s)} "
                f"({_amz(now)} - {window}); check the client's clock"
            )
        if skew > self.max_skew_s:
            raise InvalidSignature(
                f"Signature not yet current: {timestamp} is still later than {_amz(now + self.max_skew_s)} "
                f"({_amz(now)} + {window}); check the client's clock"
            )


def parse_authorization(value: str) -> AuthorizationHeader:
    """``AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/guardduty/aws4_request, SignedHeaders=a;b,
    Signature=<hex>``, or IncompleteSignature naming what is missing or malformed."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise IncompleteSignature(
            f"unsupported authorization scheme '{algorithm[:40]}': this API accepts {ALGORITHM} "
            "(AWS Signature Version 4)"
        )
    params: dict[str, str] = {}
    for part in rest.split(","):
        name, eq, v = part.strip().partition("=")
        if not name:
            continue
        if not eq:
            raise IncompleteSignature(f"Authorization header parameter '{name[:40]}' has no '=value'")
        if name in params:
            raise IncompleteSignature(f"Authorization header has '{name[:40]}' twice")
        params[name] = v.strip()
    missing = [p for p in ("Credential", "SignedHeaders", "Signature") if not params.get(p)]
    if missing:
        raise IncompleteSignature(
            "Authorization header requires "
            + ", ".join(f"'{p}'" for p in missing)
            + " parameter"
            + ("s" if len(missing) > 1 else "")
            + f" ({ALGORITHM} Credential=<key id>/<YYYYMMDD>/<region>/<service>/aws4_request, "
            "SignedHeaders=<a;b;c>, Signature=<hex>)"
        )
    credential = params["Credential"].split("/")
    if len(credential) != 5 or credential[4] != "aws4_request" or not all(credential):
        raise IncompleteSignature(
            "Credential must have the form <access key id>/<YYYYMMDD>/<region>/<service>/aws4_request, "
            f"got '{params['Credential'][:200]}'"
        )
    if not re.fullmatch(r"\d{8}", credential[1]):
        raise IncompleteSignature(f"the Credential's date must be YYYYMMDD, got '{credential[1][:20]}'")
    signed_headers = tuple(params["SignedHeaders"].split(";"))
    if any(not h or h != h.strip().lower() for h in signed_headers):
        raise IncompleteSignature(
            f"SignedHeaders must be lowercase header names separated by ';', got '{params['SignedHeaders'][:200]}'"
        )
    if not SIGNATURE_RE.match(params["Signature"]):
        raise IncompleteSignature("Signature must be 64 lowercase hex digits (HMAC-SHA256)")
    return AuthorizationHeader(
        access_key_id=credential[0],
        scope_date=credential[1],
        region=credential[2],
        service=credential[3],
        signed_headers=signed_headers,
        signature=params["Signature"],
    )


def canonical_uri(raw_path: str) -> str:
    # botocore signs quote(remove_dot_segments(path)) of the path it sends, which it has already encoded once.
    return quote(_remove_dot_segments(raw_path) or "/", safe="/~")


def canonical_query_string(query_string: str) -> str:
    pairs = sorted((_uri_encode(k), _uri_encode(v)) for k, v in _query_pairs(query_string))
    return "&".join(f"{k}={v}" for k, v in pairs)


def canonical_request(
    method: str,
    raw_path: str,
    query_string: str,
    *,
    header_values: Mapping[str, list[str]],
    signed_headers: tuple[str, ...],
    payload_hash: str,
) -> str:
    names = sorted(set(signed_headers))
    canonical_headers = "".join(
        f"{name}:{','.join(' '.join(v.split()) for v in header_values.get(name, []))}\n" for name in names
    )
    return "\n".join(
        [
            method.upper(),
            canonical_uri(raw_path),
            canonical_query_string(query_string),
            canonical_headers,
            ";".join(names),
            payload_hash,
        ]
    )


def string_to_sign(timestamp: str, credential_scope: str, creq: str) -> str:
    return "\n".join([ALGORITHM, timestamp, credential_scope, hashlib.sha256(creq.encode()).hexdigest()])


def signature(secret: str, scope_date: str, region: str, service: str, sts: str) -> str:
    key = f"AWS4{secret}".encode()
    for part in (scope_date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()


# -- helpers --------------------------------------------------------------------------------------------------


def _lowercase_headers(headers: Mapping[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    # items() of a multidict yields each occurrence of a repeated header, which SigV4 joins with ','.
    items: Any = headers.items()
    for name, value in items:
        out.setdefault(name.lower(), []).append(value)
    return out


def _single(header_values: Mapping[str, list[str]], name: str) -> str | None:
    values = header_values.get(name)
    return values[0] if values else None


def _query_pairs(query_string: str) -> list[tuple[str, str]]:
    pairs = []
    for part in query_string.split("&"):
        if part:
            k, _, v = part.partition("=")
            pairs.append((unquote(k), unquote(v)))
    return pairs


def _uri_encode(value: str) -> str:
    return quote(value, safe="-_.~")


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 5.2.4, plus the collapsing of empty segments ('//') that AWS services expect; as botocore does.
    if not path:
        return ""
    out: list[str] = []
    for seg in path.split("/"):
        if seg == "..":
            if out:
                out.pop()
        elif seg and seg != ".":
            out.append(seg)
    first = "/" if path.startswith("/") else ""
    last = "/" if path.endswith("/") and out else ""
    return first + "/".join(out) + last


def _amz(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime(AMZ_DATE_FORMAT)

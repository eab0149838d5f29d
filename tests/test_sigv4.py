"""SigV4 verification and the API's error shapes, driven by real boto3 clients and the real aws CLI.

A small aiohttp app on 127.0.0.1 runs the verifier in a middleware, the way backend.api does. Requests are
signed by botocore as it signs for AWS; tampering happens on the wire through a TCP relay, and a stale
signature comes from moving the server's clock, so every path a real request takes is exercised.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
from aiohttp import web
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from multidict import CIMultiDict, CIMultiDictProxy

from backend.errors import (
    DETECTOR_NOT_OWNED,
    AccessDenied,
    ApiError,
    BadRequest,
    IncompleteSignature,
    InternalServerError,
    InvalidSignature,
    MissingAuthenticationToken,
    ResourceNotFound,
    Throttling,
    UnrecognizedClient,
)
from backend.sigv4 import Principal, SigV4Verifier

ACCOUNT = "123456789012"
KEY_ID = "AKIARTMTEST00000001"
# '/', '+' and '=' as in real secrets: the signing key derivation must not URL-encode the secret
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCY=EXAMPLEKEY"
OTHER_KEY_ID = "AKIARTMTEST00000002"
OTHER_ACCOUNT = "210987654321"
KEYS = {KEY_ID: (SECRET, ACCOUNT), OTHER_KEY_ID: ("another-secret", OTHER_ACCOUNT)}
REGION = "eu-west-3"
VERIFIER = web.AppKey("verifier", SigV4Verifier)
AWS_CLI = Path(sys.executable).parent / "aws"

# What the handler raises for GET /detector/{id}: each ApiError as a client sees it.
RAISED: dict[str, ApiError] = {
    "bad": BadRequest("maxResults: must be from 1 to 50, got 51"),
    "missing": ResourceNotFound(),
    "denied": AccessDenied("this key may not change filters"),
    "boom": InternalServerError("internal error; the backend's log has the details"),
    "slow": Throttling(),
}


async def lookup(key_id: str) -> tuple[str, str] | None:
    return KEYS.get(key_id)


@dataclass
class SignedApi:
    """The test app: what it saw, where it listens."""

    url: str
    seen: list[dict[str, Any]] = field(default_factory=list)


API = web.AppKey("api", SignedApi)
PRINCIPAL = web.RequestKey("principal", Principal)
BODY = web.RequestKey("body", bytes)


@web.middleware
async def sigv4_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    verifier = request.app[VERIFIER]
    body = await request.read()
    try:
        principal = await verifier.verify(
            request.method, request.rel_url.raw_path, request.rel_url.raw_query_string, request.headers, body
        )
        request[PRINCIPAL] = principal
        request[BODY] = body
        return await handler(request)
    except ApiError as exc:
        return exc.response()


async def any_operation(request: web.Request) -> web.Response:
    request.app[API].seen.append(
        {
            "principal": request[PRINCIPAL],
            "method": request.method,
            "path": request.path,  # decoded
            "query": dict(request.query),
            "body": orjson.loads(request[BODY]) if request[BODY] else None,
        }
    )
    detector_id = request.match_info.get("detector_id")
    if detector_id in RAISED:
        raise RAISED[detector_id]
    # Enough for every operation these tests call: botocore's parser takes the members its model knows.
    return web.json_response({"detectorIds": ["d1"], "findingIds": ["f1"], "createdAt": "2024-01-01T00:00:00Z"})


@pytest.fixture
def aws_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Neither this process's boto3 nor the CLI may read the machine's AWS configuration or credentials."""
    config = tmp_path / "aws-config"
    creds = tmp_path / "aws-credentials"
    config.write_text("")
    creds.write_text("")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(creds),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_PAGER": "",
    }


@pytest.fixture
async def serve(aws_env: dict[str, str]) -> AsyncIterator[Callable[[SigV4Verifier], Awaitable[SignedApi]]]:
    runners: list[web.AppRunner] = []

    async def start(verifier: SigV4Verifier) -> SignedApi:
        app = web.Application(middlewares=[sigv4_middleware])
        app[VERIFIER] = verifier
        api = SignedApi(url="")
        app[API] = api
        app.router.add_route("GET", "/detector/{detector_id}", any_operation)
        app.router.add_route("*", "/{tail:.*}", any_operation)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        api.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return api

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def api(serve: Callable[[SigV4Verifier], Awaitable[SignedApi]]) -> SignedApi:
    return await serve(SigV4Verifier(lookup))


class TamperingRelay:
    """A man in the middle: relays TCP to the server, rewriting ``old`` into ``new`` in what clients send."""

    def __init__(self, upstream_port: int, old: bytes, new: bytes) -> None:
        self.upstream_port = upstream_port
        self.old = old
        self.new = new
        self.rewrites = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, rewrite: bool) -> None:
            try:
                while data := await src.read(65536):
                    if rewrite and self.old in data:
                        data = data.replace(self.old, self.new)
                        self.rewrites += 1
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(pipe(client_r, server_w, True), pipe(server_r, client_w, False), return_exceptions=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def client(url: str, *, service: str = "guardduty", key_id: str = KEY_ID, secret: str = SECRET, **kw: Any) -> Any:
    return boto3.session.Session().client(
        service,
        endpoint_url=url,
        region_name=kw.pop("region", REGION),
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=kw.pop("config", Config(retries={"total_max_attempts": 1})),
        **kw,
    )


async def client_error(call: Callable[[], Any]) -> ClientError:
    with pytest.raises(ClientError) as info:
        await asyncio.to_thread(call)
    return info.value


async def run_cli(
    env: dict[str, str], url: str, *args: str, key_id: str = KEY_ID, secret: str = SECRET
) -> tuple[int | None, str, str]:
    if not AWS_CLI.exists():
        pytest.fail(f"the aws CLI is not installed next to {sys.executable} (it is a dev dependency)")
    proc = await asyncio.create_subprocess_exec(
        str(AWS_CLI),
        *args,
        "--endpoint-url",
        url,
        "--region",
        REGION,
        "--output",
        "json",
        env={**env, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


# -- boto3: requests that must pass ------------------------------------------------------------------------------


async def test_boto3_get_with_query_parameters_is_accepted(api: SignedApi) -> None:
    gd = client(api.url)
    # a token with every character that needs encoding: the canonical query must re-encode exactly as signed
    resp = await asyncio.to_thread(gd.list_detectors, MaxResults=5, NextToken="a+b/c=d e~f%g&h")
    assert resp["DetectorIds"] == ["d1"]
    [seen] = api.seen
    assert seen["principal"] == Principal(access_key_id=KEY_ID, account_id=ACCOUNT, region=REGION)
    assert seen["query"] == {"maxResults": "5", "nextToken": "a+b/c=d e~f%g&h"}


async def test_boto3_post_with_json_body_is_accepted(api: SignedApi) -> None:
    gd = client(api.url)
    criteria = {"Criterion": {"severity": {"Gte": 7}, "type": {"Eq": ["Execution:Runtime/ReverseShell"]}}}
    resp = await asyncio.to_thread(gd.list_findings, DetectorId="d1", FindingCriteria=criteria)
    assert resp["FindingIds"] == ["f1"]
    [seen] = api.seen
    assert seen["method"] == "POST"
    assert seen["body"] == {
        "findingCriteria": {"criterion": {"severity": {"gte": 7}, "type": {"eq": ["Execution:Runtime/ReverseShell"]}}}
    }


async def test_boto3_delete_with_encoded_path_parameters_is_accepted(api: SignedApi) -> None:
    gd = client(api.url)
    # botocore percent-encodes these in the path and signs the path encoded a second time
    name = "we!rd name+/%x_ü*'()"
    await asyncio.to_thread(gd.delete_filter, DetectorId="d 1", FilterName=name)
    [seen] = api.seen
    assert seen["method"] == "DELETE"
    assert seen["path"] == f"/detector/d 1/filter/{name}"


async def test_boto3_other_account_key_and_region_give_their_principal(api: SignedApi) -> None:
    gd = client(api.url, key_id=OTHER_KEY_ID, secret="another-secret", region="ap-southeast-2")
    await asyncio.to_thread(gd.list_detectors)
    assert api.seen[0]["principal"] == Principal(OTHER_KEY_ID, OTHER_ACCOUNT, "ap-southeast-2")


async def test_signature_within_the_allowed_skew_is_accepted(serve: Any) -> None:
    api = await serve(SigV4Verifier(lookup, clock=lambda: time.time() + 840))
    await asyncio.to_thread(client(api.url).list_detectors)
    assert len(api.seen) == 1


# -- boto3: requests that must be refused --------------------------------------------------------------------------


def assert_error(exc: ClientError, code: str, status: int, *fragments: str) -> None:
    err = exc.response["Error"]
    assert err["Code"] == code, err
    assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == status
    for fragment in fragments:
        assert fragment in err["Message"], err["Message"]


async def test_boto3_wrong_secret_is_invalid_signature(api: SignedApi) -> None:
    exc = await client_error(client(api.url, secret=SECRET + "x").list_detectors)
    assert_error(exc, "InvalidSignatureException", 403, "does not match the signature you provided")
    # the message helps a client author debug: it shows what the server signed
    assert "GET\n/detector\n\nhost:127.0.0.1:" in exc.response["Error"]["Message"]
    assert api.seen == []


async def test_boto3_unknown_key_is_unrecognized_client(api: SignedApi) -> None:
    exc = await client_error(client(api.url, key_id="AKIANOSUCHKEY0000000").list_detectors)
    assert_error(exc, "UnrecognizedClientException", 403, "AKIANOSUCHKEY0000000", "not one this backend issued")
    assert api.seen == []


async def test_boto3_body_tampered_in_flight_is_invalid_signature(api: SignedApi) -> None:
    port = int(api.url.rsplit(":", 1)[1])
    relay = TamperingRelay(port, b'"gte": 7', b'"gte": 1')
    try:
        gd = client(await relay.start())
        exc = await client_error(
            lambda: gd.list_findings(DetectorId="d1", FindingCriteria={"Criterion": {"severity": {"Gte": 7}}})
        )
        assert relay.rewrites == 1
        assert_error(exc, "InvalidSignatureException", 403, "does not match the signature you provided")
        assert api.seen == []
        # the same relay passes an untouched request: the refusal above is the tampering's doing
        await asyncio.to_thread(gd.list_findings, DetectorId="d1")
        assert len(api.seen) == 1
    finally:
        await relay.close()


async def test_boto3_stale_signature_is_expired(serve: Any) -> None:
    api = await serve(SigV4Verifier(lookup, clock=lambda: time.time() + 3600))
    exc = await client_error(client(api.url).list_detectors)
    assert_error(exc, "InvalidSignatureException", 403, "Signature expired", "- 15 min.", "check the client's clock")


async def test_boto3_signature_from_the_future_is_not_yet_current(serve: Any) -> None:
    api = await serve(SigV4Verifier(lookup, clock=lambda: time.time() - 3600))
    exc = await client_error(client(api.url).list_detectors)
    assert_error(exc, "InvalidSignatureException", 403, "Signature not yet current", "+ 15 min.")


async def test_boto3_unsigned_request_is_missing_authentication_token(api: SignedApi) -> None:
    gd = client(api.url, config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}))
    exc = await client_error(gd.list_detectors)
    assert_error(exc, "MissingAuthenticationTokenException", 403, "no Authorization header")


async def test_boto3_key_signed_for_another_service_is_refused(api: SignedApi) -> None:
    inspector = client(api.url, service="inspector2")
    exc = await client_error(inspector.list_findings)
    assert_error(exc, "InvalidSignatureException", 403, "scoped to correct service: 'guardduty'", "'inspector2'")
    assert api.seen == []


async def test_boto3_session_token_is_unrecognized_client(api: SignedApi) -> None:
    gd = client(api.url, aws_session_token="FwoGZXIvYXdzEXAMPLE")
    exc = await client_error(gd.list_detectors)
    assert_error(exc, "UnrecognizedClientException", 403, "no session tokens")


# -- the ApiError shapes, as boto3 reports them --------------------------------------------------------------------


@pytest.mark.parametrize("detector_id", sorted(RAISED))
async def test_api_errors_reach_boto3_with_code_message_and_status(api: SignedApi, detector_id: str) -> None:
    gd = client(api.url)
    raised = RAISED[detector_id]
    exc = await client_error(lambda: gd.get_detector(DetectorId=detector_id))
    assert exc.response["Error"]["Code"] == raised.code
    assert exc.response["Error"]["Message"] == raised.message
    assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == raised.status
    # botocore's own wording, which logs and the CLI show (with a retry note when retries are configured off)
    assert re.fullmatch(
        rf"An error occurred \({raised.code}\) when calling the GetDetector operation"
        rf"( \(reached max retries: 0\))?: {re.escape(raised.message)}",
        str(exc),
    ), str(exc)
    modeled = getattr(gd.exceptions, raised.code, None)
    if raised.code in ("BadRequestException", "AccessDeniedException", "InternalServerErrorException"):
        # the service model's own exception classes, as code written against GuardDuty catches them
        assert modeled is not None and isinstance(exc, modeled)


def test_error_codes_and_statuses_are_awss() -> None:
    assert (ResourceNotFound().code, ResourceNotFound().status, ResourceNotFound().message) == (
        "BadRequestException",
        400,
        DETECTOR_NOT_OWNED,
    )
    got = {
        type(e).__name__: (e.code, e.status)
        for e in (
            BadRequest("m"),
            AccessDenied("m"),
            InternalServerError("m"),
            Throttling(),
            MissingAuthenticationToken("m"),
            IncompleteSignature("m"),
            InvalidSignature("m"),
            UnrecognizedClient("m"),
        )
    }
    assert got == {
        "BadRequest": ("BadRequestException", 400),
        "AccessDenied": ("AccessDeniedException", 403),
        "InternalServerError": ("InternalServerErrorException", 500),
        "Throttling": ("ThrottlingException", 429),
        "MissingAuthenticationToken": ("MissingAuthenticationTokenException", 403),
        "IncompleteSignature": ("IncompleteSignatureException", 400),
        "InvalidSignature": ("InvalidSignatureException", 403),
        "UnrecognizedClient": ("UnrecognizedClientException", 403),
    }
    resp = BadRequest("nope").response()
    assert resp.headers["x-amzn-ErrorType"] == "BadRequestException"
    assert resp.content_type == "application/json"
    assert isinstance(resp.body, bytes)
    assert orjson.loads(resp.body) == {"message": "nope", "__type": "BadRequestException"}


# -- the aws CLI ------------------------------------------------------------------------------------------------


async def test_cli_good_signature_lists_detectors(api: SignedApi, aws_env: dict[str, str]) -> None:
    rc, out, err = await run_cli(aws_env, api.url, "guardduty", "list-detectors", "--page-size", "5")
    assert rc == 0, err
    assert orjson.loads(out) == {"DetectorIds": ["d1"]}
    [seen] = api.seen
    assert seen["query"] == {"maxResults": "5"}
    assert seen["principal"] == Principal(KEY_ID, ACCOUNT, REGION)


async def test_cli_post_with_json_body(api: SignedApi, aws_env: dict[str, str]) -> None:
    rc, _, err = await run_cli(
        aws_env,
        api.url,
        "guardduty",
        "list-findings",
        "--detector-id",
        "d1",
        "--finding-criteria",
        '{"Criterion": {"severity": {"Gte": 7}}}',
    )
    assert rc == 0, err
    assert api.seen[0]["body"]["findingCriteria"] == {"criterion": {"severity": {"gte": 7}}}


def assert_cli_error(rc: int | None, err: str, code: str, operation: str, fragment: str) -> None:
    # the CLI's exit code for an error the service returned: 255 in aws-cli v1 (installed here), 254 in v2
    assert rc in (254, 255), (rc, err)
    assert f"An error occurred ({code}) when calling the {operation} operation: " in err, err
    assert fragment in err, err


async def test_cli_wrong_secret(api: SignedApi, aws_env: dict[str, str]) -> None:
    rc, _, err = await run_cli(aws_env, api.url, "guardduty", "list-detectors", secret="not-the-secret")
    assert_cli_error(rc, err, "InvalidSignatureException", "ListDetectors", "does not match the signature")


async def test_cli_unknown_key(api: SignedApi, aws_env: dict[str, str]) -> None:
    rc, _, err = await run_cli(aws_env, api.url, "guardduty", "list-detectors", key_id="AKIAUNKNOWN000000000")
    assert_cli_error(rc, err, "UnrecognizedClientException", "ListDetectors", "AKIAUNKNOWN000000000")


async def test_cli_tampered_body(api: SignedApi, aws_env: dict[str, str]) -> None:
    relay = TamperingRelay(int(api.url.rsplit(":", 1)[1]), b'"gte": 7', b'"gte": 1')
    try:
        url = await relay.start()
        args = ["guardduty", "list-findings", "--detector-id", "d1"]
        rc, _, err = await run_cli(aws_env, url, *args, "--finding-criteria", '{"Criterion": {"severity": {"Gte": 7}}}')
        assert relay.rewrites == 1
        assert_cli_error(rc, err, "InvalidSignatureException", "ListFindings", "does not match the signature")
        assert api.seen == []
    finally:
        await relay.close()


async def test_cli_stale_date(serve: Any, aws_env: dict[str, str]) -> None:
    api = await serve(SigV4Verifier(lookup, clock=lambda: time.time() + 3600))
    rc, _, err = await run_cli(aws_env, api.url, "guardduty", "list-detectors")
    assert_cli_error(rc, err, "InvalidSignatureException", "ListDetectors", "Signature expired")


async def test_cli_unsigned_request(api: SignedApi, aws_env: dict[str, str]) -> None:
    rc, _, err = await run_cli(aws_env, api.url, "guardduty", "list-detectors", "--no-sign-request")
    assert_cli_error(rc, err, "MissingAuthenticationTokenException", "ListDetectors", "no Authorization header")


async def test_cli_wrong_service_in_scope(api: SignedApi, aws_env: dict[str, str]) -> None:
    rc, _, err = await run_cli(aws_env, api.url, "inspector2", "list-findings")
    assert_cli_error(rc, err, "InvalidSignatureException", "ListFindings", "scoped to correct service: 'guardduty'")


# -- the verifier on requests built by hand (botocore's signer, then edits) --------------------------------------


def signed(
    method: str = "GET",
    url: str = "http://127.0.0.1:8080/detector",
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    when: float = 1_700_000_000.0,
    service: str = "guardduty",
) -> tuple[str, str, str, CIMultiDictProxy[str]]:
    """(raw path, raw query, ...) and the headers of a request botocore signed at ``when``."""
    req = AWSRequest(method=method, url=url, data=body)
    for name, value in headers or []:
        req.headers[name] = value  # HTTPHeaders appends: a name given twice is a repeated header
    req.context["timestamp"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    auth = SigV4Auth(Credentials(KEY_ID, SECRET), service, REGION)
    auth._modify_request_before_signing(req)
    creq = auth.canonical_request(req)
    sig = auth.signature(auth.string_to_sign(req, creq), req)
    auth._inject_signature_to_request(req, sig)
    path, _, query = url.split("/", 3)[3].partition("?")
    hdrs = CIMultiDict([(k, v.decode() if isinstance(v, bytes) else v) for k, v in req.headers.items()])
    hdrs.setdefault("Host", "127.0.0.1:8080")
    return "/" + path, query, method, CIMultiDictProxy(hdrs)


def verifier_at(when: float = 1_700_000_000.0) -> SigV4Verifier:
    return SigV4Verifier(lookup, clock=lambda: when)


async def test_aws_sigv4_test_suite_get_vanilla() -> None:
    """AWS's published SigV4 test vector 'get-vanilla' (aws-sig-v4-test-suite)."""
    when = calendar.timegm((2015, 8, 30, 12, 36, 0))

    async def example_key(key_id: str) -> tuple[str, str] | None:
        return ("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", ACCOUNT) if key_id == "AKIDEXAMPLE" else None

    headers = CIMultiDictProxy(
        CIMultiDict(
            {
                "Host": "example.amazonaws.com",
                "X-Amz-Date": "20150830T123600Z",
                "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
                "SignedHeaders=host;x-amz-date, "
                "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            }
        )
    )
    verifier = SigV4Verifier(example_key, service="service", clock=lambda: when)
    assert await verifier.verify("GET", "/", "", headers, b"") == Principal("AKIDEXAMPLE", ACCOUNT, "us-east-1")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/detector/abc/filter/a%20b%2Bc%2F%25d",
        "http://127.0.0.1:8080/detector/abc/./findings/../findings",
        "http://127.0.0.1:8080//detector//abc/",
        "http://127.0.0.1:8080/detector?b=2&a=1&a=0&empty=&flag",
        "http://127.0.0.1:8080/detector?nextToken=x%2By%3D%3D&sp=a%20b&tilde=~",
    ],
)
async def test_paths_and_queries_verify_as_botocore_signs_them(url: str) -> None:
    path, query, method, headers = signed(url=url)
    principal = await verifier_at().verify(method, path, query, headers, b"")
    assert principal.account_id == ACCOUNT


async def test_repeated_headers_are_joined_as_signed() -> None:
    path, query, method, headers = signed(headers=[("X-Custom", "  a   b  "), ("X-Custom", "c")])
    assert headers.getall("X-Custom") == ["  a   b  ", "c"]
    assert "x-custom" in headers["Authorization"]
    assert await verifier_at().verify(method, path, query, headers, b"")
    # the same values in one header, joined as SigV4 joins them, sign the same
    assert await verifier_at().verify(method, path, query, with_header(headers, "X-Custom", "a b,c"), b"")
    for changed in ("a c,c", "c,a b"):
        with pytest.raises(InvalidSignature):
            await verifier_at().verify(method, path, query, with_header(headers, "X-Custom", changed), b"")


async def test_date_header_is_used_when_x_amz_date_is_absent() -> None:
    path, query, method, headers = signed(headers=[("Date", "Tue, 14 Nov 2023 22:13:20 GMT")])
    assert "X-Amz-Date" not in headers
    assert "Date" in headers
    assert await verifier_at().verify(method, path, query, headers, b"")


async def test_content_sha256_header_is_checked_against_the_body() -> None:
    body = b'{"findingIds": ["a"]}'
    digest = hashlib.sha256(body).hexdigest()
    path, query, method, headers = signed("POST", body=body, headers=[("X-Amz-Content-SHA256", digest)])
    assert await verifier_at().verify(method, path, query, headers, body)
    with pytest.raises(InvalidSignature, match="x-amz-content-sha256 does not match the SHA-256 of the body"):
        await verifier_at().verify(method, path, query, headers, b'{"findingIds": ["b"]}')
    path, query, method, headers = signed("POST", body=body, headers=[("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD")])
    with pytest.raises(IncompleteSignature, match="does not accept unsigned or streaming payloads"):
        await verifier_at().verify(method, path, query, headers, body)


async def test_presigned_query_is_refused_with_its_reason() -> None:
    query = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=x&X-Amz-Signature=00"
    with pytest.raises(MissingAuthenticationToken, match="presigned URLs"):
        await verifier_at().verify("GET", "/detector", query, CIMultiDictProxy(CIMultiDict(Host="h")), b"")


def with_header(headers: CIMultiDictProxy[str], name: str, value: str | None) -> CIMultiDictProxy[str]:
    out = CIMultiDict(headers)
    out.popall(name, None)
    if value is not None:
        out[name] = value
    return CIMultiDictProxy(out)


def rewrite_auth(headers: CIMultiDictProxy[str], old: str, new: str) -> CIMultiDictProxy[str]:
    assert old in headers["Authorization"]
    return with_header(headers, "Authorization", headers["Authorization"].replace(old, new))


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda h: with_header(h, "Authorization", "Bearer abc"), IncompleteSignature, "scheme 'Bearer'"),
        (
            lambda h: with_header(h, "Authorization", h["Authorization"].replace("AWS4-HMAC", "AWS4-ECDSA-P256")),
            IncompleteSignature,
            "accepts AWS4-HMAC-SHA256",
        ),
        (lambda h: rewrite_auth(h, "Signature=", "Sig="), IncompleteSignature, "requires 'Signature' parameter"),
        (
            lambda h: with_header(h, "Authorization", "AWS4-HMAC-SHA256 Foo=1"),
            IncompleteSignature,
            "requires 'Credential', 'SignedHeaders', 'Signature' parameters",
        ),
        (lambda h: rewrite_auth(h, "/aws4_request", "/aws4"), IncompleteSignature, "Credential must have the form"),
        (lambda h: rewrite_auth(h, "/20231114/", "/2023-11-14/"), IncompleteSignature, "date must be YYYYMMDD"),
        (lambda h: rewrite_auth(h, "/20231114/", "/20231113/"), InvalidSignature, "'20231113' != '20231114'"),
        (lambda h: rewrite_auth(h, "host;x-amz-date", "x-amz-date"), IncompleteSignature, "'host' must be among"),
        (lambda h: rewrite_auth(h, "host;x-amz-date", "host"), IncompleteSignature, "'x-amz-date' must be among"),
        (lambda h: rewrite_auth(h, "host;x-amz-date", "Host;X-Amz-Date"), IncompleteSignature, "lowercase"),
        (
            lambda h: rewrite_auth(h, "host;x-amz-date", "host;x-amz-date;x-missing"),
            IncompleteSignature,
            "'x-missing' is in SignedHeaders but not in the request",
        ),
        (lambda h: rewrite_auth(h, "Signature=", "Signature=zz"), IncompleteSignature, "64 lowercase hex"),
        (lambda h: with_header(h, "X-Amz-Date", None), IncompleteSignature, "either a 'X-Amz-Date' or a 'Date'"),
        (lambda h: with_header(h, "X-Amz-Date", "2023-11-14T22:13:20Z"), IncompleteSignature, "YYYYMMDDTHHMMSSZ"),
        (lambda h: rewrite_auth(h, f"/{REGION}/", "/EU_WEST/"), InvalidSignature, "valid region"),
        (lambda h: rewrite_auth(h, KEY_ID, "AKIA/../x"), IncompleteSignature, "Credential must have the form"),
        (lambda h: rewrite_auth(h, KEY_ID, "AKIA;DROP"), UnrecognizedClient, "'AKIA;DROP' is not one"),
        (lambda h: with_header(h, "Host", "evil.example"), InvalidSignature, "host:evil.example"),
    ],
)
async def test_malformed_or_altered_signatures_are_refused_with_a_clear_message(
    edit: Callable[[CIMultiDictProxy[str]], CIMultiDictProxy[str]], error: type[ApiError], message: str
) -> None:
    path, query, method, headers = signed()
    assert await verifier_at().verify(method, path, query, headers, b"")  # the unedited request passes
    with pytest.raises(error) as info:
        await verifier_at().verify(method, path, query, edit(headers), b"")
    assert message in info.value.message


async def test_lookup_is_not_asked_for_a_request_refused_earlier() -> None:
    asked: list[str] = []

    async def counting_lookup(key_id: str) -> tuple[str, str] | None:
        asked.append(key_id)
        return KEYS.get(key_id)

    path, query, method, headers = signed(service="s3")
    with pytest.raises(InvalidSignature, match="correct service"):
        await SigV4Verifier(counting_lookup, clock=lambda: 1_700_000_000.0).verify(method, path, query, headers, b"")
    assert asked == []

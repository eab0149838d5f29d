"""AWS for tests: moto in server mode on 127.0.0.1:<free port>, driven over real HTTP by real boto3 clients.

A pytest plugin (``pytest_plugins = ["moto_server"]``). One server per session (it starts in about a second);
``moto_endpoint`` resets every backend before each test through moto's own ``/moto-api/reset``, so tests never
see each other's clusters, roles or repositories. Fake credentials and no shared config files: nothing here can
reach a real account.
"""

from __future__ import annotations

import io
import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.config import Config

from backend.manager.aws import AwsConfig

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account id


@dataclass
class ThrottleRule:
    action: str  # the API operation, e.g. "ListServices", "DescribeVpcs", "GetRole"
    remaining: int
    code: str


class Throttler:
    """WSGI middleware in front of moto: answers the next N calls of an operation with AWS's throttling error.

    moto never throttles, and the manager's backoff must be tested against the real error shapes botocore parses:
    JSON protocols (ECS, ECR: ``__type``), EC2's XML (``Response/Errors/Error``, HTTP 503) and the query XML of
    IAM/STS (``ErrorResponse/Error``).
    """

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.rules: list[ThrottleRule] = []
        self.throttled: list[str] = []
        self.lock = threading.Lock()

    def add(self, action: str, times: int, code: str) -> None:
        with self.lock:
            self.rules.append(ThrottleRule(action, times, code))

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.throttled.clear()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not self.rules:
            return self.app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        form = {} if target else dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
        action = target.rsplit(".", 1)[-1] if target else form.get("Action", "")
        with self.lock:
            rule = next((r for r in self.rules if r.action == action and r.remaining > 0), None)
            if rule is not None:
                rule.remaining -= 1
                self.throttled.append(action)
        if rule is None:
            return self.app(environ, start_response)
        if target:
            status, ctype = "400 Bad Request", "application/x-amz-json-1.1"
            payload = json.dumps({"__type": rule.code, "message": "Rate exceeded"}).encode()
        elif form.get("Version") == "2016-11-15":  # EC2
            status, ctype = "503 Service Unavailable", "text/xml"
            payload = (
                f"<Response><Errors><Error><Code>{rule.code}</Code><Message>Request limit exceeded."
                "</Message></Error></Errors><RequestID>throttled</RequestID></Response>"
            ).encode()
        else:
            status, ctype = "400 Bad Request", "text/xml"
            payload = (
                f"<ErrorResponse><Error><Type>Sender</Type><Code>{rule.code}</Code><Message>Rate exceeded"
                "</Message></Error><RequestId>throttled</RequestId></ErrorResponse>"
            ).encode()
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(payload)))])
        return [payload]


class MotoServer:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        throttler_slot: list[Throttler] = []

        class _Server(ThreadedMotoServer):
            """ThreadedMotoServer with the Throttler in front of moto's WSGI app."""

            def _server_entry(self) -> None:
                from moto.moto_server.werkzeug_app import (
                    DomainDispatcherApplication,
                    MotoRequestHandler,
                    create_backend_app,
                )
                from werkzeug.serving import make_server

                app = Throttler(DomainDispatcherApplication(create_backend_app))
                throttler_slot.append(app)
                self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
                self._server_ready_event.set()
                self._server.serve_forever()

        self._server = _Server(ip_address="127.0.0.1", port=0, verbose=False)
        self._throttler_slot = throttler_slot
        self.url = ""

    @property
    def throttler(self) -> Throttler:
        return self._throttler_slot[0]

    def start(self) -> MotoServer:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def _post(self, path: str, body: dict[str, Any] | None = None) -> bytes:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def reset(self) -> None:
        self.throttler.clear()
        self._post("/moto-api/reset")


class MotoEndpoint:
    """What a test gets: the URL, an AwsConfig for the manager's code, and boto3 clients against it."""

    def __init__(self, server: MotoServer) -> None:
        self.server = server
        self.url = server.url
        self.region = REGION
        self.account = ACCOUNT
        self._clients: dict[tuple[str, str], Any] = {}

    def config(self, region: str | None = None, **kwargs: Any) -> AwsConfig:
        # one botocore attempt: the tests that throttle want to see the manager's own backoff
        return AwsConfig(region=region or self.region, endpoint_url=self.url, botocore_max_attempts=1, **kwargs)

    def client(self, service: str, region: str | None = None) -> Any:
        """A plain boto3 client (one attempt, no retries) for arranging and checking state; one per service and
        region per test, since building a client costs a tenth of a second."""
        key = (service, region or self.region)
        if key not in self._clients:
            self._clients[key] = boto3.session.Session(region_name=key[1]).client(
                service, endpoint_url=self.url, config=Config(retries={"total_max_attempts": 1})
            )
        return self._clients[key]

    def throttle(self, action: str, times: int, code: str = "ThrottlingException") -> None:
        """The next ``times`` calls of ``action`` get AWS's throttling error ``code`` (see Throttler)."""
        self.server.throttler.add(action, times, code)

    @property
    def throttled(self) -> list[str]:
        """The operations answered with a throttling error so far in this test, in order."""
        return list(self.server.throttler.throttled)

    def cli_args(self, region: str | None = None) -> list[str]:
        """The manager's common flags pointing at this server."""
        return ["--region", region or self.region, "--endpoint-url", self.url]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def moto_endpoint(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> MotoEndpoint:
    """A clean moto (every service reset) and an environment whose boto3 sessions can only reach it."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    moto_server.reset()
    return MotoEndpoint(moto_server)

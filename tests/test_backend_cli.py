"""`runtime-backend` as an operator runs it: tokens, keys, policies, serve, and the one-command local mode."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from backend_env import VENV_BIN, aws_env

BACKEND = str(VENV_BIN / "runtime-backend")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _cli(db: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BACKEND, "--database-url", db, "--log-level", "WARNING", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 30) -> tuple[re.Match[str], str]:
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen += line
        m = re.search(pattern, seen)
        if m:
            return m, seen
    raise AssertionError(f"{pattern!r} not printed; got:\n{seen}\nstderr: {proc.stderr.read() if proc.stderr else ''}")


def test_tokens_are_created_listed_and_revoked_without_showing_secrets(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'b.db'}"
    out = _cli(db, "token", "create", "--account", "111111111111", "--cluster", "prod", "--region", "eu-west-1")
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    assert created["token"].startswith("rtm_") and created["clusterName"] == "prod"
    listed = json.loads(_cli(db, "token", "list").stdout)
    assert [t["tokenId"] for t in listed] == [created["tokenId"]]
    assert created["token"] not in json.dumps(listed) and listed[0]["revokedAt"] is None
    assert _cli(db, "token", "revoke", created["tokenId"]).returncode == 0
    assert json.loads(_cli(db, "token", "list").stdout)[0]["revokedAt"] is not None
    again = _cli(db, "token", "revoke", created["tokenId"])
    assert again.returncode == 1 and "no active token" in again.stderr
    bad = _cli(db, "token", "create", "--account", "12345", "--cluster", "prod")
    assert bad.returncode == 2 and "12 digits" in bad.stderr and "Traceback" not in bad.stderr


def test_bad_settings_and_policies_exit_2_with_the_reason(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'b.db'}"
    out = _cli(db, "serve", env={"RUNTIME_BACKEND_PORT": "eighty"})
    assert out.returncode == 2 and "RUNTIME_BACKEND_PORT" in out.stderr
    out = _cli("mysql://x", "migrate")
    assert out.returncode == 2 and "RUNTIME_BACKEND_DATABASE_URL" in out.stderr
    policy = tmp_path / "policy.yaml"
    policy.write_text("exceptions:\n  - type: Nope:Runtime/Thing\n    reason: x\n")
    out = _cli(db, "policy", "set", "--account", "111111111111", str(policy))
    assert out.returncode == 2 and "Nope:Runtime/Thing" in out.stderr and "Traceback" not in out.stderr
    policy.write_text("threat_lists:\n  - path: /etc/hosts\n")
    out = _cli(db, "policy", "set", "--account", "111111111111", str(policy))
    assert out.returncode == 2 and "ThreatIntelSet" in out.stderr and "Traceback" not in out.stderr
    policy.write_text("exceptions:\n  - image: 'registry.example/ci-runner:*'\n    reason: CI runners run shells\n")
    out = _cli(db, "policy", "set", "--account", "111111111111", "--cluster", "ci", str(policy))
    assert out.returncode == 0, out.stderr
    shown = json.loads(_cli(db, "policy", "show", "--account", "111111111111", "--cluster", "ci").stdout)
    assert shown["exceptions"][0]["reason"] == "CI runners run shells"


def test_serve_answers_the_aws_cli_and_stops_on_sigterm(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'b.db'}"
    key = json.loads(_cli(db, "access-key", "create", "--account", "111111111111", "--region", "us-east-1").stdout)
    proc = subprocess.Popen(
        [BACKEND, "--database-url", db, "serve", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        m, _ = _read_until(proc, r"listening on (http://127\.0\.0\.1:\d+)")
        url = m.group(1)
        aws = subprocess.run(
            [str(VENV_BIN / "aws"), "guardduty", "list-detectors", "--endpoint-url", url],
            env=aws_env(tmp_path, key["accessKeyId"], key["secretAccessKey"], "us-east-1"),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert aws.returncode == 0, aws.stderr
        assert json.loads(aws.stdout)["DetectorIds"] == [key["detectorId"]]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_local_mode_prints_a_working_aws_command(tmp_path: Path) -> None:
    """The README's first command: the backend and its credentials, and a command that works as printed."""
    proc = subprocess.Popen(
        [BACKEND, "local", "--port", "0", "--state-dir", str(tmp_path / "state"), "--no-sidecar"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        m, banner = _read_until(proc, r"\n  (aws guardduty list-findings [^\n]+)\n")
        export = re.search(
            r"export (AWS_ACCESS_KEY_ID=\S+) (AWS_SECRET_ACCESS_KEY=\S+) (AWS_DEFAULT_REGION=\S+)", banner
        )
        assert export is not None, banner
        env = aws_env(tmp_path, "", "", "")
        env.update(dict(kv.split("=", 1) for kv in export.groups()))
        aws = subprocess.run(shlex.split(m.group(1)), env=env, capture_output=True, text=True, timeout=60)
        assert aws.returncode == 0, aws.stderr
        assert json.loads(aws.stdout) == {"FindingIds": []}
        assert (tmp_path / "state" / "credentials.json").stat().st_mode & 0o077 == 0
        # the console has an operator whose password is printed, and it is not open without it
        console = re.search(r"console: (http://\S+)/console\s+user (\S+), password (\S+)", banner)
        assert console is not None, banner
        base, user, password = console.groups()
        opener = urllib.request.build_opener(_NoRedirect)
        for pw, status in ((password + "x", 200), (password, 303)):  # a wrong password shows the form again
            form = urllib.parse.urlencode({"username": user, "password": pw}).encode()
            req = urllib.request.Request(f"{base}/console/login", data=form, method="POST", headers={"Origin": base})
            try:
                got = opener.open(req, timeout=30).status
            except urllib.error.HTTPError as exc:
                got = exc.code
            assert got in ((status,) if status == 303 else (200, 401, 403)), (pw, got)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0

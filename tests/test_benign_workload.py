"""False alarms: ordinary work in a task must not raise any finding of severity >= 4 (Medium or High).

Staged for real in the emulated task, with every source and detector on: coreutils loops, a web server under load
with health checks, git, tar, a venv with pip installing a local package and running its entry point, a shell
entrypoint with `sh -c`, and ordinary DNS lookups answered by a local resolver. Low-severity findings are allowed
(GuardDuty's Low is "worth a look"), and printed so a reviewer sees them.
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import Any

from dns_responder import DnsResponder
from taskenv import TaskEnv

PY = "/usr/bin/python3"
RESOLVER = "127.53.4.1"  # a loopback address no other test uses

BENIGN_NAMES = [
    "example.com",
    "s3.us-east-1.amazonaws.com",
    "ecr.us-east-1.amazonaws.com",
    "api.github.com",
    "pypi.org",
    "files.pythonhosted.org",
    "d3a1b2c4e5f6g7.cloudfront.net",
    "orders-service.prod.local",
    "db-primary.cluster-c1a2b3c4d5e6.us-east-1.rds.amazonaws.com",
    "sqs.us-east-1.amazonaws.com",
    "logs.us-east-1.amazonaws.com",
    "www.google.com",
    "registry-1.docker.io",
    "redis-cache.abcdef.0001.use1.cache.amazonaws.com",
]


def make_wheel(dest: Path) -> Path:
    """A real wheel of a tiny package with a console script (pip installs it offline; no build step needed)."""
    wheel = dest / "hello_tool-1.0-py3-none-any.whl"
    files = {
        "hello_tool/__init__.py": "def main():\n    print('hello')\n",
        "hello_tool-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: hello-tool\nVersion: 1.0\n",
        "hello_tool-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        "hello_tool-1.0.dist-info/entry_points.txt": "[console_scripts]\nhello-tool = hello_tool:main\n",
    }
    record = [f"{name},," for name in files] + ["hello_tool-1.0.dist-info/RECORD,,"]
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("hello_tool-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


def ours(finding: dict[str, Any]) -> bool:
    containers = finding["resource"]["ecsClusterDetails"]["taskDetails"].get("containers") or []
    if any(c.get("name") in ("app", "worker") for c in containers):
        return True
    dns = (finding["service"].get("action") or {}).get("dnsRequestAction") or {}
    return str(dns.get("domain", "")).rstrip(".") in BENIGN_NAMES


def test_ordinary_work_raises_nothing_medium_or_high(task_env: TaskEnv, tmp_path: Path) -> None:
    for c in ("app", "worker"):
        task_env.path_in(c, "/etc/resolv.conf").write_text(f"nameserver {RESOLVER}\noptions timeout:1 attempts:1\n")
    make_wheel(task_env.path_in("app", "/tmp"))
    www = task_env.path_in("app", "/tmp/www")
    www.mkdir()
    (www / "health").write_text("ok\n")
    (www / "index.html").write_text("<h1>shop</h1>\n" * 50)
    with DnsResponder(RESOLVER, default="10.0.3.7"):
        sidecar = task_env.start_detecting(tmp_path)
        # an entrypoint script, as images have them, starting a web server
        task_env.run(
            "app",
            ["sh", "-c", f"cd /tmp/www && exec {PY} -m http.server 8081 --bind 127.0.0.1 >/tmp/www.log 2>&1"],
            wait=False,
        )
        time.sleep(1.5)
        # load: a client loop and health checks with curl and wget
        load = (
            "import urllib.request\n"
            "for i in range(300):\n"
            "    urllib.request.urlopen('http://127.0.0.1:8081/index.html').read()\n"
        )
        task_env.run("worker", [PY, "-c", load], timeout=60)
        for _ in range(5):
            task_env.run("worker", ["sh", "-c", "curl -fsS http://127.0.0.1:8081/health >/dev/null"])
            task_env.run("worker", ["wget", "-q", "-O", "/tmp/health.out", "http://127.0.0.1:8081/health"])
        # coreutils loops
        task_env.run(
            "app",
            [
                "sh",
                "-c",
                "for i in $(seq 1 100); do ls /etc >/dev/null; cat /etc/hostname >/dev/null; date +%s >/dev/null;"
                " wc -l /etc/passwd >/dev/null; head -c 100 /etc/os-release | sha256sum >/dev/null;"
                " echo $i | base64 >/dev/null; done",
            ],
            timeout=60,
        )
        # git and tar
        rc, out = task_env.run(
            "worker",
            [
                "sh",
                "-c",
                "set -e; export HOME=/tmp; cd /tmp; git init -q repo; cd repo; echo a > a.txt;"
                " git add a.txt; git -c user.email=a@b -c user.name=a commit -qm one; git log --oneline >/dev/null;"
                " git clone -q /tmp/repo /tmp/clone; cd /tmp; tar czf /tmp/etc.tgz -C / etc 2>/dev/null || true;"
                " mkdir -p /tmp/x && tar xzf /tmp/etc.tgz -C /tmp/x; rm -rf /tmp/x; echo done",
            ],
            timeout=60,
        )
        assert rc == 0 and "done" in out, out
        # a venv, pip installing a local package, running its entry point
        rc, out = task_env.run(
            "app",
            [
                "sh",
                "-c",
                f"set -e; {PY} -m venv /tmp/venv; /tmp/venv/bin/pip install -q --no-index"
                " /tmp/hello_tool-1.0-py3-none-any.whl >/tmp/pip.log 2>&1; /tmp/venv/bin/hello-tool",
            ],
            timeout=120,
        )
        assert rc == 0 and "hello" in out, out
        # ordinary DNS lookups through the resolver
        for name in BENIGN_NAMES:
            task_env.run("worker", ["getent", "hosts", name])
        task_env.run("app", [PY, "-c", "import socket; socket.getaddrinfo('example.com', 443)"])
        time.sleep(3)
        assert sidecar.stop() == 0
        events = sidecar.events()
        assert sum(1 for e in events if e["kind"] == "dns.query") >= len(BENIGN_NAMES), "DNS was seen"
        # the workload was seen (polling may miss a few of its shortest processes, not all)
        seen = {e["process"]["name"] for e in events if e["kind"] == "process.exec"}
        assert seen & {"git", "git-upload-pack", "tar", "gzip"} and seen & {"pip", "hello-tool", "python3"}, seen
        # The task shares the host's network namespace (the test machine's): DNS from elsewhere on the machine
        # (other tests running at the same time) is seen too, with no container. Judge what this test staged.
        findings = [f for f in sidecar.findings() if ours(f)]
        loud = [(f["type"], f["severity"], f["description"]) for f in findings if f["severity"] >= 4]
        assert not loud, loud
        for f in findings:
            print("low-severity finding:", f["type"], f["description"])

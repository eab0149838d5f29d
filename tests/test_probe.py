"""The probe's answers on this host (the initial PID namespace); the emulated-task answers are in test_sidecar_task."""

from __future__ import annotations

import subprocess
import sys

import orjson

from collectors import capabilities


def test_probe_on_the_host_finds_the_proc_connector() -> None:
    assert capabilities.in_initial_pid_namespace(), "the tests expect to run in the host's initial PID namespace"
    r = subprocess.run([sys.executable, "-m", "sidecar", "probe"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    report = orjson.loads(r.stdout)
    assert report["pidNamespace"]["initial"] is True
    assert report["sources"]["proc_connector"] == {
        "available": True,
        "reason": "initial PID namespace with NET_ADMIN; a test fork was seen",
    }
    assert report["sources"]["proc_poll"]["available"] is True
    assert report["selected"]["process"] == "proc_connector"


def test_probe_without_net_admin_says_so() -> None:
    # the same host, the same namespace, NET_ADMIN dropped: the connector is refused with its reason
    r = subprocess.run(
        ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", sys.executable, "-m", "sidecar", "probe"],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    report = orjson.loads(r.stdout)
    assert "NET_ADMIN" not in report["capabilities"]
    assert report["sources"]["proc_connector"]["available"] is False
    assert "NET_ADMIN" in report["sources"]["proc_connector"]["reason"]
    assert report["selected"]["process"] == "proc_poll"


def test_probe_without_ptrace_reports_degraded_polling() -> None:
    # another uid's process is unreadable without SYS_PTRACE once we are not its owner
    victim = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "30"])
    try:
        r = subprocess.run(
            ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--inh-caps=-all",
             sys.executable, "-m", "sidecar", "probe"],
            capture_output=True,
            timeout=60,
        )  # fmt: skip
    finally:
        victim.kill()
        victim.wait()
    assert r.returncode == 0, r.stderr
    report = orjson.loads(r.stdout)
    poll = report["sources"]["proc_poll"]
    assert poll["available"] is True and poll.get("degraded") is True
    assert "SYS_PTRACE" in poll["reason"]
    assert poll["details"]["exeDenied"] > 0

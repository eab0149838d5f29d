"""Reading findings (GuardDuty shape) in tests: the parts tests look at, without repeating the paths."""

from __future__ import annotations

from typing import Any

from taskenv import SidecarHandle


def context_of(f: dict[str, Any]) -> dict[str, Any]:
    return dict((f["service"].get("runtimeDetails") or {}).get("context") or {})


def process_of(f: dict[str, Any]) -> dict[str, Any]:
    return dict((f["service"].get("runtimeDetails") or {}).get("process") or {})


def container_of(f: dict[str, Any]) -> str | None:
    containers = f["resource"]["ecsClusterDetails"]["taskDetails"].get("containers") or []
    return containers[0].get("name") if containers else None


def of_type(sidecar: SidecarHandle, ftype: str) -> list[dict[str, Any]]:
    return [f for f in sidecar.findings() if f["type"] == ftype]


def dns_domain(f: dict[str, Any]) -> str | None:
    dns = (f["service"].get("action") or {}).get("dnsRequestAction") or {}
    d = dns.get("domain")
    return str(d).rstrip(".") if d is not None else None


def remote_ip(f: dict[str, Any]) -> str | None:
    net = (f["service"].get("action") or {}).get("networkConnectionAction") or {}
    ips = net.get("remoteIpDetails") or {}
    return ips.get("ipAddressV4") or ips.get("ipAddressV6")

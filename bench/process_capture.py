"""Process capture benchmark: catch rate by lifetime and rate, CPU, RSS, cost to the workload.

    python -m bench process [--quick]

"task" runs the sidecar with the polling source in a fresh PID namespace,
with Fargate's capability set (Docker defaults + SYS_PTRACE); "host" runs it
with the proc connector in the initial namespace.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def _inside(what: str, params: dict[str, Any], in_task: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench._inside", what, json.dumps(params)]
    if in_task:
        cmd = ["unshare", "--pid", "--fork", "--mount", "--propagation", "private", "--mount-proc", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {r.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def run(quick: bool = False) -> dict[str, Any]:
    per_class = 100 if quick else 200
    base = {"rates": [100, 1000], "lifetimes": [0, 0.005, 0.01, 0.1], "per_class": per_class,
            "idle_seconds": 5 if quick else 20, "caps": True}  # fmt: skip
    results: dict[str, Any] = {}
    results["task_poll"] = _inside("capture", {**base, "source": "proc_poll"}, in_task=True)
    results["host_connector"] = _inside("capture", {**base, "source": "proc_connector", "caps": False}, in_task=False)
    cost = {"loop_spawns": 1000 if quick else 3000, "rounds": 3 if quick else 5}
    results["cost_task_poll"] = _inside("cost", {**cost, "source": "proc_poll", "caps": True}, in_task=True)
    results["cost_host_connector"] = _inside("cost", {**cost, "source": "proc_connector", "caps": False}, in_task=False)
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        "| setup | rate/s | ≈1 ms | 5 ms | 10 ms | 100 ms | sidecar CPU under load |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in (("task_poll", "task, /proc polling"), ("host_connector", "host, proc connector")):
        r = results[key]
        by_rate: dict[int, dict[float, Any]] = {}
        for c in r["classes"]:
            by_rate.setdefault(c["rate"], {})[c["lifetime_ms"]] = c
        for rate, cls in by_rate.items():
            cells = [f"{cls[ms]['caught_pct']}%" for ms in sorted(cls)]
            cpu = max(c["load_cpu_pct"] for c in cls.values())
            ach = min(c["achieved_rate"] for c in cls.values())
            lines.append(f"| {label} | {rate} (achieved ≥{ach}) | {' | '.join(cells)} | ≤{cpu}% of a core |")
    lines.append("")
    lines.append("| setup | idle CPU | peak RSS | workload slowdown, pinned to one CPU |")
    lines.append("|---|---|---|---|")
    for key, cost, label in (("task_poll", "cost_task_poll", "task, /proc polling"),
                             ("host_connector", "cost_host_connector", "host, proc connector")):  # fmt: skip
        r, c = results[key], results[cost]
        detail = f"{c['without_s']} s → {c['with_s']} s for {c['spawns']} spawns, median of {c['rounds']}"
        lines.append(
            f"| {label} | {r['idle_cpu_pct']}% of a core | {r['peak_rss_mb']} MB | {c['slowdown_pct']}% ({detail}) |"
        )
    return "\n".join(lines)

"""Benchmarks: they print figures, they do not assert them (these machines are noisy)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def main_for(name: str, title: str, run: Callable[..., Any], report: Callable[[Any], str]) -> None:
    """The shared `python -m bench.<name> [--quick]`: run, save the JSON under bench/results/, print the figures."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = run(quick=args.quick)
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}-{started}.json").write_text(json.dumps(results, indent=2))
    print(f"# {title} ({started}, {'quick' if args.quick else 'full'})\n")
    print(report(results))

"""`python -m bench [process|packets|sockets] [--quick]`: run benchmarks, print figures (markdown).

`process` also saves its JSON under bench/results/. The others are their own
modules (`python -m bench.packets`, `python -m bench.sockets`), run from here
with the same flag.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path

from bench import process_capture


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument(
        "suite",
        nargs="?",
        default="process",
        choices=["process", "packets", "sockets", "intel", "detectors", "backend", "delivery"],
    )
    p.add_argument("--quick", action="store_true", help="fewer samples, shorter windows")
    args = p.parse_args()
    if args.suite != "process":
        sys.argv = [f"bench.{args.suite}", *(["--quick"] if args.quick else [])]
        runpy.run_module(f"bench.{args.suite}", run_name="__main__")
        return
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = process_capture.run(quick=args.quick)
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"process-{started}.json").write_text(json.dumps(results, indent=2))
    print(f"# process capture ({started}, {'quick' if args.quick else 'full'})\n")
    print(process_capture.report(results))


if __name__ == "__main__":
    main()

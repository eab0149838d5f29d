"""`python -m bench [process] [--quick]`: run benchmarks, print figures (markdown) and save JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench import process_capture


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("suite", nargs="?", default="process", choices=["process"])
    p.add_argument("--quick", action="store_true", help="fewer samples, shorter idle window")
    args = p.parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = process_capture.run(quick=args.quick)
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"process-{started}.json").write_text(json.dumps(results, indent=2))
    print(f"# process capture ({started}, {'quick' if args.quick else 'full'})\n")
    print(process_capture.report(results))


if __name__ == "__main__":
    main()

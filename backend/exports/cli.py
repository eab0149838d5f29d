"""`runtime-backend exports ...`: check an exports file, list dead letters, replay them."""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from backend.config import BackendSettings
from backend.exports.config import AwsExporterConfig, ExportsConfigError, load_exports
from backend.findings import iso_ms


def add_parser(sub: Any) -> None:
    exports = sub.add_parser("exports", help="exporters: check a configuration, list and replay dead letters")
    actions = exports.add_subparsers(dest="action", required=True)
    check = actions.add_parser("check", help="validate an exports file (TOML, YAML or JSON) and list its exporters")
    check.add_argument("file")
    dead = actions.add_parser("dead-letters", help="payloads exporters gave up on, newest first")
    dead.add_argument("--exporter", help="only this exporter's")
    dead.add_argument("--limit", type=int, default=100)
    dead.add_argument("--payload", action="store_true", help="include each payload")
    replay = actions.add_parser("replay", help="send dead letters again (deleted once delivered)")
    replay.add_argument("ids", nargs="+", type=int, metavar="ID")
    replay.add_argument("--config", metavar="FILE", help="exports file (default: RUNTIME_BACKEND_EXPORTS_FILE)")


def _print(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def _target(cfg: Any) -> str:
    kind = cfg.type
    if kind == "eventbridge":
        return f"bus {cfg.event_bus_name} in {cfg.region}"
    if kind == "securityhub":
        return f"Security Hub in {cfg.region}"
    if kind == "s3":
        return f"s3://{cfg.bucket}/{cfg.prefix} ({cfg.format}{', ' + cfg.sse if cfg.sse else ''})"
    return f"{cfg.url} ({cfg.format})"


async def run(args: argparse.Namespace, settings: BackendSettings) -> int:
    if args.action == "check":
        try:
            cfg = load_exports(args.file)
        except ExportsConfigError as exc:
            sys.stderr.write(f"runtime-backend: invalid exports file:\n{exc}\n")
            return 2
        _print([{"name": c.name, "type": c.type, "enabled": c.enabled, "target": _target(c)} for c in cfg.exporters])
        return 0

    from backend.db import open_database
    from backend.exports.base import list_dead_letters, replay_dead_letter

    db = await open_database(settings.database_url)
    try:
        if args.action == "dead-letters":
            async with db.sessions() as session:
                rows = await list_dead_letters(session, args.exporter, max(1, args.limit))
            _print(
                [
                    {
                        "id": r.id,
                        "exporter": r.exporter,
                        "detectorId": r.detector_id,
                        "findingId": r.finding_id,
                        "error": r.error,
                        "attempts": r.attempts,
                        "createdAt": iso_ms(r.created_at),
                        **({"payload": orjson.loads(r.payload)} if args.payload else {}),
                    }
                    for r in rows
                ]
            )
            return 0
        path = args.config or settings.exports_file
        if not path:
            sys.stderr.write(
                "runtime-backend: replay needs the exports file: --config FILE or RUNTIME_BACKEND_EXPORTS_FILE\n"
            )
            return 2
        try:
            cfg = load_exports(path)
        except ExportsConfigError as exc:
            sys.stderr.write(f"runtime-backend: invalid exports file:\n{exc}\n")
            return 2
        from backend.exports import build_exporter

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exports")
        exporters = {
            c.name: build_exporter(c, executor if isinstance(c, AwsExporterConfig) else None) for c in cfg.exporters
        }
        results = []
        try:
            for dead_letter_id in args.ids:
                try:
                    r = await replay_dead_letter(db.sessions, exporters, dead_letter_id)
                except LookupError as exc:
                    results.append({"id": dead_letter_id, "delivered": False, "error": str(exc)})
                    continue
                results.append(
                    {
                        "id": r.id,
                        "exporter": r.exporter,
                        "delivered": r.delivered,
                        "error": r.error,
                        "attempts": r.attempts,
                    }
                )
        finally:
            for e in exporters.values():
                await e.close()
            executor.shutdown(wait=False)
        _print(results)
        return 0 if all(r["delivered"] for r in results) else 1
    finally:
        await db.close()

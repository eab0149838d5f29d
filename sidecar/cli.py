"""`runtime-sidecar` (and `python -m sidecar`): run, probe."""

from __future__ import annotations

import argparse
import logging
import sys

import orjson

from sidecar import __version__, config, logs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runtime-sidecar", description="Runtime threat detection sidecar for ECS tasks.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="watch the task and write events/findings")
    run.add_argument("--findings-out", metavar="PATH", help="findings as JSON lines ('-' = stdout)")
    run.add_argument("--events-out", metavar="PATH", help="runtime events as JSON lines ('-' = stdout)")
    run.add_argument("--collector-url", metavar="URL", help="backend collector API base URL")
    run.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings (lowest precedence)")
    run.add_argument("--process-source", choices=["auto", "proc_connector", "proc_poll"])
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--policy-file", metavar="FILE", help="detection policy: lists, exceptions, user rules")
    # The token has no flag on purpose: arguments are readable in /proc (RUNTIME_SIDECAR_TOKEN, an ECS secret).
    run.add_argument("--ca-bundle", metavar="FILE", help="CA certificates (PEM) for the collector's TLS")
    run.add_argument("--state-dir", metavar="DIR", help="state: spool and remote threat lists")
    run.add_argument("--spool-dir", metavar="DIR", help="findings waiting for the collector (default STATE_DIR/spool)")
    run.add_argument("--spool-max-bytes", metavar="N", help="most bytes of findings spooled")
    run.add_argument("--spool-max-findings", metavar="N", help="most findings spooled")
    run.add_argument("--batch-max-findings", metavar="N", help="findings per request to the collector")
    run.add_argument("--batch-max-age-s", metavar="S", help="longest a finding waits for its batch")
    run.add_argument("--heartbeat-interval-s", metavar="S", help="period of heartbeats")
    run.add_argument("--config-poll-interval-s", metavar="S", help="period of remote configuration checks")
    run.add_argument("--no-remote-config", action="store_true", help="do not fetch policy and lists from the collector")
    run.add_argument("--no-ship-events", action="store_true", help="do not send runtime events to the collector")
    run.add_argument("--stop-flush-timeout-s", metavar="S", help="at SIGTERM, how long to try sending spooled findings")
    sub.add_parser("probe", help="print what each event source can do here, as JSON")
    hp = sub.add_parser("health", help="exit 0 if the running sidecar is healthy (container health checks)")
    hp.add_argument("--state-dir", metavar="DIR", help="the running sidecar's state directory")
    hp.add_argument("--max-age-s", type=float, default=30.0, help="oldest status file still healthy")
    types = sub.add_parser("finding-types", help="print the finding catalog")
    types.add_argument("--json", action="store_true", help="as JSON (default: a table)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "probe":
        logs.setup("WARNING")
        from sidecar.probe import run_probe

        sys.stdout.write(orjson.dumps(run_probe(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if args.command == "health":
        from sidecar import health

        try:
            settings = config.load({"state_dir": args.state_dir})
        except config.ConfigError as exc:
            sys.stderr.write(f"{exc}\n")
            return 2
        ok, why = health.check(health.candidates(settings.state_dir), args.max_age_s)
        (sys.stdout if ok else sys.stderr).write(why + "\n")
        return 0 if ok else 1
    if args.command == "finding-types":
        from sidecar.catalog_cli import print_catalog

        return print_catalog(as_json=args.json)
    cli = {
        "policy_file": args.policy_file,
        "findings_out": args.findings_out,
        "events_out": args.events_out,
        "collector_url": args.collector_url,
        "process_source": args.process_source,
        "log_level": args.log_level,
        "ca_bundle": args.ca_bundle,
        "state_dir": args.state_dir,
        "spool_dir": args.spool_dir,
        "spool_max_bytes": args.spool_max_bytes,
        "spool_max_findings": args.spool_max_findings,
        "batch_max_findings": args.batch_max_findings,
        "batch_max_age_s": args.batch_max_age_s,
        "heartbeat_interval_s": args.heartbeat_interval_s,
        "config_poll_interval_s": args.config_poll_interval_s,
        "remote_config": False if args.no_remote_config else None,
        "ship_events": False if args.no_ship_events else None,
        "stop_flush_timeout_s": args.stop_flush_timeout_s,
    }
    try:
        settings = config.load(cli, config_file=args.config)
        from sidecar.detection import load_policy

        policy = load_policy(settings)
    except config.ConfigError as exc:
        sys.stderr.write(orjson.dumps({"level": "ERROR", "logger": "sidecar.config", "msg": str(exc)}).decode() + "\n")
        return 2
    logs.setup(settings.log_level)
    from sidecar.app import run

    try:
        return run(settings, policy)
    except OSError as exc:  # an output path we cannot open, for instance
        logging.getLogger("sidecar").error("cannot start", extra={"error": str(exc)})
        return 1

"""`runtime-backend`: serve, migrate, token, access-key, policy, local (the README's one-command demo)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from backend import config
from backend.tenancy import detector_id_for

log = logging.getLogger("backend.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="runtime-backend",
        description="Collector API, findings store and GuardDuty-compatible API for the runtime sidecars.",
    )
    p.add_argument("--database-url", metavar="URL", help="sqlite:///PATH (default) or postgresql://...")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the backend (migrates the database first)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--tls-cert", metavar="PEM")
    serve.add_argument("--tls-key", metavar="PEM")

    sub.add_parser("migrate", help="bring the database schema to this version and exit")

    token = sub.add_parser("token", help="agent tokens (one per cluster)").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", help="create a token; its secret is printed once")
    create.add_argument("--account", required=True)
    create.add_argument("--cluster", required=True)
    create.add_argument("--region", help="default: RUNTIME_BACKEND_DEFAULT_REGION")
    create.add_argument("--description", default="")
    token.add_parser("list", help="tokens, without their secrets")
    revoke = token.add_parser("revoke", help="revoke a token (agents using it get 401)")
    revoke.add_argument("token_id")

    keys = sub.add_parser("access-key", help="access keys for the GuardDuty API (SigV4)")
    key_actions = keys.add_subparsers(dest="action", required=True)
    kc = key_actions.add_parser("create", help="create a key for an account; the secret is printed once")
    kc.add_argument("--account", required=True)
    kc.add_argument("--region", help="default: RUNTIME_BACKEND_DEFAULT_REGION (its detector is created)")
    kc.add_argument("--description", default="")
    key_actions.add_parser("list", help="keys, without their secrets")
    kr = key_actions.add_parser("revoke")
    kr.add_argument("access_key_id")

    pol = sub.add_parser("policy", help="the detection policy agents receive").add_subparsers(
        dest="action", required=True
    )
    ps = pol.add_parser("set", help="validate and store a policy (YAML/JSON/TOML) for an account or one cluster")
    ps.add_argument("--account", required=True)
    ps.add_argument("--cluster", help="only this cluster (default: the account's default)")
    ps.add_argument("file")
    pg = pol.add_parser("show")
    pg.add_argument("--account", required=True)
    pg.add_argument("--cluster")
    pd = pol.add_parser("delete")
    pd.add_argument("--account", required=True)
    pd.add_argument("--cluster")

    intel = sub.add_parser("intel", help="threat-intel and IP sets").add_subparsers(dest="action", required=True)
    ir = intel.add_parser("refresh", help="re-fetch every active list now (a running backend does it hourly)")
    ir.add_argument("--account", help="only this account's sets (with --region)")
    ir.add_argument("--region", help="default: RUNTIME_BACKEND_DEFAULT_REGION")

    local = sub.add_parser(
        "local", help="backend on SQLite plus a sidecar watching this host, with a token and an access key"
    )
    local.add_argument("--port", type=int, default=8080)
    local.add_argument(
        "--state-dir", default=".runtime-local", help="database, spool, credentials (default: %(default)s)"
    )
    local.add_argument("--findings-out", default="findings.jsonl", help="the sidecar's findings as JSON lines too")
    local.add_argument("--no-sidecar", action="store_true", help="only the backend")
    _add_operator_parser(sub)
    _add_exports_parser(sub)
    return p


def _print(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


async def _with_session(settings: config.BackendSettings, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    from backend.db import open_database

    db = await open_database(settings.database_url)
    try:
        async with db.sessions() as session, session.begin():
            return await fn(session)
    finally:
        await db.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from sidecar import logs  # the same JSON log lines as the agent (logs has no agent dependencies)

    logs.setup(args.log_level)
    overrides: dict[str, object] = {"database_url": args.database_url}
    if args.command == "serve":
        overrides.update(host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key)
    if args.command == "local":
        state = Path(args.state_dir).resolve()
        args.state_path = state
        overrides.setdefault("database_url", None)
        if not args.database_url:
            overrides["database_url"] = f"sqlite:///{state / 'backend.db'}"
        overrides["port"] = args.port
        # one operator on one machine: the lists they name may be anywhere on it
        if not os.environ.get(config.ENV_PREFIX + "INTEL_FILE_ROOTS"):
            overrides["intel_file_roots"] = "/"
    try:
        settings = config.load(overrides)
    except config.ConfigError as exc:
        sys.stderr.write(f"runtime-backend: {exc}\n")
        return 2
    from backend.db import SchemaTooNewError

    try:
        return asyncio.run(_run(args, settings))
    except (ValueError, SchemaTooNewError) as exc:  # bad identities, policies, a newer schema: for the operator
        sys.stderr.write(f"runtime-backend: {exc}\n")
        return 2
    except OSError as exc:  # the database (or the port) cannot be reached
        sys.stderr.write(f"runtime-backend: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace, settings: config.BackendSettings) -> int:
    from backend import tenancy

    if args.command == "serve":
        from backend.app import serve

        def ready(server: Any) -> None:
            sys.stdout.write(f"runtime-backend listening on {server.url}\n")
            sys.stdout.flush()

        return await serve(settings, ready=ready)
    if args.command == "migrate":
        from backend.db import current_revision, open_database

        db = await open_database(settings.database_url)
        try:
            _print({"revision": await current_revision(db.engine)})
        finally:
            await db.close()
        return 0
    if args.command == "token":
        if args.action == "create":
            region = args.region or settings.default_region

            async def create(s: Any) -> tuple[str, str]:
                return await tenancy.create_token(s, args.account, region, args.cluster, args.description)

            tid, secret = await _with_session(settings, create)
            _print(
                {
                    "tokenId": tid,
                    "token": secret,
                    "accountId": args.account,
                    "region": region,
                    "clusterName": args.cluster,
                }
            )
            sys.stderr.write("the token is shown once: put it in Secrets Manager or SSM for the task definition\n")
            return 0
        if args.action == "list":
            rows = await _with_session(settings, tenancy.list_tokens)
            _print(
                [
                    {
                        "tokenId": r.id,
                        "accountId": r.account_id,
                        "region": r.region,
                        "clusterName": r.cluster_name,
                        "description": r.description,
                        "createdAt": r.created_at,
                        "revokedAt": r.revoked_at,
                        "lastUsedAt": r.last_used_at,
                    }
                    for r in rows
                ]
            )
            return 0
        ok = await _with_session(settings, lambda s: tenancy.revoke_token(s, args.token_id))
        if not ok:
            sys.stderr.write(f"runtime-backend: no active token {args.token_id}\n")
            return 1
        return 0
    if args.command == "access-key":
        if args.action == "create":
            region = args.region or settings.default_region
            kid, secret = await _with_session(
                settings, lambda s: tenancy.create_access_key(s, args.account, region, args.description)
            )
            _print(
                {
                    "accessKeyId": kid,
                    "secretAccessKey": secret,
                    "accountId": args.account,
                    "detectorId": detector_id_for(args.account, region),
                    "region": region,
                }
            )
            return 0
        if args.action == "list":
            rows = await _with_session(settings, tenancy.list_access_keys)
            _print(
                [
                    {
                        "accessKeyId": r.access_key_id,
                        "accountId": r.account_id,
                        "description": r.description,
                        "createdAt": r.created_at,
                        "revokedAt": r.revoked_at,
                    }
                    for r in rows
                ]
            )
            return 0
        ok = await _with_session(settings, lambda s: tenancy.revoke_access_key(s, args.access_key_id))
        if not ok:
            sys.stderr.write(f"runtime-backend: no active access key {args.access_key_id}\n")
            return 1
        return 0
    if args.command == "policy":
        return await _policy(args, settings)
    if args.command == "operator":
        return await _operator(args, settings)
    if args.command == "exports":
        return await _exports(args, settings)
    if args.command == "intel":
        from backend.db import open_database
        from backend.intel_sets import FetchLimits, refresh_sets

        detector = detector_id_for(args.account, args.region or settings.default_region) if args.account else None
        db = await open_database(settings.database_url)
        try:
            rows = await refresh_sets(db.sessions, FetchLimits.from_settings(settings), detector)
        finally:
            await db.close()
        _print([{"id": r.id, "name": r.name, "kind": r.kind, "status": r.status, "reason": r.error} for r in rows])
        return 0
    if args.command == "local":
        from backend.local import run_local

        return await run_local(
            settings, args.state_path, findings_out=args.findings_out, with_sidecar=not args.no_sidecar
        )
    raise AssertionError(args.command)


async def _policy(args: argparse.Namespace, settings: config.BackendSettings) -> int:
    from backend import agent_config

    if args.action == "set":
        from detectors.policy import Policy, PolicyError

        try:
            document = Policy.load(args.file).to_json()
        except PolicyError as exc:
            sys.stderr.write(f"runtime-backend: invalid policy:\n{exc}\n")
            return 2
        digest = await _with_session(
            settings, lambda s: agent_config.set_policy(s, args.account, args.cluster, document)
        )
        _print({"accountId": args.account, "clusterName": args.cluster, "digest": digest})
        return 0
    if args.action == "show":
        doc = await _with_session(settings, lambda s: agent_config.get_policy(s, args.account, args.cluster))
        _print(doc)
        return 0 if doc is not None else 1
    ok = await _with_session(settings, lambda s: agent_config.delete_policy(s, args.account, args.cluster))
    return 0 if ok else 1


# -- exports: check an exports file, list and replay dead letters (backend/exports/cli.py) ----------------------


def _add_exports_parser(sub: Any) -> None:
    from backend.exports.cli import add_parser

    add_parser(sub)


async def _exports(args: argparse.Namespace, settings: config.BackendSettings) -> int:
    from backend.exports.cli import run

    return await run(args, settings)


# -- end of exports ----------------------------------------------------------------------------------------------

# -- operator: who may sign in to the console (backend/console/cli.py) ------------------------------------------


def _add_operator_parser(sub: Any) -> None:
    from backend.console.cli import add_parser

    add_parser(sub)


async def _operator(args: argparse.Namespace, settings: config.BackendSettings) -> int:
    from backend.console.cli import run

    return await run(args, settings)


# -- end of operator -----------------------------------------------------------------------------------------------

if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

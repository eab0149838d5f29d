"""`runtime-backend operator ...`: who may sign in to the console (backend/cli.py hands the subcommand here)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from backend.config import BackendSettings
from backend.console import operators


def add_parser(sub: Any) -> None:
    op = sub.add_parser("operator", help="console operators (who may sign in to /console)").add_subparsers(
        dest="action", required=True
    )
    oc = op.add_parser("create", help="create an operator; the password is asked for (or read with --password-stdin)")
    oc.add_argument("--username", required=True)
    oc.add_argument(
        "--accounts", default="*", help="account ids they may see, comma-separated, or * for all (default: %(default)s)"
    )
    oc.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    op.add_parser("list", help="operators and the accounts they see")
    od = op.add_parser("disable", help="disable an operator and end their sessions")
    od.add_argument("username")


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    if not sys.stdin.isatty():
        raise operators.OperatorError("no terminal to ask the password on: pipe it with --password-stdin")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise operators.OperatorError("the passwords differ")
    return first


def _print(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


async def run(args: argparse.Namespace, settings: BackendSettings) -> int:
    """Exit code; OperatorError (a ValueError) for bad input, which the CLI prints and exits 2 with."""
    from backend.db import open_database

    if args.action == "create":
        accounts = operators.parse_accounts(args.accounts)
        operators.check_username(args.username)
        password = operators.hash_password(read_password(args.password_stdin))
    db = await open_database(settings.database_url)
    try:
        async with db.sessions() as session, session.begin():
            if args.action == "create":
                await operators.create_operator(session, args.username, password, accounts, hashed=True)
                _print({"username": args.username, "accounts": accounts})
                return 0
            if args.action == "list":
                rows = await operators.list_operators(session)
                _print(
                    [
                        {
                            "username": r.username,
                            "accounts": r.accounts,
                            "createdAt": r.created_at,
                            "disabledAt": r.disabled_at,
                        }
                        for r in rows
                    ]
                )
                return 0
            if await operators.disable_operator(session, args.username):
                return 0
    finally:
        await db.close()
    sys.stderr.write(f"runtime-backend: no enabled operator {args.username}\n")
    return 1

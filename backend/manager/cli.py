"""`runtime-manager`: one argparse program whose subcommands live in their own modules.

Each module of COMMAND_MODULES defines ``register(subparsers)``, which adds its parsers with
``set_defaults(func=...)``; ``func(args) -> int`` gets the namespace with the common flags (--region,
--endpoint-url, --profile: ``AwsConfig.from_args(args)``). A module not written yet is skipped, so the program
grows one command module at a time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from botocore.exceptions import BotoCoreError, ClientError

from backend.manager.aws import ThrottledError

COMMAND_MODULES = [
    "backend.manager.inject",
    "backend.manager.repo",
    "backend.manager.iam",
    "backend.manager.automation",
]

log = logging.getLogger("backend.manager")


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="runtime-manager",
        description="Put the runtime sidecar into ECS: task definitions, services, ECR, IAM, VPC endpoints, coverage.",
    )
    p.add_argument("--region", help="AWS region (default: the profile's or AWS_REGION)")
    p.add_argument("--endpoint-url", metavar="URL", help="send every AWS call here (moto, a private endpoint)")
    p.add_argument("--profile", help="AWS shared-config profile")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a module that exists but misses one of its own imports is a bug to show
                raise
            continue
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sidecar import logs  # the same JSON log lines as the agent and the backend (no agent dependencies)

    logs.setup(args.log_level)
    try:
        return int(args.func(args))
    except ThrottledError as exc:
        log.error("AWS kept throttling", extra={"error": str(exc)})
        return 1
    except ClientError as exc:
        err = exc.response.get("Error", {})
        sys.stderr.write(f"runtime-manager: AWS error {err.get('Code')}: {err.get('Message')}\n")
        return 1
    except BotoCoreError as exc:  # no credentials, no region, endpoint unreachable
        sys.stderr.write(f"runtime-manager: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())

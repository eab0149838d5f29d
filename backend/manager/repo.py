"""`runtime-manager publish-repo`: the private ECR repository the sidecar image is pulled from.

Scan on push, immutable tags (a task definition naming ``runtime-sidecar:0.1.0`` always gets the image that was
tested as 0.1.0) and a lifecycle policy, so old images do not pile up. Idempotent: a second run changes nothing
and says so; a repository someone changed by hand is brought back to these settings.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from backend.manager import aws

DEFAULT_NAME = "runtime-sidecar"
MANAGED_TAG = {"Key": "managed-by", "Value": "runtime-manager"}


def lifecycle_policy(keep: int, untagged_days: int) -> dict[str, Any]:
    """Expire untagged images after ``untagged_days``; keep the ``keep`` most recent images of all.

    ECR evaluates rules by priority and requires a ``tagStatus: any`` rule to come last.
    """
    return {
        "rules": [
            {
                "rulePriority": 1,
                "description": f"expire untagged images {untagged_days} days after their push",
                "selection": {
                    "tagStatus": "untagged",
                    "countType": "sinceImagePushed",
                    "countUnit": "days",
                    "countNumber": untagged_days,
                },
                "action": {"type": "expire"},
            },
            {
                "rulePriority": 2,
                "description": f"keep the last {keep} images",
                "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": keep},
                "action": {"type": "expire"},
            },
        ]
    }


@dataclass
class PublishedRepository:
    repository: dict[str, Any]
    created: bool = False
    changes: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return str(self.repository["repositoryUri"])

    @property
    def arn(self) -> str:
        return str(self.repository["repositoryArn"])


def ensure_repository(
    ecr: Any, name: str = DEFAULT_NAME, keep: int = 30, untagged_days: int = 7, backoff: aws.Backoff | None = None
) -> PublishedRepository:
    """Create the repository, or bring an existing one to these settings. ``changes`` says what was done."""
    backoff = backoff or aws.Backoff()
    try:
        repo = backoff.call(
            ecr.create_repository,
            repositoryName=name,
            imageTagMutability="IMMUTABLE",
            imageScanningConfiguration={"scanOnPush": True},
            encryptionConfiguration={"encryptionType": "AES256"},
            tags=[MANAGED_TAG],
        )["repository"]
        result = PublishedRepository(repo, created=True, changes=["created"])
    except Exception as exc:
        if aws.error_code(exc) != "RepositoryAlreadyExistsException":
            raise
        repo = backoff.call(ecr.describe_repositories, repositoryNames=[name])["repositories"][0]
        result = PublishedRepository(repo)
        if not (repo.get("imageScanningConfiguration") or {}).get("scanOnPush"):
            backoff.call(
                ecr.put_image_scanning_configuration,
                repositoryName=name,
                imageScanningConfiguration={"scanOnPush": True},
            )
            result.changes.append("scan on push turned on")
        if repo.get("imageTagMutability") != "IMMUTABLE":
            backoff.call(ecr.put_image_tag_mutability, repositoryName=name, imageTagMutability="IMMUTABLE")
            result.changes.append("tags made immutable")
    wanted = lifecycle_policy(keep, untagged_days)
    try:
        current = json.loads(
            backoff.call(ecr.get_lifecycle_policy, repositoryName=name)["lifecyclePolicyText"]  # a JSON string
        )
    except Exception as exc:
        if aws.error_code(exc) != "LifecyclePolicyNotFoundException":
            raise
        current = None
    if current != wanted:
        backoff.call(ecr.put_lifecycle_policy, repositoryName=name, lifecyclePolicyText=json.dumps(wanted))
        if not result.created:
            result.changes.append("lifecycle policy set" if current is None else "lifecycle policy replaced")
    return result


def package_version() -> str:
    try:
        return metadata.version("ecs-runtime-monitor")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def push_commands(uri: str, region: str, version: str, endpoint_url: str | None = None) -> list[str]:
    """docker login, build (the sidecar target) and push of ``uri:version``. Run from the repository's root."""
    registry = uri.split("/", 1)[0]
    endpoint = f" --endpoint-url {shlex.quote(endpoint_url)}" if endpoint_url else ""
    image = shlex.quote(f"{uri}:{version}")
    return [
        f"aws ecr get-login-password --region {shlex.quote(region)}{endpoint} | "
        f"docker login --username AWS --password-stdin {shlex.quote(registry)}",
        f"docker build --target sidecar --build-arg VERSION={shlex.quote(version)} "
        f'--build-arg REVISION="$(git rev-parse HEAD)" -t {image} .',
        f"docker push {image}",
    ]


def _run(args: argparse.Namespace) -> int:
    cfg = aws.AwsConfig.from_args(args)
    ecr = aws.client(cfg, "ecr")
    result = ensure_repository(ecr, args.name, keep=args.keep, untagged_days=args.untagged_days)
    version = args.version or package_version()
    commands = push_commands(result.uri, ecr.meta.region_name, version, cfg.endpoint_url)
    if args.json:
        out = {
            "repositoryArn": result.arn,
            "repositoryUri": result.uri,
            "created": result.created,
            "changes": result.changes,
            "commands": commands,
        }
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return 0
    state = "; ".join(result.changes) if result.changes else "up to date"
    lines = [
        f"# {result.uri}: {state}",
        "# scan on push, immutable tags (push each version once), lifecycle: "
        f"untagged images expire after {args.untagged_days} days, the last {args.keep} images are kept",
        *commands,
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "publish-repo",
        help="create the sidecar's private ECR repository and print the push commands",
        description="Create (or bring up to date) the private ECR repository for the sidecar image: scan on push, "
        "immutable tags, a lifecycle policy. Idempotent. Prints docker login/build/push commands.",
    )
    p.add_argument("--name", default=DEFAULT_NAME, help=f"repository name (default {DEFAULT_NAME})")
    p.add_argument("--keep", type=int, default=30, help="images kept (the most recent; default 30)")
    p.add_argument("--untagged-days", type=int, default=7, help="days before an untagged image expires (default 7)")
    p.add_argument("--version", help="image tag in the printed commands (default: this package's version)")
    p.add_argument("--json", action="store_true", help="print the result and the commands as JSON")
    p.set_defaults(func=_run)

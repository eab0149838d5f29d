"""S3: findings as gzip JSON Lines objects for a data lake (Athena, Glue, Security Lake's custom sources).

One object per batch (``batch_size`` findings, or whatever arrived within ``batch_max_wait_s`` of the first),
one finding per line, in GuardDuty's shape (``format = "guardduty"``, as GetFindings returns it) or as OCSF
Detection Findings (``format = "ocsf"``, see backend/exports/ocsf.py). Keys are Hive-partitioned by the UTC hour
the object is written, which is what Athena's partition projection wants::

    <prefix>/year=2025/month=01/day=31/hour=23/<uuid>.jsonl.gz

The uuid is derived from the object's content, so that a retry after a timeout whose PUT had in fact landed
writes the same key again instead of a duplicate object. ``sse = "aws:kms"`` (with ``kms_key_id``, or the
account's aws/s3 key without) asks S3 for SSE-KMS on every object; ``sse = "AES256"`` for SSE-S3.
"""

from __future__ import annotations

import gzip
import hashlib
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from backend.exports.base import AwsExporter, Failure, Item, aws_error
from backend.exports.config import S3Config
from backend.exports.ocsf import to_detection_finding


def object_key(prefix: str, when: datetime, body: bytes) -> str:
    name = uuid.UUID(bytes=hashlib.sha256(body).digest()[:16], version=4)
    partition = f"year={when:%Y}/month={when:%m}/day={when:%d}/hour={when:%H}/{name}.jsonl.gz"
    return f"{prefix}/{partition}" if prefix else partition


def encode_lines(bodies: Sequence[dict[str, Any]]) -> bytes:
    # mtime 0: the same findings give the same bytes, hence the same key (see the module's docstring)
    return gzip.compress(b"".join(orjson.dumps(b) + b"\n" for b in bodies), compresslevel=6, mtime=0)


class S3Exporter(AwsExporter):
    type = "s3"
    service = "s3"
    config: S3Config

    def format(self, finding: dict[str, Any]) -> dict[str, Any]:
        return to_detection_finding(finding) if self.config.format == "ocsf" else finding

    async def export(self, items: Sequence[Item]) -> list[Failure]:
        body = encode_lines([i.body for i in items])
        key = object_key(self.config.prefix, datetime.now(UTC), body)
        extra: dict[str, Any] = {}
        if self.config.sse is not None:
            extra["ServerSideEncryption"] = self.config.sse
        if self.config.kms_key_id is not None:
            extra["SSEKMSKeyId"] = self.config.kms_key_id
        try:
            await self.call(
                "put_object",
                Bucket=self.config.bucket,
                Key=key,
                Body=body,
                # not Content-Encoding: gzip, which makes HTTP clients inflate a file named .gz behind the reader's back
                ContentType="application/gzip",
                **extra,
            )
        except Exception as exc:
            msg, retryable = aws_error(exc)
            return [Failure(i, msg, retryable) for i in items]
        return []

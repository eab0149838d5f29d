"""ListDetectors, GetDetector, CreateDetector: one detector per account and region, created with its first key."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import select

from backend.api import ApiRequest, next_token, operation, parse_page
from backend.findings import iso_ms
from backend.models import Detector
from backend.tenancy import ensure_detector


@operation("GET", "/detector", "ListDetectors")
async def list_detectors(req: ApiRequest) -> dict[str, Any]:
    offset, limit = parse_page(req, in_query=True)
    rows = (
        await req.session.execute(
            select(Detector.id)
            .where(Detector.account_id == req.principal.account_id, Detector.region == req.principal.region)
            .order_by(Detector.id)
            .offset(offset)
            .limit(limit + 1)
        )
    ).scalars()
    ids = list(rows)
    return {"detectorIds": ids[:limit], "nextToken": next_token(offset, limit, len(ids))}


@operation("POST", "/detector", "CreateDetector")
async def create_detector(req: ApiRequest) -> dict[str, Any]:
    # GuardDuty allows one detector per account and region; this backend has it from the start.
    det = await ensure_detector(req.session, req.principal.account_id, req.principal.region)
    return {"detectorId": det.id, "unprocessedDataSources": {}}


@operation("GET", "/detector/{DetectorId}", "GetDetector")
async def get_detector(req: ApiRequest) -> dict[str, Any]:
    det = req.detector
    assert det is not None
    return {
        "createdAt": iso_ms(det.created_at),
        "updatedAt": iso_ms(det.updated_at),
        "findingPublishingFrequency": det.finding_publishing_frequency,
        "serviceRole": f"arn:aws:iam::{det.account_id}:role/aws-service-role/guardduty.amazonaws.com/"
        "AWSServiceRoleForAmazonGuardDuty",
        "status": det.status,
        "tags": orjson.loads(det.tags),
        "features": [
            {
                "name": "RUNTIME_MONITORING",
                "status": "ENABLED",
                "updatedAt": det.updated_at / 1000,
                "additionalConfiguration": [
                    # the sidecar is added to task definitions by runtime-manager, not by this backend
                    {"name": "ECS_FARGATE_AGENT_MANAGEMENT", "status": "DISABLED", "updatedAt": det.updated_at / 1000}
                ],
            }
        ],
    }

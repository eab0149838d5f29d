"""API errors in the shape GuardDuty's front end sends them, so SDKs and the CLI report them as for AWS.

botocore's restJson1 parser takes the error code from the ``x-amzn-ErrorType`` header (falling back to the
body) and the message from the body's ``message``; ``ClientError.response["Error"]`` then carries both, and
the CLI prints ``An error occurred (<code>) when calling the <Operation> operation: <message>``. The body also
names the code in ``__type``, as AWS JSON services do, for clients that read only the body.

The signature errors (``InvalidSignatureException`` ...) are not in GuardDuty's service model: AWS's common
front end returns them before a request reaches any service, and SDKs treat them as plain error codes.
"""

from __future__ import annotations

import orjson
from aiohttp import web

# What GuardDuty answers when a detectorId is unknown or belongs to another account: it does not say which.
DETECTOR_NOT_OWNED = "The request is rejected because the input detectorId is not owned by the current account."


class ApiError(Exception):
    """An error the API returns to the caller: ``code`` is the AWS error code, ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status

    def response(self) -> web.Response:
        return web.Response(
            body=orjson.dumps({"message": self.message, "__type": self.code}),
            status=self.status,
            content_type="application/json",
            headers={"x-amzn-ErrorType": self.code},
        )


class BadRequest(ApiError):
    """400 BadRequestException: GuardDuty's answer to anything wrong in the input."""

    def __init__(self, message: str) -> None:
        super().__init__("BadRequestException", message, 400)


class ResourceNotFound(BadRequest):
    """An unknown (or another account's) detector or resource.

    GuardDuty answers these with 400 BadRequestException, not 404, and the same message whether the resource
    does not exist or is someone else's; doing the same tells a caller nothing about other accounts.
    """

    def __init__(self, message: str = DETECTOR_NOT_OWNED) -> None:
        super().__init__(message)


class AccessDenied(ApiError):
    """403 AccessDeniedException: authenticated, but this principal may not do this."""

    def __init__(self, message: str) -> None:
        super().__init__("AccessDeniedException", message, 403)


class InternalServerError(ApiError):
    """500 InternalServerErrorException: our fault; botocore retries it."""

    def __init__(self, message: str) -> None:
        super().__init__("InternalServerErrorException", message, 500)


class Throttling(ApiError):
    """429 ThrottlingException: botocore's retry handlers back off and retry on this code."""

    def __init__(self, message: str = "Rate exceeded") -> None:
        super().__init__("ThrottlingException", message, 429)


# -- SigV4 authentication failures (backend.sigv4) -------------------------------------------------------------


class MissingAuthenticationToken(ApiError):
    """403: the request is not signed at all."""

    def __init__(self, message: str) -> None:
        super().__init__("MissingAuthenticationTokenException", message, 403)


class IncompleteSignature(ApiError):
    """400: the Authorization header is malformed or leaves out something that must be signed."""

    def __init__(self, message: str) -> None:
        super().__init__("IncompleteSignatureException", message, 400)


class InvalidSignature(ApiError):
    """403: well-formed, but the signature, its date or its scope is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__("InvalidSignatureException", message, 403)


class UnrecognizedClient(ApiError):
    """403: the access key (or a session token) is not one this backend issued."""

    def __init__(self, message: str) -> None:
        super().__init__("UnrecognizedClientException", message, 403)

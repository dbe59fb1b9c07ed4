"""Errors that end an HTTP request with a JSON answer instead of a stack trace.

Handlers raise `ApiError`; the app turns it into a response. The TGI routes answer
`{"error": message, "error_type": kind}`; the OpenAI routes can render the same exception in
their own shape, which is why the error carries its parts rather than a finished body.
"""

from __future__ import annotations

from typing import Mapping, Optional

# `error_type` values. TGI uses "validation", "overloaded" and "generation"; the others name
# the cases TGI has no word for.
VALIDATION = "validation"
OVERLOADED = "overloaded"
GENERATION = "generation"
UNAVAILABLE = "unavailable"
AUTHENTICATION = "authentication"


class ApiError(Exception):
    """An error answered to the client: HTTP status, message and error type.

    `param` names the offending request field where there is one (OpenAI error bodies carry it);
    `headers` are sent with the answer (e.g. `Retry-After`).
    """

    def __init__(self, status_code: int, message: str, error_type: str, param: Optional[str] = None,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.param = param
        self.headers = headers

    def tgi_body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


def validation_error(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(422, message, VALIDATION, param)


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes", VALIDATION)


def unsupported_media_type() -> ApiError:
    return ApiError(415, "request bodies are JSON: send `Content-Type: application/json`", VALIDATION)


def overloaded(message: str) -> ApiError:
    # A second is about how long a short request takes to pass through a busy server.
    return ApiError(429, message, OVERLOADED, headers={"retry-after": "1"})


def unavailable(reason: str) -> ApiError:
    return ApiError(503, f"server unavailable: {reason}", UNAVAILABLE)


def generation_error(message: str) -> ApiError:
    return ApiError(500, message, GENERATION)

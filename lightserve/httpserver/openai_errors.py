"""Errors in the OpenAI shape, for the `/v1/` routes.

The same `ApiError` a handler raises is rendered `{"error": message, "error_type": kind}` on the
TGI routes and `{"error": {"message", "type", "param", "code"}}` here, so shared validation code
never needs to know which API it serves. OpenAI answers invalid requests with 400 where TGI uses
422; the status is translated here too.
"""

from __future__ import annotations

from typing import Any, Optional

from lightserve.httpserver.errors import AUTHENTICATION, GENERATION, OVERLOADED, UNAVAILABLE, VALIDATION, ApiError

OPENAI_PREFIX = "/v1/"

NOT_FOUND = "not_found"

# OpenAI's `type` for each of our error kinds.
_TYPES = {
    VALIDATION: "invalid_request_error",
    AUTHENTICATION: "authentication_error",
    NOT_FOUND: "invalid_request_error",
    GENERATION: "server_error",
    UNAVAILABLE: "server_error",
    OVERLOADED: "server_error",  # what OpenAI answers with its 429 "model is currently overloaded"
}


class CodedApiError(ApiError):
    """An `ApiError` with the machine-readable `code` OpenAI clients may switch on
    (e.g. `model_not_found`, `invalid_api_key`)."""

    def __init__(self, status_code: int, message: str, error_type: str, param: Optional[str], code: str) -> None:
        super().__init__(status_code, message, error_type, param)
        self.code = code


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def openai_status(error: ApiError) -> int:
    return 400 if error.status_code == 422 else error.status_code


def openai_error_body(error: ApiError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": _TYPES.get(error.error_type, "server_error" if error.status_code >= 500 else "invalid_request_error"),
            "param": error.param,
            "code": getattr(error, "code", None),
        }
    }


def invalid_api_key(message: str) -> CodedApiError:
    return CodedApiError(401, message, AUTHENTICATION, None, "invalid_api_key")


def model_not_found(model: str, served: str) -> CodedApiError:
    return CodedApiError(404, f"the model `{model}` does not exist; this server serves `{served}`", NOT_FOUND, "model",
                         "model_not_found")

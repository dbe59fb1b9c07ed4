"""`--api_key`: every route but the open ones requires `Authorization: Bearer KEY`.

The 401 answer has the error shape of the API the path belongs to (OpenAI under `/v1/`, TGI
elsewhere), so each client library reports it as an authentication error of its own kind.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lightserve.httpserver.errors import AUTHENTICATION, ApiError
from lightserve.httpserver.openai_errors import invalid_api_key, is_openai_path, openai_error_body

_MESSAGE = "missing or wrong API key (send `Authorization: Bearer KEY`)"


class ApiKeyMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: that one buffers streams and hides
    disconnects from the app)."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open_paths:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        # Constant-time comparison: the time taken must not reveal how much of the key matched.
        if not hmac.compare_digest(given, self._expected):
            if is_openai_path(scope["path"]):
                body = openai_error_body(invalid_api_key(_MESSAGE))
            else:
                body = ApiError(401, _MESSAGE, AUTHENTICATION).tgi_body()
            response = JSONResponse(body, status_code=401, headers={"www-authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

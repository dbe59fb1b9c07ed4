"""The starlette application of the HTTP front end.

`build_app(manager, args)` only builds objects: nothing is started, bound or connected until an
ASGI server runs the app. Its lifespan then starts the manager (zmq sockets and tasks) on the
server's event loop and closes it at shutdown, so the launcher only has to run uvicorn:

    uvicorn.run(build_app(manager, args), host=args.host, port=args.port)

Every failure is answered with JSON: `{"error", "error_type"}` on the TGI routes,
`{"error": {"message", "type", "param", "code"}}` under `/v1/`. Unexpected exceptions reach the
client as a plain 500 message, their traceback only the server log. `GET /openapi.json`
describes every route (see `openapi`).
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, Mapping, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lightserve.httpserver.admission import AdmissionMiddleware, InFlightLimit
from lightserve.httpserver.auth import ApiKeyMiddleware
from lightserve.httpserver.disconnect import ClientDisconnected
from lightserve.httpserver.errors import GENERATION, ApiError, unavailable
from lightserve.httpserver.manager import HttpServerManager
from lightserve.httpserver.openai_api import OpenAIApi
from lightserve.httpserver.openai_errors import NOT_FOUND, is_openai_path, openai_error_body, openai_status
from lightserve.httpserver.openapi import openapi_document
from lightserve.httpserver.tgi_api import TGIApi
from lightserve.server_args import ServerArgs

# Routes that answer without an API key: load balancers probe health without credentials.
OPEN_PATHS = frozenset({"/health"})

# nginx's "client closed request": logged for a request whose client left before the answer.
_CLIENT_CLOSED = 499


def build_app(manager: HttpServerManager, args: ServerArgs) -> Starlette:
    tgi = TGIApi(manager, args)
    openai = OpenAIApi(manager, args)
    spec = openapi_document(args, openai.model_name, len(manager.tokenizer))

    async def health(request: Request) -> Response:
        if not manager.healthy:
            return _error_response(request, unavailable(manager.failure or ""))
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        image_stats = await manager.image_cache_stats() if manager.healthy else None
        if image_stats is not None:
            manager.metrics.image_cache.update(image_stats)
        return Response(manager.metrics.render(), media_type=manager.metrics.content_type)

    async def openapi(request: Request) -> Response:
        return JSONResponse(spec)

    async def flush_cache(request: Request) -> Response:
        # Behind the API key like every route but /health: a flush costs every client its hits.
        if not manager.healthy:
            return _error_response(request, unavailable(manager.failure or ""))
        manager.flush_prefix_cache()
        return JSONResponse({"status": "ok", "detail": "unused prefix-cache entries are dropped before the next step"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await manager.start()
        try:
            yield
        finally:
            await manager.close()

    middleware = []
    if args.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=args.api_key, open_paths=OPEN_PATHS))
    # Inside the key check: a request without the key never takes room.
    in_flight = InFlightLimit(args.running_max_req_size + args.max_waiting_reqs)
    middleware.append(Middleware(AdmissionMiddleware, limit=in_flight))
    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/flush_cache", flush_cache, methods=["POST"]),
            *tgi.routes(),
            *openai.routes(),
        ],
        middleware=middleware,
        exception_handlers={
            ApiError: _api_error,
            ClientDisconnected: _client_disconnected,
            HTTPException: _http_exception,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.state.metrics = manager.metrics  # for the exception handlers, which only get the request
    return app


def _error_response(request: Request, error: ApiError, headers: Optional[Mapping[str, str]] = None) -> JSONResponse:
    """`error` in the shape of the API that `request` belongs to."""
    if is_openai_path(request.url.path):
        return JSONResponse(openai_error_body(error), status_code=openai_status(error), headers=headers)
    return JSONResponse(error.tgi_body(), status_code=error.status_code, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    if 400 <= exc.status_code < 500:
        # Refused before submission; requests that were submitted are counted when they end.
        request.app.state.metrics.request_rejected()
    return _error_response(request, exc, exc.headers)


async def _client_disconnected(request: Request, exc: Exception) -> Response:
    # Nobody reads this answer; it only gives the access log an honest status.
    return Response(status_code=_CLIENT_CLOSED)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Routing errors (404, 405) in the same JSON shape as every other error."""
    assert isinstance(exc, HTTPException)
    kind = NOT_FOUND if exc.status_code == 404 else "http"
    return _error_response(request, ApiError(exc.status_code, exc.detail, kind), exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises the exception after this answer, so the ASGI server logs the traceback.
    return _error_response(request, ApiError(500, "internal server error", GENERATION))

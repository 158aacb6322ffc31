"""`dsv3 serve`: the DeepSeek/OpenAI-compatible HTTP API (docs/api.md) over the inference engine; this module wires
the app together.

Routes are served under "", "/v1" and "/beta" (docs/api.md#paths). A request is validated (protocol.py), its key
authenticated and admitted (admission.py), turned into prompt ids and SamplingParams (inputs.py), and handed to
the engine thread (async_engine.py) through `Service.generate` (service.py); the routes (chat.py, completions.py)
answer with one JSON body or server-sent events, formatted by openai_format.py. Errors always have the
`{"error": {...}}` shape (docs/api.md#errors); an unexpected exception is a 500 for that request only.
"""
from __future__ import annotations

import logging
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv3.infer.engine import Engine
from dsv3.serve import chat, completions
from dsv3.serve.openai_format import validation_error
from dsv3.serve.protocol import APIError
from dsv3.serve.service import ServerConfig, Service, caller

__all__ = ["ServerConfig", "create_app"]  # how a server is made: create_app(engine, ServerConfig(...))
log = logging.getLogger("dsv3.serve")

router = APIRouter()  # every route but the chat page, served under each of config.prefixes


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    service = Service.build(engine, config)
    app = FastAPI(title="dsv3", description="DeepSeek/OpenAI-compatible API over the dsv3 engine", lifespan=_lifespan)
    app.state.service, app.state.engine, app.state.config = service, service.engine, config
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_middleware(RequestGuard, max_request_bytes=config.max_request_bytes, requests=service.metrics.requests)
    app.get("/", include_in_schema=False)(chat_page)
    for prefix in config.prefixes:
        app.include_router(router, prefix=prefix)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    app.state.engine.start()
    yield
    app.state.engine.shutdown()  # cancel what still runs, flush the prefix cache to disk


# ---- routes beside the completions ----------------------------------------------------------------------------
@router.get("/models")
async def models(request: Request, key: str = Depends(caller)):
    service: Service = request.app.state.service
    return {"object": "list", "data": [{"id": service.config.model_name, "object": "model", "created": 0,
                                        "owned_by": "dsv3", "context_length": service.max_len}]}


@router.get("/health")
async def health(request: Request):
    return {"status": "ok", "requests": request.app.state.engine.num_requests}


@router.get("/metrics")
async def prometheus(request: Request):
    return Response(request.app.state.service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


router.include_router(chat.router)
router.include_router(completions.router)


async def chat_page():
    return FileResponse(Path(__file__).parent / "static" / "chat.html", media_type="text/html")


# ---- errors ---------------------------------------------------------------------------------------------------
async def _api_error(request: Request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(request: Request, e: StarletteHTTPException):  # 404, 405, ... in the same shape
    return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code, headers=e.headers)


async def _invalid(request: Request, e: RequestValidationError):
    error = validation_error(e.errors())
    return JSONResponse(error.body(), status_code=error.status)


def _internal_error(e: Exception) -> JSONResponse:
    rid = uuid.uuid4().hex[:12]
    log.error("internal error (%s): %s: %s", rid, type(e).__name__, e, exc_info=e)
    return JSONResponse(APIError(500, f"internal error (reference {rid})", type="server_error").body(),
                        status_code=500)


class RequestGuard:
    """ASGI middleware around the app: a body whose Content-Length is over the limit is a 400 before any route
    reads it; an exception a route did not handle is a 500 for that request only (the server goes on); every
    response is counted by route and status. Plain ASGI, because Starlette's @app.middleware pipes every streamed
    chunk through a task group and a memory stream of its own."""

    def __init__(self, app, max_request_bytes: int, requests):
        self.app, self.max_request_bytes, self.requests = app, max_request_bytes, requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        size = dict(scope["headers"]).get(b"content-length", b"").decode()
        try:
            if size.isdigit() and int(size) > self.max_request_bytes:
                body = APIError(400, f"request body of {size} bytes is over the limit of {self.max_request_bytes}")
                await JSONResponse(body.body(), status_code=400)(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        except Exception as e:
            if status is not None:  # the response had begun: all that is left is to end it
                raise
            await _internal_error(e)(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            self.requests.labels(route.path if route else "unmatched", str(status or 500)).inc()

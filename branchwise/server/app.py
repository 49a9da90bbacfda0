"""The OpenAI-compatible HTTP API's routes: /v1/completions, /v1/chat/completions, /v1/responses,
/v1/models, /tokenize, /detokenize, /version, /health, /metrics. The work is in one file per surface
(completions.py, chat.py, responses.py, tokenize.py) over serving.py."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from branchwise import __version__
from branchwise.config import EngineConfig, ServerConfig
from branchwise.engine.engine import LLMEngine
from branchwise.server.chat import create_chat_completion
from branchwise.server.completions import create_completion
from branchwise.server.guard import Guard
from branchwise.server.protocol import ChatCompletionRequest, CompletionRequest, error_body, now
from branchwise.server.responses import Responses, ResponsesRequest
from branchwise.server.serving import APIError, Serving
from branchwise.server.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize

log = logging.getLogger(__name__)


def create_app(config: ServerConfig, engine: LLMEngine | None = None) -> FastAPI:
    engine = engine or LLMEngine(EngineConfig(**config.model_dump(include=set(EngineConfig.model_fields))))
    s = Serving(config, engine)
    responses = Responses(s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        s.loop.start()
        yield
        s.loop.stop()
        engine.close()

    app = FastAPI(title="branchwise", lifespan=lifespan)
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_request_bytes)
    app.state.loop, app.state.engine = s.loop, engine

    # -- errors: always OpenAI's shape ------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.status, e.type, e.param), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            message = f"Malformed JSON body: {err.get('msg')}"
            return JSONResponse(error_body(message, 400, "invalid_request_error"), 400)
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = str(err.get("msg"))
        if err.get("type") == "extra_forbidden":
            msg = "this parameter is not supported by this server"
        message = f"{'.'.join(loc)}: {msg}" if loc else msg
        return JSONResponse(error_body(message, 400, "invalid_request_error", loc[0] if loc else None), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = {404: "not_found_error"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(e.detail), e.status_code, kind), e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", 500, "internal_error"), 500)

    # -- routes -----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not s.loop.alive:
            raise APIError(503, "the engine loop has stopped", "service_unavailable")
        if engine.ranks is not None and not engine.ranks.alive:
            raise APIError(503, "a tensor-parallel rank has exited", "service_unavailable")
        return {}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": s.model_name,
            "object": "model",
            "created": now(),
            "owned_by": "branchwise",
            "root": engine.model_path,
            "max_model_len": engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        s.check_model(model_id)
        return (await models())["data"][0]

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest):
        return tokenize(s, req)

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest):
        return detokenize(s, req)

    @app.post("/v1/responses")
    async def create_response(req: ResponsesRequest, request: Request):
        return await responses.create(req, request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return responses.get(response_id)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await create_completion(s, req, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        return await create_chat_completion(s, req, request)

    return app

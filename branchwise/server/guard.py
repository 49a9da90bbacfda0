"""What stands in front of the routes: the API key (checked before a body is read), a body-size cap, and
uvicorn's HTTP protocol with a deadline for a request's headers (a connection that never finishes them
is closed)."""

from __future__ import annotations

import asyncio
import hmac
import json

import uvicorn
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from branchwise.config import ServerConfig
from branchwise.server.protocol import error_body

OPEN_PATHS = ("/health", "/metrics")  # probes and scrapers: never behind the key, as in vLLM


class Guard:
    """ASGI middleware: 401 without the key on every path but OPEN_PATHS, 413 for an oversized body."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            # constant time: how much of a wrong key matched must not show in the answer's timing
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                message = "Unauthorized: a valid API key is required"
                return await _reply(send, 401, error_body(message, 401, "authentication_error"))
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _reply(send, 413, _too_large(self.max_body_bytes))
        seen = 0

        async def capped_receive():  # a chunked body has no length up front: count as it arrives
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise HTTPException(413, _too_large(self.max_body_bytes)["error"]["message"])
            return message

        await self.app(scope, capped_receive, send)


def _too_large(limit: int) -> dict:
    message = f"the request body is larger than this server accepts ({limit} bytes, --max-request-bytes)"
    return error_body(message, 413, "invalid_request_error")


async def _reply(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection gets `timeout_keep_alive` seconds to send each request's
    headers in full (uvicorn only times out idle connections after a response, so a client that trickles
    its headers byte by byte would hold a connection forever)."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._waiting_for = self.cycle  # the request whose headers are awaited comes after this cycle
        self._deadline = self.loop.call_later(self.timeout_keep_alive, self._expire)

    def _expire(self) -> None:
        if self.cycle is self._waiting_for and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self._waiting_for:  # the headers are in: the route has the request now
            self._deadline.cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._deadline.cancel()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)


def uvicorn_config(app, config: ServerConfig) -> uvicorn.Config:
    """The server's uvicorn settings: header deadline and keep-alive, header size, graceful shutdown."""
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        http=DeadlineH11,
        timeout_keep_alive=config.http_timeout,
        h11_max_incomplete_event_size=64 * 1024,  # request line + headers
        timeout_graceful_shutdown=10,
    )

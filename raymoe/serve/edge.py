"""The HTTP edge of the ingress: API keys, body size and content type, before any route runs.

A pure ASGI middleware (`EdgeMiddleware`) on the ingress's FastAPI app, so every route is covered,
the ones added later included: 401 in the OpenAI error shape without a valid
`Authorization: Bearer <key>` on /v1/* when keys are set (/health stays open), 413 for a body
over `max_request_bytes` (from Content-Length, else counted while the body streams in, before
anything parses it), 415 for a body that is not JSON. The body is then handed to the app whole.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(slots=True)
class EdgeLimits:
    """What the edge enforces; set once per ingress replica process by `OpenAIIngress.__init__` (Serve
    runs one ingress per replica process, and the middleware is built from the app, not the replica,
    so it cannot read the replica's own fields)."""

    api_keys: list[bytes] = field(default_factory=list)
    max_request_bytes: int = 8 << 20


LIMITS = EdgeLimits()


async def send_error(
    send: Send, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """An OpenAI error object, sent before the app ran."""
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _json_media_type(value: str) -> bool:
    media = value.split(";", 1)[0].strip().lower()
    return media in ("application/json", "") or media.endswith("+json")


class EdgeMiddleware:
    """API keys, body size and content type for every route, before the app (and its parsing) runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = LIMITS
        root = scope.get("root_path", "")
        path = scope["path"][len(root):] if root and scope["path"].startswith(root) else scope["path"]
        headers = {k.lower(): v for k, v in scope["headers"]}
        if limits.api_keys and (path == "/v1" or path.startswith("/v1/")):
            auth = headers.get(b"authorization", b"")
            key = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            # every key compared (constant time each): the answer's timing does not tell which one is close
            if not sum(hmac.compare_digest(key, k) for k in limits.api_keys):
                await send_error(send, 401, "a valid API key is required: send `Authorization: Bearer <key>`",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return
        limit = limits.max_request_bytes
        too_large = f"the request body is larger than max_request_bytes ({limit} bytes)"
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            await send_error(send, 400, "the Content-Length header is not a number")
            return
        if length is not None and int(length) > limit:
            await send_error(send, 413, too_large, code="request_too_large")
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") and length is None:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away while sending
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_error(send, 413, too_large, code="request_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if size and not _json_media_type(headers.get(b"content-type", b"").decode("latin-1")):
            await send_error(send, 415, "the request body must be JSON (Content-Type: application/json)",
                              code="unsupported_media_type")
            return
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        chunks.clear()

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()  # after the body: the client's disconnect, for streamed responses

        await self.app(scope, replay, send)

"""Who and what reaches the model: the API key and the body's size, checked before any byte is parsed, errors in
OpenAI's shape, and the warning for a server bound beyond this machine without a key."""

import hmac
import ipaddress
from collections.abc import Callable
from typing import Any

# A 128k-token prompt is about 0.5 MB of English as JSON, about 1.1 MB of CJK text escaped as \uXXXX: 2 MiB holds
# any prompt a current model's context takes. SmolLM2 on the shared 2-core box: a 10 MB body is refused 413 in
# 0.08 s, peak RSS unchanged (it was a 400 after 9.7 s, /health waiting 9.5 s, +1.3 GB); a 2 MiB prompt, 400 in 0.11 s
# from its length in characters (it was 1.65 s of tokenizing).
MAX_REQUEST_BYTES = 2 * 1024 * 1024


def error_response(status: int, message: str, param: str | None = None, **headers: str) -> Any:
    """An error body in OpenAI's shape, which the openai SDK and ragtune's openai backend read."""
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers or None)


class Gate:
    """ASGI middleware in front of the app, before any byte of the body is parsed: the API key on /v1/*, then the
    body's size. A body is read here, up to `max_request_bytes`, and handed on whole; past the limit the answer is
    413 at once and uvicorn discards the rest of what the client sends."""

    def __init__(self, app: Any, *, api_key: str | None, max_request_bytes: int):
        self.app, self.max_request_bytes = app, max_request_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1") and not self._authorized(headers):
            message = ("incorrect API key provided." if b"authorization" in headers else
                       "no API key provided: send `Authorization: Bearer KEY` with the key ragtune serve was "
                       "started with (--api-key or RAGTUNE_SERVE_API_KEY).")
            return await error_response(401, message, **{"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_request_bytes:
            return await self._too_large(f"is {int(length)} bytes", scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_request_bytes:
                return await self._too_large(f"passed {self.max_request_bytes} bytes", scope, receive, send)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:  # later calls are the app waiting for a disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key or b"")

    async def _too_large(self, size: str, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        message = (f"the request body {size}: this server takes at most {self.max_request_bytes} bytes "
                   "(ragtune serve --max-request-bytes).")
        await error_response(413, message)(scope, receive, send)


def exposure_warning(host: str, port: int, api_key: str | None, rag: bool) -> str | None:
    """What to tell the user who binds beyond this machine without a key; None when the server is not exposed."""
    if api_key or is_loopback(host):
        return None
    return (f"--host {host} reaches beyond this machine and no --api-key (or RAGTUNE_SERVE_API_KEY) is set: anyone "
            f"who reaches port {port} can use the model" +
            (" and read the indexed documents' text (each answer's `retrieved` chunks)" if rag else "") +
            ". Set a key, or bind 127.0.0.1.")


def is_loopback(host: str) -> bool:
    """Whether `host` binds to this machine only: localhost, 127.0.0.0/8, ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False

"""The circuit breaker under the openai backend's HTTP client: an endpoint that stops answering costs about one
timeout, not timeout x retries per row."""

from __future__ import annotations

import threading

import httpx


def _circuit_open_error() -> type[Exception]:
    """An `openai.APIConnectionError` subclass: the SDK re-raises its own errors from a transport at once
    instead of retrying them, so an open circuit ends a request without the SDK's backoff."""
    import openai

    class CircuitOpen(openai.APIConnectionError):
        pass

    return CircuitOpen


class CircuitBreaker(httpx.BaseTransport):
    """An httpx transport that counts consecutive attempts without any HTTP answer (timeouts, refused or
    dropped connections) across all threads; at `threshold` it opens and every later attempt fails at once.
    It sits below the SDK's retries, so a hung endpoint costs about one timeout, not timeout x retries per row.
    Before opening on read timeouts it asks `probe_url` once: a server that answers that is alive but slow,
    so its rows keep failing as timeouts (raise `timeout`) instead of the stage stopping. Any HTTP response
    (an error status included) resets the count."""

    def __init__(self, inner: httpx.BaseTransport, threshold: int, probe_url: str, probe_timeout: float):
        self.inner, self.threshold = inner, threshold
        self.probe_url, self.probe_timeout = probe_url, probe_timeout
        self.failures, self.opened, self.last_error = 0, False, ""
        self.attempts = 0  # requests passed to the network, the SDK's retries included
        self._lock = threading.Lock()
        self._open_error = _circuit_open_error()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.opened:
            raise self._open_error(message=f"circuit open: {self.last_error}", request=request)
        with self._lock:
            self.attempts += 1
        try:
            response = self.inner.handle_request(request)
        except httpx.TransportError as err:
            with self._lock:
                self.failures += 1
                self.last_error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                if self.failures >= self.threshold and not self.opened:
                    self.opened = not (isinstance(err, httpx.ReadTimeout) and self._answers(request))
                    self.failures = self.failures if self.opened else 0
            if self.opened:
                raise self._open_error(message=f"circuit open: {self.last_error}", request=request) from err
            raise
        with self._lock:
            self.failures = 0
        return response

    def _answers(self, like: httpx.Request) -> bool:
        """Whether GET probe_url gets any HTTP response within probe_timeout (same auth headers as `like`)."""
        headers = {k: v for k, v in like.headers.items() if k.lower() in ("authorization", "api-key")}
        probe = httpx.Request("GET", self.probe_url, headers=headers,
                              extensions={"timeout": httpx.Timeout(self.probe_timeout).as_dict()})
        try:
            self.inner.handle_request(probe).close()
        except httpx.TransportError:
            return False
        return True

    def close(self) -> None:
        self.inner.close()

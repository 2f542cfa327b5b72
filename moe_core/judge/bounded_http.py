"""HTTP with bounds: a total deadline per request, a cap on the response size, no redirects.

Why: the openai client's timeout applies to each socket read, so a server that sends its headers and
then one byte every few seconds held a job for 20 minutes, a 50 MB error body became one error line,
and a redirect was followed to another port. Every call to a judge endpoint or a vLLM server goes
through ``bounded_client`` (an ``openai.DefaultHttpxClient``):

    client = bounded_client(total_s=60, max_bytes=1 << 20)   # then openai.OpenAI(http_client=client)

The deadline covers the whole request, headers and body, by bounding every read and write of the
connection to the time left (a network backend around httpcore's); the size cap counts the body as
it arrives. A redirect is returned as it is (a 3xx, never followed); ``status_message`` says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

try:  # the openai client's own HTTP stack (httpx2 in the pinned openai, httpx in older ones)
    import httpcore2 as httpcore
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed openai
    import httpcore  # type: ignore[no-redef]
    import httpx  # type: ignore[no-redef]

from moe_core.errors import MoELabError  # noqa: E402 - after the optional import above

_deadline = threading.local()  # the deadline of the request this thread is sending or reading


class ResponseTooLarge(MoELabError, httpx.TransportError):
    """The body went past the cap; the connection is closed and the request fails (never half-read)."""


def _time_left(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` bounded by what is left of this thread's request deadline; raises ``error`` when none is."""
    deadline = getattr(_deadline, "at", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error(f"the request's total deadline ({_deadline.total_s:g} s) passed")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    """A connection whose every read and write waits at most the time left to the request."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _time_left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _time_left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> Any:
        return _Stream(
            self._inner.start_tls(ssl_context, server_hostname, _time_left(timeout, httpcore.ConnectTimeout))
        )

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.SyncBackend):
    def connect_tcp(self, host: str, port: int, timeout: float | None = None, **kw: Any) -> Any:
        return _Stream(super().connect_tcp(host, port, _time_left(timeout, httpcore.ConnectTimeout), **kw))

    def connect_unix_socket(self, path: str, timeout: float | None = None, **kw: Any) -> Any:
        return _Stream(super().connect_unix_socket(path, _time_left(timeout, httpcore.ConnectTimeout), **kw))


class _Body(httpx.SyncByteStream):
    """The response body, read under the request's deadline and counted against the size cap."""

    def __init__(self, inner: Any, deadline: float, total_s: float, max_bytes: int, url: Any) -> None:
        self._inner, self._deadline, self._total_s = inner, deadline, total_s
        self._max_bytes, self._url = max_bytes, url

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        chunks = iter(self._inner)
        while True:
            with _within(self._deadline, self._total_s):
                chunk = next(chunks, None)
            if chunk is None:
                return
            seen += len(chunk)
            if seen > self._max_bytes:
                self.close()
                raise ResponseTooLarge(
                    f"{self._url} sent more than {self._max_bytes:,} bytes; moe_core reads at most that much"
                )
            yield chunk

    def close(self) -> None:
        self._inner.close()


class _within:
    def __init__(self, deadline: float, total_s: float) -> None:
        self.deadline, self.total_s = deadline, total_s

    def __enter__(self) -> None:
        _deadline.at, _deadline.total_s = self.deadline, self.total_s

    def __exit__(self, *exc: Any) -> None:
        _deadline.at = None


class BoundedTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` with a total deadline per request and a cap on the response body."""

    def __init__(self, total_s: float, max_bytes: int, **kw: Any) -> None:
        if total_s <= 0 or max_bytes < 1:
            raise ValueError(f"a deadline > 0 s and a size cap >= 1 byte, got {total_s} s and {max_bytes}")
        super().__init__(**kw)
        pool = getattr(self, "_pool", None)
        if not hasattr(
            pool, "_network_backend"
        ):  # pragma: no cover - a changed httpx would lose the deadline
            raise RuntimeError("this httpx has no connection pool backend to bound; pin the openai package")
        pool._network_backend = _Backend()
        self.total_s, self.max_bytes = total_s, max_bytes

    def handle_request(self, request: Any) -> Any:
        deadline = time.monotonic() + self.total_s
        with _within(deadline, self.total_s):
            response = super().handle_request(request)
        response.stream = _Body(response.stream, deadline, self.total_s, self.max_bytes, request.url)
        return response


def bounded_client(total_s: float, max_bytes: int, **kw: Any) -> Any:
    """An ``openai.DefaultHttpxClient`` whose requests end within ``total_s`` seconds, read at most
    ``max_bytes`` of body and never follow a redirect (``kw``: e.g. ``event_hooks``)."""
    import openai

    return openai.DefaultHttpxClient(
        transport=BoundedTransport(total_s, max_bytes), follow_redirects=False, timeout=total_s, **kw
    )


def status_message(status: int, headers: Any, body: str, limit: int = 300) -> str:
    """A one-line reason for a non-2xx answer: a redirect names where to (not followed), long bodies cut."""
    if 300 <= status < 400:
        where = headers.get("location") if headers is not None else None
        return f"it answered with a redirect ({status}) to {where or 'another address'}, which is not followed: use that address directly"
    text = " ".join(str(body).split())
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"

"""Issue 21 rows 3 and 11: every HTTP call (judge, vLLM) ends within its total deadline, reads a bounded body
and follows no redirect. Real faults: a local socket server that drips its answer one byte at a time, sends
a 50 MB body, or redirects to another port (the other port counts what reaches it)."""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from moe_core.judge.http import HTTPJudge, HTTPJudgeConfig
from moe_core.judge.judges import make_judge
from moe_core.judge.verdicts import JudgeError
from moe_core.model.backends import VLLMGenerator
from moe_core.model.vllm_server import Server, VLLMError, healthy

HANG_S = 600  # what the drip would take to finish; each case must end long before
DRIP_EVERY_S = 0.3
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n"


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        try:
            self.request.recv(65536)  # the request (small: one JSON body)
        except OSError:
            return
        self.server.hits += 1  # type: ignore[attr-defined]
        mode, sock = self.server.mode, self.request  # type: ignore[attr-defined]
        try:
            if mode in ("drip_body", "drip_head"):
                data = OK_HEAD + b" " * 4000
                if mode == "drip_body":
                    sock.sendall(OK_HEAD)
                    data = data[len(OK_HEAD) :]
                for i in range(len(data)):
                    if self.server.closing.is_set():  # type: ignore[attr-defined]
                        return
                    sock.sendall(data[i : i + 1])
                    time.sleep(DRIP_EVERY_S)
            elif mode == "big":
                body = b"e" * (50 << 20)
                head = f"HTTP/1.1 500 Internal Server Error\r\nContent-Length: {len(body)}\r\n\r\n"
                sock.sendall(head.encode() + body)
            elif mode == "redirect":
                where = f"http://127.0.0.1:{self.server.target}/v1/chat/completions"  # type: ignore[attr-defined]
                sock.sendall(f"HTTP/1.1 302 Found\r\nLocation: {where}\r\nContent-Length: 0\r\n\r\n".encode())
        except OSError:
            return  # the client hung up: what a bounded client does


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def serve() -> Iterator:
    servers: list[_Server] = []

    def start(mode: str, target: int | None = None) -> _Server:
        s = _Server(("127.0.0.1", 0), _Handler)
        s.mode, s.target, s.hits, s.closing = mode, target, 0, threading.Event()
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.closing.set()
        s.shutdown()
        s.server_close()


def _url(s: _Server) -> str:
    return f"http://127.0.0.1:{s.server_address[1]}/v1"


def _judge(s: _Server, **kw) -> HTTPJudge:
    return HTTPJudge(HTTPJudgeConfig(base_url=_url(s), model="m", max_retries=0, cache_path=None, **kw))


@pytest.mark.parametrize("mode", ["drip_body", "drip_head"])
def test_r3_a_judge_that_drips_its_answer_ends_at_the_total_deadline(serve, mode):
    s = serve(mode)
    t0 = time.monotonic()
    with pytest.raises(JudgeError, match=r"timed out after 1\.5s"):
        _judge(s, timeout_s=1.5).judge(["p"], ["r"])
    assert time.monotonic() - t0 < HANG_S / 10  # ended by the deadline, not by the drip (600 s)
    assert s.hits == 1


def test_r3_a_vllm_server_that_drips_ends_at_the_total_deadline_and_health_checks_too(serve):
    s = serve("drip_body")
    gen = VLLMGenerator(Server(url=_url(s), model="m"), timeout=1.5)
    t0 = time.monotonic()
    with pytest.raises(VLLMError, match=r"did not finish the batch within 1\.5 s.*MOE_LAB_VLLM_TIMEOUT_S"):
        gen.complete([[1, 2, 3]], 4, [0])
    assert not healthy(_url(s), timeout=1.0)
    assert time.monotonic() - t0 < HANG_S / 10


def test_r11_a_huge_error_body_is_cut_and_named_in_one_short_line(serve):
    s = serve("big")
    with pytest.raises(JudgeError) as e:
        _judge(s, timeout_s=60).judge(["p"], ["r"])
    message = str(e.value)
    assert len(message) < 600 and "\n" not in message
    assert "1,048,576 bytes" in message  # the default cap of a judge reply (max_response_bytes)
    assert "max_response_bytes" in str(make_judge(f"{_url(s)}?model=m&max_response_bytes=10").config)


def test_r11_a_redirect_is_not_followed_and_says_where_it_pointed(serve):
    other = serve("drip_body")
    s = serve("redirect", target=other.server_address[1])
    with pytest.raises(
        JudgeError, match=r"redirect \(302\) to http://127\.0\.0\.1:\d+/v1/chat.*not followed"
    ):
        _judge(s, timeout_s=10).judge(["p"], ["r"])
    gen = VLLMGenerator(Server(url=_url(s), model="m"), timeout=10)
    with pytest.raises(VLLMError, match=r"redirect \(302\).*not followed"):
        gen.complete([[1, 2]], 2, [0])
    assert not healthy(_url(s), timeout=2.0)
    assert other.hits == 0  # nothing reached the other port


def test_a_bounded_client_still_reads_an_ordinary_answer(serve):
    """The bounds do not get in the way of a server that answers normally (the judge's JSON reply)."""
    import json

    class Ok(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            body = json.dumps(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "m",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "REFUSAL"},
                            "finish_reason": "stop",
                        }
                    ],
                }
            ).encode()
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            self.request.sendall(head.encode() + body)

    srv = _Server(("127.0.0.1", 0), Ok)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        verdict = _judge(srv, timeout_s=10).judge(["p"], ["r"])[0]
        assert verdict.refusal
    finally:
        srv.shutdown()
        srv.server_close()

"""A stand-in LLM for `s2s-bench e2e --agent fixed`: an OpenAI-compatible streaming server whose
time to first token is fixed (`ttft`, e.g. 0.2 s: what a local LLM on the reference host's RTX
3080 gives), so an end-to-end figure includes a realistic agent without one being installed.

    with FixedLatencyAgent(ttft=0.2) as agent:
        agent.url                 # http://127.0.0.1:PORT (agent.kind openai)
        agent.requests, agent.disconnected

It answers every `POST /v1/chat/completions` (stream: true) with a two-sentence reply in the
language of the user's text, one short token every `token_delay` seconds after the first;
`GET /v1/models` answers the bridge's probe. A client that closes the stream (a cancelled
speculative turn, barge-in) is counted in `disconnected`. A benchmark tool, not serving code.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from typing import Any, List, Optional, Type

_CJK = re.compile(r"[\u3400-\u9fff]")


def reply_tokens(user_text: str) -> List[str]:
    if _CJK.search(user_text or ""):
        text = "好的，我听到了。这是回答的第二句话。"
        return [text[i:i + 2] for i in range(0, len(text), 2)]
    return [w + " " for w in "Sure, I heard you. This is the second sentence of the answer.".split()]


class QuietServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server that does not print the tracebacks of clients gone mid-request."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # a client gone mid-request is normal here
            super().handle_error(request, client_address)


class JSONHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1, no per-request log lines, `_json` answers; `srv` is the AgentServer."""

    srv: Any
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, obj: Any) -> None:
        raw = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


class AgentServer:
    """A stand-in agent's HTTP server on its own thread: `url`, `start`/`stop`, a context manager.
    FixedLatencyAgent here and the tests' scripted FakeAgentServer (tests/fake_langgraph.py) are
    both one, each with its own `handler` (a JSONHandler whose `srv` is the server)."""

    def __init__(self, handler: Type[JSONHandler], host: str = "127.0.0.1", port: int = 0):
        server = self

        class Handler(handler):  # type: ignore[valid-type,misc]
            srv = server

        self.httpd = QuietServer((host, port), Handler)
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> "AgentServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class FixedLatencyAgent(AgentServer):
    def __init__(self, ttft: float = 0.2, token_delay: float = 0.02, host: str = "127.0.0.1", port: int = 0):
        self.ttft = ttft
        self.token_delay = token_delay
        self.requests = 0
        self.disconnected = 0
        self._lock = threading.Lock()
        super().__init__(_Handler, host, port)


class _Handler(JSONHandler):
    srv: FixedLatencyAgent

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "fixed", "object": "model"}]})
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(n) or b"{}")
        except ValueError:
            body = {}
        if not self.path.endswith("/chat/completions") or not isinstance(body, dict):
            self._json(404, {"detail": "Not Found"})
            return
        msgs = body.get("messages") or []
        user = msgs[-1].get("content", "") if msgs and isinstance(msgs[-1], dict) else ""
        with self.srv._lock:
            self.srv.requests += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            time.sleep(self.srv.ttft)
            for i, tok in enumerate(reply_tokens(str(user))):
                if i:
                    time.sleep(self.srv.token_delay)
                self._event({"choices": [{"index": 0, "delta": {"content": tok}}]})
            self._event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:  # the client closed the stream
            with self.srv._lock:
                self.srv.disconnected += 1
            self.close_connection = True

    def _event(self, data: Any) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        raw = f"data: {text}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
        self.wfile.flush()

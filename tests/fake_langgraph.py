"""FAKE agent server for tests: a real local HTTP server speaking a subset of the
LangGraph server API and of the OpenAI chat-completions streaming API, with scripted
replies and controllable per-token delays.

    with FakeAgentServer(script=["Hello there. How are you?"], token_delay=0.05) as srv:
        srv.url                      # http://127.0.0.1:PORT
        srv.runs[-1].disconnected    # did the client drop the stream?

LangGraph subset (what bridge/agents.py uses):
    GET  /ok, GET /info                          liveness
    POST /threads                                -> {"thread_id": ...}
    POST /threads/{thread_id}/runs/{run_id}/cancel   marks the run cancelled; action=rollback also
                                                 takes its messages out of the thread
    POST /threads/{thread_id}/runs/stream        SSE, HTTP/1.1 chunked:
         event: metadata  data: {"run_id": ..., "attempt": 1}
         stream_mode "messages-tuple": event: messages  data: [AIMessageChunk, metadata] per token
         stream_mode "messages" (legacy): messages/metadata, messages/partial (cumulative), messages/complete
         event: end
OpenAI subset:
    GET  /v1/models
    POST /v1/chat/completions (stream: true)     SSE data: chat.completion.chunk ... data: [DONE]

Failure modes (set `fail_mode` and `fail_after` tokens): "error" (an SSE error event),
"drop" (close the connection mid-stream), "hang" (stop sending, keep the connection open),
"http500" (answer 500 at once), "plainjson" / "html" (answer 200 with a JSON body or an HTML page
instead of an event stream), "hugeline" (one `data:` line of `huge_line_bytes` bytes, sent in 1 MiB
chunks, before the first token). `runs` records every streamed run: user text, tokens sent
with their send times, and whether the client disconnected before the end.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

from daemon.tools.bench_agent import AgentServer, JSONHandler

Script = Union[Sequence[str], Callable[[str, int], str]]

_TOKEN = re.compile(r"\s*(?:[A-Za-z0-9'’]+|[^\sA-Za-z0-9'’])")


def tokenize(text: str) -> List[str]:
    """Words (with their leading space) and single CJK characters / punctuation marks."""
    return _TOKEN.findall(text)


@dataclass
class RunRecord:
    api: str                      # "langgraph" | "openai"
    thread_id: str
    user_text: str
    reply: str
    request: dict
    tokens_sent: List[str] = field(default_factory=list)
    token_times: List[float] = field(default_factory=list)   # time.monotonic() after each send
    started: float = field(default_factory=time.monotonic)
    completed: bool = False
    disconnected: bool = False
    disconnected_at: Optional[float] = None
    run_id: str = ""
    cancelled: str = ""           # the cancel's action ("interrupt" | "rollback"), when cancelled
    huge_bytes_sent: int = 0      # fail_mode "hugeline": bytes of the line sent so far

    @property
    def last_token_time(self) -> Optional[float]:
        return self.token_times[-1] if self.token_times else None


def wait_for(pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll pred until it is true (True) or timeout seconds pass (its last answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


class _ClientGone(Exception):
    pass


class FakeAgentServer(AgentServer):
    def __init__(self, script: Script = ("好的。",), token_delay: float = 0.0, first_token_delay: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0):
        self.script = script
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay
        self.fail_mode: Optional[str] = None
        self.fail_after = 0
        self.huge_line_bytes = 100 << 20   # fail_mode "hugeline"
        self.threads: Dict[str, List[str]] = {}
        self.runs: List[RunRecord] = []
        self.requests: List[str] = []   # "METHOD /path" of every request
        self.requests_bodies: List[dict] = []   # JSON bodies of chat-completions requests
        self._lock = threading.Lock()
        super().__init__(_Handler, host, port)   # url, start/stop, with: daemon/tools/bench_agent.py

    def reset(self, **settings) -> None:
        """Forget recorded runs; set script / token_delay / fail_mode / fail_after etc."""
        with self._lock:
            self.runs.clear()
            self.requests.clear()
            self.requests_bodies.clear()
            self.fail_mode = None
            self.fail_after = 0
            self.huge_line_bytes = 100 << 20
            for k, v in settings.items():
                if not hasattr(self, k):
                    raise AttributeError(k)
                setattr(self, k, v)

    def wait_for(self, pred: Callable[[], bool], timeout: float = 5.0) -> bool:
        return wait_for(pred, timeout)

    # --- script ---

    def reply_for(self, user_text: str, turn: int) -> str:
        if callable(self.script):
            return self.script(user_text, turn)
        replies = list(self.script)
        return replies[turn % len(replies)]


class _Handler(JSONHandler):
    srv: FakeAgentServer
    server_version = "fake-langgraph/1"

    # --- plumbing ---

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            d = json.loads(raw or b"{}")
        except ValueError:
            d = None
        return d if isinstance(d, dict) else {}

    def _client_gone(self) -> bool:
        """True when the peer has closed its end (readable with EOF)."""
        sock = self.connection
        try:
            r, _, _ = select.select([sock], [], [], 0)
            if not r:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _chunk(self, data: bytes) -> None:
        if self._client_gone():
            raise _ClientGone()
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise _ClientGone() from None

    def _sse(self, event: Optional[str], data) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        head = f"event: {event}\n" if event else ""
        self._chunk((head + f"data: {text}\n\n").encode("utf-8"))

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _end_chunks(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass

    # --- routes ---

    def do_GET(self) -> None:
        self.srv.requests.append(f"GET {self.path}")
        if self.path == "/ok":
            self._json(200, {"ok": True})
        elif self.path == "/info":
            self._json(200, {"version": "fake", "flags": {}})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        else:
            self._json(404, {"detail": "Not Found"})

    def do_DELETE(self) -> None:
        self.srv.requests.append(f"DELETE {self.path}")
        m = re.fullmatch(r"/threads/([^/]+)", self.path)
        if m and self.srv.threads.pop(m.group(1), None) is not None:
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._json(404, {"detail": "Not Found"})

    def _not_sse(self) -> bool:
        """fail_mode plainjson / html: a 200 answer that is not an event stream."""
        mode = self.srv.fail_mode
        if mode not in ("plainjson", "html"):
            return False
        body = (json.dumps({"choices": [{"message": {"content": "not streamed"}}]}).encode() if mode == "plainjson"
                else b"<html><body><h1>502 Bad Gateway</h1></body></html>")
        self.send_response(200)
        self.send_header("Content-Type", "application/json" if mode == "plainjson" else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return True

    def do_POST(self) -> None:
        srv = self.srv
        srv.requests.append(f"POST {self.path}")
        body = self._body()
        m = re.fullmatch(r"/threads/([^/]+)/runs/stream", self.path)
        c = re.fullmatch(r"/threads/([^/]+)/runs/([^/?]+)/cancel(?:\?(.*))?", self.path)
        if c:
            self._cancel(c.group(1), c.group(2), c.group(3) or "")
        elif self.path == "/threads":
            tid = str(uuid.uuid4())
            srv.threads[tid] = []
            self._json(200, {"thread_id": tid, "status": "idle", "metadata": {}, "values": None})
        elif m:
            if not self._not_sse():
                self._langgraph_run(m.group(1), body)
        elif self.path == "/v1/chat/completions":
            srv.requests_bodies.append(body)
            if not self._not_sse():
                self._openai(body)
        else:
            self._json(404, {"detail": "Not Found"})

    def _cancel(self, tid: str, run_id: str, query: str) -> None:
        rec = next((r for r in self.srv.runs if r.run_id == run_id and r.thread_id == tid), None)
        if rec is None:
            self._json(404, {"detail": "Run not found"})
            return
        action = "rollback" if "action=rollback" in query else "interrupt"
        rec.cancelled = action
        history = self.srv.threads.get(tid, [])
        if action == "rollback":
            for text in (rec.user_text, "".join(rec.tokens_sent)):
                if text in history:
                    history.remove(text)
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _record(self, api: str, thread_id: str, user_text: str, turn: int, body: dict) -> RunRecord:
        srv = self.srv
        rec = RunRecord(api=api, thread_id=thread_id, user_text=user_text,
                        reply=srv.reply_for(user_text, turn), request=body)
        with srv._lock:
            srv.runs.append(rec)
        return rec

    def _stream_tokens(self, rec: RunRecord, send_token: Callable[[str], None], send_error: Callable[[], None]) -> bool:
        """Send the reply token by token; False when the stream was cut on purpose."""
        srv = self.srv
        toks = tokenize(rec.reply)
        if srv.first_token_delay:
            self._sleep(rec, srv.first_token_delay)
        for i, tok in enumerate(toks):
            if srv.fail_mode and i >= srv.fail_after:
                if srv.fail_mode == "error":
                    send_error()
                    return False
                if srv.fail_mode == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return False
                if srv.fail_mode == "hang":
                    self._sleep(rec, 120.0)
                    return False
                if srv.fail_mode == "hugeline":
                    self._huge_line(rec, srv.huge_line_bytes)
                    return False
            if i and srv.token_delay:
                self._sleep(rec, srv.token_delay)
            send_token(tok)
            rec.tokens_sent.append(tok)
            rec.token_times.append(time.monotonic())
        return True

    def _huge_line(self, rec: RunRecord, size: int) -> None:
        """One SSE `data:` line of `size` bytes without a newline until the end (1 MiB chunks,
        so this server never holds it whole)."""
        piece = b"x" * (1 << 20)
        self._chunk(b"data: ")
        sent = 0
        while sent < size:
            n = min(len(piece), size - sent)
            self._chunk(piece[:n])
            sent += n
            rec.huge_bytes_sent = sent
        self._chunk(b"\n\n")
        self._end_chunks()

    def _sleep(self, rec: RunRecord, seconds: float) -> None:
        """Sleep, noticing a client that goes away meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._client_gone():
                raise _ClientGone()
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    def _langgraph_run(self, tid: str, body: dict) -> None:
        srv = self.srv
        if tid not in srv.threads:
            self._json(404, {"detail": f"Thread {tid} not found"})
            return
        if not body.get("assistant_id"):
            self._json(422, {"detail": "assistant_id is required"})
            return
        msgs = (body.get("input") or {}).get("messages") or []
        user_text = msgs[-1].get("content", "") if msgs and isinstance(msgs[-1], dict) else ""
        history = srv.threads[tid]
        turn = sum(1 for r in srv.runs if r.thread_id == tid)  # runs so far in this thread
        rec = self._record("langgraph", tid, user_text, turn, body)
        history.append(user_text)
        if srv.fail_mode == "http500":
            self._json(500, {"detail": "internal error"})
            return
        modes = body.get("stream_mode") or ["values"]
        modes = [modes] if isinstance(modes, str) else modes
        legacy = "messages" in modes and "messages-tuple" not in modes
        run_id = rec.run_id = str(uuid.uuid4())
        msg_id = f"run-{run_id}"
        meta = {"langgraph_node": "agent", "langgraph_step": 1, "thread_id": tid, "run_id": run_id,
                "ls_model_name": "fake"}
        acc: List[str] = []
        try:
            self._start_sse()
            self._sse("metadata", {"run_id": run_id, "attempt": 1})
            self._chunk(b": heartbeat\n\n")
            if legacy:
                self._sse("messages/metadata", {msg_id: {"metadata": meta}})

            def send_token(tok: str) -> None:
                acc.append(tok)
                if legacy:
                    self._sse("messages/partial", [{"type": "ai", "id": msg_id, "content": "".join(acc),
                                                    "tool_calls": [], "response_metadata": {}}])
                else:
                    self._sse("messages", [{"type": "AIMessageChunk", "id": msg_id, "content": tok,
                                            "tool_call_chunks": [], "additional_kwargs": {}}, meta])

            def send_error() -> None:
                self._sse("error", {"error": "RuntimeError", "message": "fake agent failure"})
                self._end_chunks()

            ok = self._stream_tokens(rec, send_token, send_error)
            if ok:
                if legacy:
                    self._sse("messages/complete", [{"type": "ai", "id": msg_id, "content": "".join(acc)}])
                self._sse("end", "null")
                self._end_chunks()
                rec.completed = True
                history.append("".join(acc))
        except _ClientGone:
            rec.disconnected = True
            rec.disconnected_at = time.monotonic()
            self.close_connection = True

    def _openai(self, body: dict) -> None:
        srv = self.srv
        msgs = body.get("messages") or []
        user_text = msgs[-1].get("content", "") if msgs and isinstance(msgs[-1], dict) else ""
        turn = sum(1 for m in msgs if isinstance(m, dict) and m.get("role") == "user") - 1
        rec = self._record("openai", "", user_text, max(turn, 0), body)
        if srv.fail_mode == "http500":
            self._json(500, {"error": {"message": "internal error"}})
            return
        if not body.get("stream"):
            self._json(400, {"error": {"message": "this fake only streams"}})
            return
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"

        def chunk(delta: dict, finish=None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": "fake-model",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        try:
            self._start_sse()
            self._sse(None, chunk({"role": "assistant", "content": ""}))

            def send_error() -> None:
                self._sse(None, {"error": {"message": "fake agent failure", "type": "server_error"}})
                self._end_chunks()

            ok = self._stream_tokens(rec, lambda tok: self._sse(None, chunk({"content": tok})), send_error)
            if ok:
                self._sse(None, chunk({}, "stop"))
                self._sse(None, "[DONE]")
                self._end_chunks()
                rec.completed = True
        except _ClientGone:
            rec.disconnected = True
            rec.disconnected_at = time.monotonic()
            self.close_connection = True


def main(argv: Optional[List[str]] = None) -> None:
    """Run standalone for manual tries: python -m tests.fake_langgraph [PORT] [TOKEN_DELAY]."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    port = int(argv[0]) if argv else 8000
    delay = float(argv[1]) if len(argv) > 1 else 0.08
    srv = FakeAgentServer(script=lambda text, turn: f"好的，我听到了：{text}。还有什么可以帮你？", token_delay=delay, port=port)
    srv.start()
    sys.stderr.write(f"fake agent on {srv.url} (Ctrl-C stops)\n")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()

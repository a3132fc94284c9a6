"""The REAL LangGraph server as a test fixture: `langgraph dev` (langgraph-api with the in-memory
runtime) from ./.venv-langgraph, serving tests/langgraph_server/graph.py (a one-node graph whose
model is langchain_core's GenericFakeChatModel) on a free loopback port.

    real_langgraph = langgraph_real.real_langgraph      # in a test module: the module-scoped fixture
    def test_x(real_langgraph):
        real_langgraph.url                                 # http://127.0.0.1:PORT
        real_langgraph.messages(thread_id)                 # [(type, text), ...] of the thread's state

The venv is made by scripts/langgraph-venv.sh (scripts/test.sh runs it before pytest; the fixture
runs it when the venv is missing or stale). If it cannot be installed (no PyPI) the tests FAIL
and say so: they are never skipped. By hand: `cd tests/langgraph_server &&
../../.venv-langgraph/bin/langgraph dev --no-browser` serves the same graph on :2024. The server runs under the suite's offline guard (it inherits
S2S_OFFLINE_GUARD / S2S_OFFLINE_LOG), with tracing, analytics, the PyPI version check and file
persistence off, so it never leaves the machine and writes nothing into the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_DIR = ROOT / "tests" / "langgraph_server"
REQUIREMENTS = SERVER_DIR / "requirements.txt"
SCRIPT = ROOT / "scripts" / "langgraph-venv.sh"
OFFLINE_DIR = ROOT / "tests" / "offline"
# Anything that could send the server (or the fake model's callbacks) to a hosted service.
_DROP = ("LANGSMITH_API_KEY", "LANGCHAIN_API_KEY", "LANGGRAPH_CLOUD_LICENSE_KEY", "LANGSMITH_CONTROL_PLANE_API_KEY",
         "LANGSMITH_ENDPOINT", "LANGCHAIN_ENDPOINT", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "PYTHONHOME",
         "VIRTUAL_ENV")


def venv_dir() -> Path:
    return Path(os.environ.get("S2S_LANGGRAPH_VENV") or ROOT / ".venv-langgraph")


def venv_ready() -> bool:
    v = venv_dir()
    stamp = v / ".s2s-installed"
    want = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    return (v / "bin" / "langgraph").exists() and stamp.exists() and stamp.read_text().strip() == want


def ensure_venv() -> Path:
    """The server's venv, installed first if missing or stale; pytest.fail (never skip) if that fails."""
    if venv_ready():
        return venv_dir()
    # The install is not part of any test: pip reaches PyPI, so it runs without the offline guard.
    env = {k: v for k, v in os.environ.items() if k not in ("S2S_OFFLINE_GUARD", "PYTHONPATH")}
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                       check=False)
    if r.returncode != 0 or not venv_ready():
        out = (r.stdout + r.stderr).strip().splitlines()
        pytest.fail(f"the real LangGraph server could not be installed: scripts/langgraph-venv.sh exited "
                     f"{r.returncode} after {time.monotonic() - t0:.0f} s (it needs PyPI once; run it by hand on a "
                     "machine that reaches PyPI). Last lines:\n" + "\n".join(out[-15:]), pytrace=False)
    return venv_dir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LangGraphServer:
    """`langgraph dev` as a real process (its own process group), and the server API the tests read."""

    def __init__(self, log: Path, token_delay: float = 0.03, port: int = 0):
        self.log = log
        self.port = port or free_port()
        self.token_delay = token_delay
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> Self:
        venv = ensure_venv()
        env = {k: v for k, v in os.environ.items() if k not in _DROP}
        env.update({
            # the suite's offline guard, and nothing of the project's code on its path
            "PYTHONPATH": str(OFFLINE_DIR),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "LANGSMITH_TRACING": "false",
            "LANGCHAIN_TRACING_V2": "false",
            "LANGGRAPH_CLI_NO_ANALYTICS": "1",
            "LANGGRAPH_NO_VERSION_CHECK": "true",
            "S2S_FAKE_LLM_DELAY": str(self.token_delay),
            "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        })
        # `langgraph dev` resolves the config's paths against its working directory and makes an
        # (empty) .langgraph_api/ there: it runs in the log's folder, on a copy with absolute paths.
        work = self.log.parent
        conf = json.loads((SERVER_DIR / "langgraph.json").read_text(encoding="utf-8"))
        conf["dependencies"] = [str(SERVER_DIR)]
        conf["graphs"] = {gid: str(SERVER_DIR / spec.removeprefix("./")) for gid, spec in conf["graphs"].items()}
        (work / "langgraph.json").write_text(json.dumps(conf), encoding="utf-8")
        args = [str(venv / "bin" / "langgraph"), "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1",
                "--port", str(self.port), "--n-jobs-per-worker", "4", "--config", str(work / "langgraph.json")]
        t0 = time.monotonic()
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(args, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = t0 + timeout
        while True:
            try:
                # (and still alive: the answer is this server's, not another's on a reused port)
                if self.get("/ok", timeout=1.0).get("ok") and self.proc.poll() is None:
                    break
            except (OSError, AssertionError, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the LangGraph server did not answer on {self.url}/ok within {timeout:g} s:\n"
                                   + self.text()[-4000:])
            time.sleep(0.1)
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # its own group (start_new_session): only what it started
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        return p.returncode

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the server's own API (plain urllib: independent of the client under test) ---

    def request(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw.strip() else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode("utf-8", "replace")

    def get(self, path: str, timeout: float = 10.0) -> Any:
        status, body = self.request("GET", path, timeout=timeout)
        if status >= 400:
            raise AssertionError(f"GET {path}: HTTP {status}: {body}")
        return body

    def thread(self, thread_id: str) -> tuple[int, Any]:
        return self.request("GET", f"/threads/{thread_id}")

    def messages(self, thread_id: str) -> list[tuple[str, str]]:
        """(type, text) of each message in the thread's current state."""
        state = self.get(f"/threads/{thread_id}/state")
        return [(m["type"], m["content"]) for m in ((state or {}).get("values") or {}).get("messages", [])]

    def history_texts(self, thread_id: str) -> list[str]:
        """Every message text in every checkpoint the thread still has (its whole history)."""
        status, hist = self.request("POST", f"/threads/{thread_id}/history", {"limit": 1000})
        assert status == 200, (status, hist)
        return [m["content"] for cp in hist for m in (cp.get("values") or {}).get("messages", [])]

    def runs(self, thread_id: str) -> list[dict[str, Any]]:
        return self.get(f"/threads/{thread_id}/runs?limit=100")

    def active_runs(self, thread_id: str) -> list[dict[str, Any]]:
        return [r for r in self.runs(thread_id) if r["status"] in ("pending", "running")]

    def run_status(self, thread_id: str, run_id: str) -> str | None:
        """The run's status, or None when the server has no such run (deleted / rolled back)."""
        status, body = self.request("GET", f"/threads/{thread_id}/runs/{run_id}")
        if status == 404:
            return None
        assert status == 200, (status, body)
        return body["status"]


@pytest.fixture(scope="module")
def real_langgraph(tmp_path_factory) -> Iterator[LangGraphServer]:
    """A real LangGraph server (`langgraph dev`, in-memory) for one test module."""
    log = tmp_path_factory.mktemp("langgraph") / "langgraph-dev.log"
    srv = LangGraphServer(log).start()
    try:
        yield srv
    finally:
        rc = srv.stop()
        if rc not in (0, -signal.SIGTERM, None):
            print(f"langgraph dev exited {rc}:\n{srv.text()[-2000:]}")

"""The offline guard is active in this process and in every Python subprocess."""

import os
import socket
import subprocess
import sys

import pytest


def test_guard_blocks_non_loopback_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("S2S_OFFLINE_LOG", str(tmp_path / "log"))  # keep the session log clean
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(OSError, match="offline guard"):
            s.connect(("93.184.216.34", 80))
    finally:
        s.close()
    with pytest.raises(OSError, match="offline guard"):
        socket.getaddrinfo("huggingface.co", 443)
    assert "93.184.216.34" in (tmp_path / "log").read_text()


def test_guard_allows_loopback():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = socket.create_connection(srv.getsockname(), timeout=2)
    c.close()
    srv.close()
    assert socket.getaddrinfo("localhost", 80)


def test_guard_active_in_subprocess(tmp_path):
    env = dict(os.environ, S2S_OFFLINE_LOG=str(tmp_path / "log"))
    code = "import socket; socket.create_connection(('modelscope.cn', 443), timeout=2)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "offline guard" in r.stderr
    assert "modelscope.cn" in (tmp_path / "log").read_text()

"""One owner for every reloadable value (issue 27 item 3): the daemon resolves each request's
options once, from the live config; engines keep load-time settings only; config validation
calls the same rules as requests. Each test here failed before its fix.

The daemon tests run the real daemon (`python -m daemon`) with real engines: the tiny SeACo
Paraformer (whose hotword bias changes a random model's text, so the words a session really got
show in its final) and Piper."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest

from daemon.audio import float_to_pcm16, read_wav
from daemon.config import ConfigError, parse_config
from daemon.rules import MAX_SPEED
from daemon.wire import protocol as P
from daemon.wire.client import ASRClient, TTSClient
from daemon_harness import DaemonProcess
from helpers.funasr_tiny import daemon_config

DEFAULT_WORDS = ["阳台", "浇水"]


def _config(models_dir: Path, hotwords: Sequence[str] = (), limits: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return daemon_config(models_dir, "tiny/seaco-paraformer", hotwords, limits)


def _reload(p: DaemonProcess, **sections: Dict[str, Any]) -> str:
    """Rewrite the config with these section updates, SIGHUP, and return the STATUS line."""
    cfg = json.loads(json.dumps(p.config))
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    p.config = cfg
    p.write_config(cfg)
    mark = time.monotonic()
    p.signal(signal.SIGHUP)
    assert p.notify.wait_for("STATUS=reload", 10, after=mark) is not None, p.log()
    return [line for t, line in p.notify.lines if t >= mark and line.startswith("STATUS=reload")][0]


def _final_text(endpoint: str, pcm: bytes, hotwords: Optional[Sequence[str]]) -> str:
    with ASRClient(endpoint, timeout=120) as c:
        st = c.open(language="zh", partials=False, hotwords=hotwords)
        for off in range(0, len(pcm), 32000):
            st.send(pcm[off:off + 32000])
        finals = [m for m in st.finalize(timeout=120) if isinstance(m, P.Final)]
    assert finals and finals[0].text, finals
    return " ".join(f.text for f in finals)


# --- 3a: hotword defaults ---------------------------------------------------------------------


def test_open_with_no_hotwords_gets_none_and_a_reload_that_clears_the_defaults_is_applied(
        tmp_path, models_dir, fixtures_dir):
    """Open(hotwords=()) means none (protocol.py), not the defaults; a SIGHUP that clears
    asr.hotwords is reported applied and new sessions get no hotwords (FunASR kept the
    start-up list)."""
    x, _ = read_wav(fixtures_dir / "zh" / "01.wav")
    pcm = float_to_pcm16(x)
    p = DaemonProcess(tmp_path, _config(models_dir, DEFAULT_WORDS), fake=False, watchdog_usec=30_000_000)
    try:
        p.wait_ready(300)
        defaults = _final_text(p.asr, pcm, None)
        assert _final_text(p.asr, pcm, DEFAULT_WORDS) == defaults  # None = the configured words
        none = _final_text(p.asr, pcm, ())
        assert none != defaults, "Open(hotwords=()) was given the default hotwords"

        line = _reload(p, asr={"hotwords": []})
        assert "asr.hotwords [阳台, 浇水] -> []" in line, line
        assert _final_text(p.asr, pcm, None) == none, "the cleared defaults were still applied"

        line = _reload(p, asr={"hotwords": DEFAULT_WORDS})
        assert "asr.hotwords [] -> [阳台, 浇水]" in line, line
        assert _final_text(p.asr, pcm, None) == defaults
    finally:
        p.stop()


# --- 3b: max_text_chars ------------------------------------------------------------------------


def test_a_reload_that_raises_max_text_chars_is_honoured_by_the_engine(tmp_path, models_dir):
    """limits.max_text_chars was checked live by the daemon and again by the engine from its
    start-up copy: after a SIGHUP raised it, the engine refused text the daemon admitted."""
    p = DaemonProcess(tmp_path, _config(models_dir, limits={"max_text_chars": 60}), fake=False,
                      watchdog_usec=30_000_000)
    text = "Hello there. " * 8  # 104 characters, short sentences
    try:
        p.wait_ready(300)
        with TTSClient(p.tts, timeout=120) as c:
            with pytest.raises(Exception, match="max_text_chars"):
                list(c.synthesize(text, language="en"))
        line = _reload(p, limits={"max_text_chars": 200})
        assert "limits.max_text_chars 60 -> 200" in line, line
        with TTSClient(p.tts, timeout=120) as c:
            chunks = list(c.synthesize(text, language="en"))
        assert sum(len(m.pcm) for m in chunks) > 0
    finally:
        p.stop()


# --- 3c: config validation uses the request rules ----------------------------------------------


@pytest.mark.parametrize("speed", [MAX_SPEED * 2, 0.1, float("inf")])
def test_tts_speed_in_the_config_follows_the_request_rule(speed):
    with pytest.raises(ConfigError, match="tts.speed"):
        parse_config({"tts": {"speed": speed}}, env={})


@pytest.mark.parametrize("words", [["http://example.org/hw.txt"], ["x" * 40], [f"w{i}" for i in range(101)]])
def test_a_bad_default_hotword_fails_config_load(words):
    with pytest.raises(ConfigError, match="asr.hotwords"):
        parse_config({"asr": {"hotwords": words}}, env={})


def test_default_hotwords_are_cleaned_as_a_request_s_are():
    cfg = parse_config({"asr": {"hotwords": ["阳台 浇水", "阳台"]}}, env={})
    assert cfg.asr.hotwords == ("阳台", "浇水")


def test_a_reload_with_a_bad_default_hotword_is_refused(tmp_path, monkeypatch):
    from daemon.serving.reload import reload

    path = tmp_path / "s2s.yaml"
    path.write_text("asr: {device: cpu, hotwords: [阳台]}\n")
    monkeypatch.delenv("S2S_MODELS", raising=False)
    old = parse_config({"asr": {"device": "cpu", "hotwords": ["阳台"]}}, source=str(path), env={})
    path.write_text("asr: {device: cpu, hotwords: ['ftp://x']}\n")
    cfg, line = reload(old)
    assert cfg is None and "asr.hotwords" in line, line


# --- languages: one owner -----------------------------------------------------------------------


def test_languages_have_one_owner():
    from daemon import config, rules

    assert config.CHOICES["asr.language"] == rules.LANGUAGES
    assert tuple(x.lower() for x in config.CHOICES["tts.language"]) == rules.SPOKEN_LANGUAGES
    assert set(rules.SPOKEN_LANGUAGES) < set(rules.LANGUAGES)


def test_no_module_writes_the_languages_out_again():
    """They were written out in about seven places (engines' capabilities, config choices, the
    front ends): a new language had to be added in each."""
    import re

    root = Path(__file__).resolve().parent.parent
    listed = re.compile(r"""\(\s*["']zh["']\s*,\s*["']en["']""")
    found = [f"{p.relative_to(root)}:{i}" for pkg in ("daemon", "bridge") for p in sorted((root / pkg).rglob("*.py"))
             if p.name != "rules.py"
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if listed.search(line)]
    assert found == [], found

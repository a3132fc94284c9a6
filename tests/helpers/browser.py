"""Real-browser helpers for the page tests: Debian's Chromium driven by Python playwright
(never `playwright install`), a fake microphone fed from a WAV, the axe-core accessibility
audit (axe-playwright-python ships axe.min.js: nothing is fetched at test time) and a
screenshot folder for CI artifacts.

Chromium comes from Debian's `chromium` package (.ci/run installs it). Without it the tests
fail under CI (CI=true) and are skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import wave
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def need_browser() -> None:
    if CHROMIUM is None:
        msg = "Debian chromium is not installed (apt-get install chromium); .ci/run installs it"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the playwright package is missing (requirements-speech.txt pins it)")


def artifacts_dir(name: str) -> Path:
    """Where screenshots go: $S2S_ARTIFACTS/<name> (CI collects it), else a temp folder."""
    root = Path(os.environ.get("S2S_ARTIFACTS") or Path(tempfile.gettempdir()) / "s2s-artifacts")
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def announce(config: Any, text: str) -> None:
    """Print past pytest's capture, so the artifact folder shows in CI's log."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print(text)
        return
    with capman.global_and_fixture_disabled():
        print(f"\n{text}", flush=True)


def mic_wav(path: Path, source: Path, lead: float = 0.5, tail: float = 12.0) -> Path:
    """One utterance with silence around it (Chromium loops the file: the tail leaves time
    for the reply before the utterance comes round again)."""
    with wave.open(str(source)) as r:
        params, frames = r.getparams(), r.readframes(r.getnframes())
        rate = r.getframerate()
    with wave.open(str(path), "wb") as w:
        w.setparams(params)
        w.writeframes(b"\0\0" * int(rate * lead) + frames + b"\0\0" * int(rate * tail))
    return path


def launch(p: Any, wav: Optional[Path] = None) -> Any:
    args = ["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
            "--autoplay-policy=no-user-gesture-required"]
    if wav is not None:
        args.append(f"--use-file-for-fake-audio-capture={wav}")
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)


def new_page(browser: Any, viewport: Optional[Dict[str, int]] = None, **kw: Any) -> Any:
    # bypass_csp: our CSP forbids the eval that wait_for_function and the axe injection use.
    page = browser.new_page(bypass_csp=True, viewport=viewport or DESKTOP, **kw)
    page.s2s_logs = []  # type: ignore[attr-defined]
    page.on("console", lambda m: page.s2s_logs.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.s2s_logs.append(f"pageerror: {e}"))
    return page


def page_errors(page: Any) -> List[str]:
    return [line for line in page.s2s_logs if line.startswith("pageerror")]


def axe_serious(page: Any) -> List[Dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    out = []
    for v in results.response["violations"]:
        if v.get("impact") in ("serious", "critical"):
            out.append({"id": v["id"], "impact": v["impact"], "help": v["help"],
                        "nodes": [n.get("target") for n in v.get("nodes", [])][:5]})
    return out

"""The tiny random FunASR models (s2s-models tiny) with the real fsmn-vad, as a FunASRConfig, or as
the config file of a real daemon (FunASR on them, Piper for TTS)."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence

from daemon.asr.funasr_engine import FunASRConfig


def make_config(models_dir: Any, **kw: Any) -> FunASRConfig:
    base = dict(paraformer_dir=models_dir / "tiny" / "paraformer", vad_dir=models_dir / "fsmn-vad",
                punc_dir=models_dir / "tiny" / "ct-punc", streaming_dir=models_dir / "tiny" / "paraformer-streaming",
                device="cpu", ncpu=1)
    base.update(kw)
    return FunASRConfig(**base)


def daemon_config(models_dir: Any, paraformer: str = "tiny/paraformer", hotwords: Sequence[str] = (),
                  limits: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A real daemon's config (DaemonProcess(..., fake=False)) on the tiny models; skips the test
    when they are not built."""
    import pytest

    recorded = json.loads((models_dir / "s2s-models.json").read_text())["components"]
    need = [paraformer, "fsmn-vad", "piper"]
    if not all(any(r.startswith(n) for r in recorded) for n in need):
        pytest.skip(f"tiny models not built ({need} in s2s-models.json)")
    return {"models_root": str(models_dir),
            "asr": {"engine": "funasr", "device": "cpu", "ncpu": 1, "fallback_engine": "none", "hotwords": list(hotwords),
                    "funasr": {"paraformer": paraformer, "vad": "fsmn-vad", "punc": "", "streaming": ""}},
            "tts": {"engine": "piper", "device": "cpu", "fallback_engine": "none",
                    "piper": {"voice": "piper/en_US-joe-medium.onnx"}},
            "limits": {"idle_timeout": 120.0, **(limits or {})}}

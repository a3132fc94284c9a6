"""The tiny random FunASR models (s2s-models tiny) with the real fsmn-vad, as a FunASRConfig."""

from __future__ import annotations

from typing import Any

from daemon.asr.funasr_engine import FunASRConfig


def make_config(models_dir: Any, **kw: Any) -> FunASRConfig:
    base = dict(paraformer_dir=models_dir / "tiny" / "paraformer", vad_dir=models_dir / "fsmn-vad",
                punc_dir=models_dir / "tiny" / "ct-punc", streaming_dir=models_dir / "tiny" / "paraformer-streaming",
                device="cpu", ncpu=1)
    base.update(kw)
    return FunASRConfig(**base)

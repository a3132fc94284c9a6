"""Type-checked, never run (tests/test_typecheck.py): every engine the daemon can be handed keeps
the contract of daemon/engines.py. The factory builds engines by name (Any), so without this
file nothing would check the real engines, nor the FAKE ones the daemon tests run on."""

from __future__ import annotations

from typing import List, Tuple

from daemon.asr.funasr_engine import FunASRPool
from daemon.asr.whisper_engine import WhisperPool
from daemon.config import Config
from daemon.engines import ASRPool, ASRSession, TTSEngine
from daemon.tts.kokoro_engine import KokoroEngine, RoutedTTS
from daemon.tts.melo_engine import MeloTTSEngine
from daemon.tts.piper_engine import PiperEngine
from fake_engines import FakeASRPool, FakeTTSEngine


def asr(funasr: FunASRPool, whisper: WhisperPool, cfg: Config) -> List[Tuple[ASRPool, ASRSession]]:
    fake = FakeASRPool(cfg)
    return [(funasr, funasr.open("s")), (whisper, whisper.open("s")), (fake, fake.open("s"))]


def tts(melo: MeloTTSEngine, kokoro: KokoroEngine, piper: PiperEngine, routed: RoutedTTS,
        cfg: Config) -> List[TTSEngine]:
    return [melo, kokoro, piper, routed, FakeTTSEngine(cfg)]

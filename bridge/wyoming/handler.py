"""One Wyoming connection: events in, the daemon's answers out.

- describe -> info: the daemon's ASR (its languages) and its TTS voices (bridge/speech.py), for
  the services this port offers (`asr`, `tts` or both).
- transcribe, audio-start, audio-chunk*, audio-stop -> transcript-start, transcript-chunk*,
  transcript, transcript-stop (the order Wyoming's streaming ASR uses; a client that knows only
  `transcript`, such as Home Assistant's, skips the others). Audio of any rate, width (1, 2 or 4
  bytes) and channel count is converted to the daemon's PCM16 mono 16 kHz as it arrives.
- synthesize -> audio-start, audio-chunk*, audio-stop.
- synthesize-start, synthesize-chunk*, [synthesize], synthesize-stop -> audio-start,
  audio-chunk*, audio-stop, synthesize-stopped (the `synthesize` inside a stream is the
  client's copy of the whole text for servers without streaming: ignored).

Every event is bounded before it is read: the header line and the data by what a text the
daemon would accept can take (limits.max_text_chars), an audio payload by MAX_PAYLOAD_BYTES.
Anything refused is an `error` event (code: the daemon's error codes, text: one line), after
which the connection is closed, as wyoming-piper does: a client waiting for `transcript` or
`audio-stop` then sees the end of the stream instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Dict, FrozenSet, List, Optional, Tuple

import numpy as np
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from bridge import __version__
from bridge.daemon_link import DaemonLink
from bridge.speech import RATE, DaemonInfo, Transcription, Voice, find_voice, speech_languages
from daemon.audio import float_to_pcm16, resample, to_float32
from daemon.wire.client_base import DaemonError
from daemon.config import Config
from daemon.errors import ErrorCode, S2SError
from daemon.rules import SPOKEN_LANGUAGES

logger = logging.getLogger(__name__)

# Largest audio payload in one event: 10 s of 48 kHz 16-bit stereo (Home Assistant sends 1024
# samples of 16 kHz mono, 2 KB). More is refused before it is read.
MAX_PAYLOAD_BYTES = 48000 * 2 * 2 * 10
# How long a describe waits for the daemon's (Home Assistant waits 1 s in all for `info`).
DESCRIBE_TIMEOUT = 0.5
# Text pieces of a streamed synthesis queued while earlier sentences are spoken; past this the
# connection is not read until they are (TCP backpressure).
MAX_QUEUED_PIECES = 256
AUDIO_WIDTHS = (1, 2, 4)
MAX_CHANNELS = 8
MIN_RATE, MAX_RATE = 8000, 192000
S2S_URL = "file:///opt/s2s/README.md"
ENGINE_URLS = {"funasr": "https://github.com/modelscope/FunASR", "whisper": "https://github.com/SYSTRAN/faster-whisper",
               "melo": "https://github.com/myshell-ai/MeloTTS", "kokoro": "https://huggingface.co/hexgrad/Kokoro-82M",
               "piper": "https://github.com/OHF-Voice/piper1-gpl", "kokoro+piper": "https://huggingface.co/hexgrad/Kokoro-82M"}


class Refused(S2SError):
    """A request this adapter refuses; sent as an `error` event, then the connection closes."""


def max_event_bytes(cfg: Config) -> int:
    """Header line and data of one event: the daemon's longest text, every character escaped."""
    return max(64 * 1024, cfg.limits.max_text_chars * 6 + 4096)


async def read_event(reader: asyncio.StreamReader, max_data: int) -> Optional[Event]:
    """wyoming.event.async_read_event with bounds checked before anything is buffered; None at
    the end of the stream; Refused for what cannot be read. The header line itself is bounded by
    the reader's limit (asyncio.start_server(limit=...))."""
    try:
        line = await reader.readline()
    except ValueError:  # the line is longer than the reader's limit
        raise Refused(f"event header longer than {max_data} bytes", ErrorCode.BAD_REQUEST) from None
    if not line:
        return None
    try:
        head = json.loads(line)
    except (ValueError, RecursionError):
        raise Refused("event header is not a JSON line", ErrorCode.BAD_REQUEST) from None
    if not isinstance(head, dict) or not isinstance(head.get("type"), str):
        raise Refused("event header must be a JSON object with a string `type`", ErrorCode.BAD_REQUEST)
    data = head.get("data") or {}
    lengths = []
    for key, limit in (("data_length", max_data), ("payload_length", MAX_PAYLOAD_BYTES)):
        n = head.get(key) or 0
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise Refused(f"{key} must be a byte count", ErrorCode.BAD_REQUEST)
        if n > limit:
            what = "text is at most the daemon's limits.max_text_chars" if key == "data_length" else "audio"
            raise Refused(f"{head['type'][:40]}: {key} {n} is more than this server reads ({limit} bytes; {what})",
                          ErrorCode.BAD_TEXT if key == "data_length" else ErrorCode.BAD_AUDIO)
        lengths.append(n)
    if not isinstance(data, dict):
        raise Refused("event data must be a JSON object", ErrorCode.BAD_REQUEST)
    if lengths[0]:
        try:
            more = json.loads(await reader.readexactly(lengths[0]))
        except (ValueError, RecursionError):
            raise Refused("event data is not JSON", ErrorCode.BAD_REQUEST) from None
        if not isinstance(more, dict):
            raise Refused("event data must be a JSON object", ErrorCode.BAD_REQUEST)
        data.update(more)
    payload = await reader.readexactly(lengths[1]) if lengths[1] else None
    return Event(type=head["type"], data=data, payload=payload)


class PcmTo16k:
    """Audio in the format a client announces -> the daemon's PCM16 mono 16 kHz, chunk by chunk."""

    def __init__(self, rate: int, width: int, channels: int):
        if width not in AUDIO_WIDTHS or not 1 <= channels <= MAX_CHANNELS or not MIN_RATE <= rate <= MAX_RATE \
                or isinstance(rate, bool):
            raise Refused(f"audio format rate={rate} width={width} channels={channels} is not one this server "
                          f"reads (width {AUDIO_WIDTHS} bytes, 1-{MAX_CHANNELS} channels, {MIN_RATE}-{MAX_RATE} Hz)",
                          ErrorCode.BAD_AUDIO)
        self.format = (rate, width, channels)
        self._frame = width * channels
        self._rest = b""
        self._stream: Any = None
        if rate != RATE:
            import soxr

            self._stream = soxr.ResampleStream(rate, RATE, 1, dtype="float32", quality="HQ")

    def convert(self, audio: bytes, last: bool = False) -> bytes:
        rate, width, channels = self.format
        buf = self._rest + audio
        n = len(buf) - len(buf) % self._frame
        buf, self._rest = buf[:n], buf[n:]
        if self._stream is None and width == 2 and channels == 1:
            return buf
        if width == 1:
            x = (np.frombuffer(buf, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
        else:
            x = np.frombuffer(buf, dtype="<i2" if width == 2 else "<i4").astype(np.float32) / float(1 << (8 * width - 1))
        if channels > 1:
            x = x.reshape(-1, channels).mean(axis=1)
        if self._stream is not None:
            x = self._stream.resample_chunk(x, last=last)
        return (np.clip(x, -1.0, 32767 / 32768) * 32768.0).astype("<i2").tobytes()


class Catalog:
    """What `info` says: the daemon's describe (bridge/speech.DaemonInfo; config defaults until
    the daemon first answers)."""

    def __init__(self, cfg: Config, daemon: DaemonInfo):
        self.cfg = cfg
        self.daemon = daemon

    async def refresh(self, timeout: float = DESCRIBE_TIMEOUT, force: bool = False) -> None:
        await self.daemon.refresh(timeout, force)

    @property
    def describe(self) -> Optional[Dict[str, Any]]:
        return self.daemon.describe

    def _engine(self, kind: str) -> Dict[str, Any]:
        return self.daemon.engine(kind)

    def asr_languages(self) -> Tuple[str, ...]:
        lang = self.cfg.asr.language
        return speech_languages(self._engine("asr") or None, SPOKEN_LANGUAGES if lang == "auto" else (lang,))

    @property
    def hotwords(self) -> bool:
        return self.daemon.hotwords

    def voices(self) -> List[Voice]:
        return self.daemon.voices()

    def info(self, services: FrozenSet[str]) -> Info:
        me = Attribution(name="s2s", url=S2S_URL)
        out = Info()
        if "asr" in services:
            engine = str(self._engine("asr").get("engine") or self.cfg.asr.engine)
            model = AsrModel(name=engine, attribution=Attribution(name=engine, url=ENGINE_URLS.get(engine, S2S_URL)),
                             installed=True, description=f"s2s speech daemon: {engine}", version=None,
                             languages=list(self.asr_languages()))
            out.asr = [AsrProgram(name="s2s", attribution=me, installed=True, description="s2s speech recognition",
                                  version=__version__, models=[model], supports_transcript_streaming=True)]
        if "tts" in services:
            engine = str(self._engine("tts").get("engine") or self.cfg.tts.engine)
            by = Attribution(name=engine, url=ENGINE_URLS.get(engine, S2S_URL))
            out.tts = [TtsProgram(name="s2s", attribution=me, installed=True, description="s2s speech synthesis",
                                  version=__version__, supports_synthesize_streaming=True,
                                  voices=[TtsVoice(name=v.name, attribution=by, installed=True, description=v.description,
                                                   version=None, languages=list(v.languages)) for v in self.voices()])]
        return out


def wyoming_language(lang: Optional[str]) -> Optional[str]:
    """Home Assistant's language tags (zh-CN, en_US, zh-Hans) -> the daemon's (zh, en)."""
    if not lang:
        return None
    return lang.strip().lower().replace("_", "-").split("-")[0] or None


class Handler(AsyncEventHandler):
    """One client connection (see the module docstring)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, cfg: Config,
                 link: DaemonLink, catalog: Catalog, services: FrozenSet[str], conn_id: str):
        super().__init__(reader, writer)
        self.cfg = cfg
        self.link = link
        self.catalog = catalog
        self.services = services
        self.id = conn_id
        self.max_data = max_event_bytes(cfg)
        # transcription
        self.language: Optional[str] = None
        self.hotwords: Optional[List[str]] = None
        self.tr: Optional[Transcription] = None
        self.pcm: Optional[PcmTo16k] = None
        # synthesis
        self.text_in: Optional["asyncio.Queue[Optional[str]]"] = None
        self.speaker: Optional["asyncio.Task[None]"] = None
        self.requests = 0

    # --- the connection -----------------------------------------------------------------------

    async def run(self) -> None:
        """Read events until the end of the stream, idle_timeout without one, or an error."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(read_event(self.reader, self.max_data),
                                                   self.cfg.limits.idle_timeout)
                except asyncio.TimeoutError:
                    logger.info("conn %s: nothing for %.0f s: closing", self.id, self.cfg.limits.idle_timeout)
                    break
                except Refused as e:  # an event that cannot be read: the stream cannot be followed further
                    await self._error(e.code.value, e.message)
                    break
                if event is None or not await self._handle(event):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            logger.info("conn %s: the client went away", self.id)
        finally:
            await self.disconnect()
            self.writer.close()

    async def _handle(self, event: Event) -> bool:
        try:
            return await self.handle_event(event)
        except (Refused, DaemonError) as e:
            await self._error(e.code.value, e.message)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a field missing or of the wrong type
            await self._error(ErrorCode.BAD_REQUEST.value, f"{event.type[:40]}: malformed event ({type(e).__name__}: {e})"[:300])
        except (ConnectionError, asyncio.IncompleteReadError):
            raise
        except Exception:
            logger.exception("conn %s: %s failed", self.id, event.type)
            await self._error(ErrorCode.INTERNAL.value, "internal error (see the s2s-wyoming log)")
        return False

    async def _error(self, code: str, text: str) -> None:
        logger.info("conn %s: error %s: %s", self.id, code, text)
        try:
            await self.write_event(Error(text=text, code=code).event())
        except (ConnectionError, RuntimeError):
            pass

    async def write_event(self, event: Event) -> None:
        await async_write_event(event, self.writer)

    async def disconnect(self) -> None:
        tr, self.tr = self.tr, None
        if tr is not None:
            await tr.abort()
        speaker, self.speaker = self.speaker, None
        if speaker is not None and not speaker.done():
            speaker.cancel()
            await asyncio.gather(speaker, return_exceptions=True)

    # --- events -------------------------------------------------------------------------------

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.catalog.refresh()
            await self.write_event(self.catalog.info(self.services).event())
            return True
        if Ping.is_type(event.type):
            await self.write_event(Pong(text=Ping.from_event(event).text).event())
            return True
        if Transcribe.is_type(event.type) or AudioStart.is_type(event.type) or AudioChunk.is_type(event.type) \
                or AudioStop.is_type(event.type):
            self._need("asr", event.type)
            return await self._asr(event)
        if Synthesize.is_type(event.type) or SynthesizeStart.is_type(event.type) \
                or SynthesizeChunk.is_type(event.type) or SynthesizeStop.is_type(event.type):
            self._need("tts", event.type)
            return await self._tts(event)
        logger.debug("conn %s: ignoring %s", self.id, event.type[:40])
        return True

    def _need(self, service: str, what: str) -> None:
        if service not in self.services:
            other = "speech recognition" if service == "asr" else "speech synthesis"
            raise Refused(f"{what}: this port does not serve {other} (see s2s.yaml wyoming.asr_port / tts_port)",
                          ErrorCode.UNSUPPORTED)

    # --- speech recognition -------------------------------------------------------------------

    async def _asr(self, event: Event) -> bool:
        if Transcribe.is_type(event.type):
            t = Transcribe.from_event(event)
            self.language = wyoming_language(t.language)
            words = [w for w in (t.transcript_names or []) + (t.transcript_terms or []) if isinstance(w, str)]
            # Only an engine that takes hotwords gets them (another would refuse the session).
            self.hotwords = words if words and self.catalog.hotwords else None
            return True
        if AudioStart.is_type(event.type):
            start = AudioStart.from_event(event)
            await self._begin(start.rate, start.width, start.channels)
            return True
        if AudioChunk.is_type(event.type):
            chunk = AudioChunk.from_event(event)
            if self.tr is None:
                await self._begin(chunk.rate, chunk.width, chunk.channels)
            assert self.tr is not None and self.pcm is not None
            if self.pcm.format != (chunk.rate, chunk.width, chunk.channels):
                await self.tr.feed(self.pcm.convert(b"", last=True))
                self.pcm = PcmTo16k(chunk.rate, chunk.width, chunk.channels)
            await self.tr.feed(self.pcm.convert(chunk.audio or b""))
            return True
        # audio-stop
        tr, self.tr = self.tr, None
        if tr is None:
            await self.write_event(Transcript(text="").event())  # no audio: nothing was said
            return True
        try:
            if self.pcm is not None:
                await tr.feed(self.pcm.convert(b"", last=True))
            t0 = time.monotonic()
            result = await tr.finish()
        except BaseException:
            await tr.abort()
            raise
        logger.info("conn %s: %.1f s of audio -> %r (%.0f ms after audio-stop)", self.id, result.duration,
                    result.text[:80], (time.monotonic() - t0) * 1000)
        await self.write_event(Transcript(text=result.text, language=self.language).event())
        await self.write_event(TranscriptStop().event())
        self.language, self.hotwords, self.pcm = None, None, None
        return True

    async def _begin(self, rate: int, width: int, channels: int) -> None:
        if self.tr is not None:
            raise Refused("audio-start while a transcription is going on (send audio-stop first)", ErrorCode.BAD_REQUEST)
        self.pcm = PcmTo16k(rate, width, channels)
        self.requests += 1
        tr = Transcription(self.link, f"wy-{self.id}", self.language, self.hotwords, on_delta=self._chunk)
        await tr.open()
        self.tr = tr
        await self.write_event(TranscriptStart(language=self.language).event())

    async def _chunk(self, text: str) -> None:
        await self.write_event(TranscriptChunk(text=text).event())

    # --- speech synthesis ---------------------------------------------------------------------

    def _voice(self, voice: Any) -> Voice:
        name = getattr(voice, "name", None) if voice is not None else None
        lang = wyoming_language(getattr(voice, "language", None)) if voice is not None else None
        known = self.catalog.voices()
        v = find_voice(name or lang, known)
        if v is None:
            raise Refused(f"unknown voice {str(name or lang)[:60]!r}; this server has {', '.join(k.name for k in known)}",
                          ErrorCode.BAD_REQUEST)
        return v

    async def _tts(self, event: Event) -> bool:
        if Synthesize.is_type(event.type):
            if self.text_in is not None:
                return True  # the whole text again, inside a stream: for servers without streaming
            s = Synthesize.from_event(event)
            if not isinstance(s.text, str):
                raise Refused("synthesize: text must be a string", ErrorCode.BAD_REQUEST)
            voice = self._voice(s.voice)
            await self.catalog.refresh()
            self.requests += 1
            await self._speak(self._whole(s.text, voice.language), voice)
            await self.write_event(AudioStop().event())
            return True
        if SynthesizeStart.is_type(event.type):
            if self.text_in is not None:
                raise Refused("synthesize-start inside a stream (send synthesize-stop first)", ErrorCode.BAD_REQUEST)
            voice = self._voice(SynthesizeStart.from_event(event).voice)
            self.requests += 1
            self.text_in = asyncio.Queue(MAX_QUEUED_PIECES)
            self.speaker = asyncio.get_running_loop().create_task(self._speak(self._streamed(voice.language), voice),
                                                                  name=f"wy-{self.id}-speak")
            return True
        if self.text_in is None or self.speaker is None:
            raise Refused(f"{event.type} without synthesize-start", ErrorCode.BAD_REQUEST)
        if SynthesizeChunk.is_type(event.type):
            text = SynthesizeChunk.from_event(event).text
            if not isinstance(text, str):
                raise Refused("synthesize-chunk: text must be a string", ErrorCode.BAD_REQUEST)
            put = asyncio.ensure_future(self.text_in.put(text))
            await asyncio.wait([put, self.speaker], return_when=asyncio.FIRST_COMPLETED)
            if not put.done():
                put.cancel()
            if self.speaker.done():
                self.speaker.result()  # raises what stopped it
            return True
        # synthesize-stop
        await self.text_in.put(None)
        speaker = self.speaker
        try:
            await speaker
        finally:
            self.text_in = self.speaker = None
        await self.write_event(AudioStop().event())
        await self.write_event(SynthesizeStopped().event())
        return True

    async def _whole(self, text: str, language: Optional[str]) -> AsyncIterator[Any]:
        self.link.check("tts")
        async for chunk in self.link.tts.synthesize(text, language=language, request_id=f"wy-{self.id}-{self.requests}",
                                                    owner=f"wy-{self.id}"):
            yield chunk

    async def _streamed(self, language: Optional[str]) -> AsyncIterator[Any]:
        from bridge.speech import speak_text_stream

        async def pieces() -> AsyncIterator[str]:
            assert self.text_in is not None
            q = self.text_in
            while True:
                piece = await q.get()
                if piece is None:
                    return
                yield piece

        async for chunk in speak_text_stream(self.link, pieces(), language, f"wy-{self.id}-{self.requests}",
                                             owner=f"wy-{self.id}"):
            yield chunk

    async def _speak(self, chunks: AsyncIterator[Any], voice: Voice) -> None:
        """audio-start (once, at the first audio), then audio-chunk per daemon chunk; the caller
        sends audio-stop. All at the first chunk's rate (the daemon's tts.sample_rate)."""
        rate = 0
        async for chunk in chunks:
            if not chunk.pcm:
                continue
            if not rate:
                rate = chunk.sample_rate or self.cfg.tts.sample_rate
                await self.write_event(AudioStart(rate=rate, width=2, channels=1).event())
            pcm = chunk.pcm
            if chunk.sample_rate and chunk.sample_rate != rate:
                pcm = float_to_pcm16(resample(to_float32(pcm), chunk.sample_rate, rate))
            await self.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=pcm).event())
        if not rate:
            # Nothing to say (only punctuation or spaces): a well-formed, empty answer.
            await self.write_event(AudioStart(rate=self.cfg.tts.sample_rate, width=2, channels=1).event())
        logger.info("conn %s: spoke with voice %s", self.id, voice.name)

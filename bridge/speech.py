"""What the protocol adapters (bridge/wyoming, bridge/openai_api) share: a whole utterance or
file through one daemon ASR session, the transcript as append-only text deltas, the daemon's
voices under stable names, and streamed text spoken sentence by sentence.

Every engine, fallback, batch, admission rule and limit is the daemon's; the adapters hold one
`DaemonLink` (bridge/daemon_link.py) per process and only translate.

- `Transcription`: audio in (PCM16 mono 16 kHz), finals out. Audio goes in 100 ms messages
  (`daemon.rules.FORWARD_BYTES`, the daemon VAD's tail step), each asking for an `ack`; at most
  `WINDOW_SECONDS` of audio is unacknowledged, so a file sent faster than real time waits for the worker instead of filling
  the daemon's queue (its per-session backlog cap would answer `busy`).
- `TextDeltas`: Wyoming's transcript-chunk and OpenAI's transcript.text.delta only append. A
  final appends what it adds; a partial appends only what two partials in a row agree on, so a
  revision the next partial makes is rarely already sent. The final text (Wyoming `transcript`,
  OpenAI `transcript.text.done`) is the authority.
- `Voice`: the daemon takes a language, not a voice, so each language its TTS speaks is a voice
  (`s2s-zh`, `s2s-en`), plus `s2s`, the daemon's choice per text (language auto).
- `speak_text_stream`: text arriving in pieces -> audio (see there).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from bridge.daemon_link import OPEN_TIMEOUT, TTS_TIMEOUT, DaemonLink
from bridge.synth_retry import RetryingSynthStream
from daemon.wire import protocol as P
from daemon.wire.client_async import AsyncASRStream
from daemon.wire.client_base import DaemonError, new_id
from daemon.errors import ErrorCode
from daemon.rules import FORWARD_BYTES, SPOKEN_LANGUAGES

logger = logging.getLogger(__name__)

RATE = P.ASR_SAMPLE_RATE
# Unacknowledged audio at most, seconds (the daemon caps a session's queue at 60 s).
WINDOW_SECONDS = 8.0
# How long a `busy` (or slow) daemon is asked again before the client is told.
OPEN_RETRY_SECONDS = 30.0
# Longest wait for an ack, or for the last final after `finalize` (a long utterance decoded
# behind other sessions' work on a loaded worker).
FINISH_TIMEOUT = 120.0
DEFAULT_VOICE = "s2s"


def join_text(a: str, b: str) -> str:
    """Two transcript pieces as one: a space between two Latin words, nothing between CJK."""
    a, b = a.strip(), b.strip()
    if not a or not b:
        return a or b
    return f"{a} {b}" if a[-1].isascii() and b[0].isascii() and b[0].isalnum() else a + b


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


class TextDeltas:
    """The transcript so far and what has been sent of it (see the module docstring)."""

    def __init__(self) -> None:
        self.text = ""       # the finals, joined
        self.sent = ""       # what deltas have carried (text + part of the utterance going on)
        self._last_partial = ""

    def _advance(self, candidate: str) -> str:
        if candidate.startswith(self.sent) and len(candidate) > len(self.sent):
            delta, self.sent = candidate[len(self.sent):], candidate
            return delta
        return ""

    def partial(self, text: str) -> str:
        text = text.strip()
        stable = _common_prefix(self._last_partial, text)
        self._last_partial = text
        # Latin text: up to the last whole word (the next partial may still change this one).
        if 0 < len(stable) < len(text) and stable[-1].isascii() and stable[-1].isalnum() \
                and text[len(stable)].isascii() and text[len(stable)].isalnum():
            stable = stable[:stable.rfind(" ") + 1]
        stable = stable.rstrip()
        return self._advance(join_text(self.text, stable)) if stable else ""

    def final(self, text: str) -> str:
        self._last_partial = ""
        if text.strip():
            self.text = join_text(self.text, text)
        if not self.text.startswith(self.sent):
            # A final revised text a partial had sent: what is sent cannot be taken back (the final
            # transcript has it right). What the final has beyond the length already sent still
            # goes out (a revision is mostly a few characters replaced: 倒行到… for 导航到…, then
            # the rest of the sentence), and later utterances stream from the final on.
            logger.debug("a final revised streamed text: %r -> %r", self.sent[-40:], self.text[-40:])
            delta = self.text[len(self.sent):]
            self.sent = self.text
            return delta
        return self._advance(self.text)


@dataclass
class Segment:
    text: str
    start: float
    end: float


@dataclass
class TranscriptResult:
    text: str
    segments: List[Segment] = field(default_factory=list)
    duration: float = 0.0          # seconds of audio fed
    language: Optional[str] = None


OnDelta = Callable[[str], Awaitable[None]]


class Transcription:
    """One utterance or file through one daemon ASR session (see the module docstring)."""

    def __init__(self, link: DaemonLink, tag: str, language: Optional[str] = None,
                 hotwords: Optional[Sequence[str]] = None, on_delta: Optional[OnDelta] = None):
        self.link = link
        self.session_id = f"{tag}-{new_id()[:8]}"
        self.language = language
        self.hotwords = tuple(hotwords) if hotwords else None
        self.on_delta = on_delta
        self.deltas = TextDeltas()
        self.segments: List[Segment] = []
        self.stream: Optional[AsyncASRStream] = None
        self._pump: Optional["asyncio.Task[None]"] = None
        self._pending = bytearray()
        self._sent_samples: Dict[int, int] = {}   # seq -> samples sent up to and including it
        self._samples = 0
        self._acked = 0
        self._acked_event = asyncio.Event()
        self._closed = asyncio.Event()
        self._closed_reason = ""
        self.error: Optional[DaemonError] = None

    async def open(self) -> None:
        """DaemonError (unavailable, bad_request, unsupported...) when the daemon refuses. `busy`
        (its admission: the worker is at capacity) is waited out as the daemon's retry_after
        says, for up to OPEN_RETRY_SECONDS: a whole utterance or file is better late than lost,
        and the client's audio waits in its socket meanwhile. So is an `open` not answered in
        time (a daemon slow on starved CPUs); the client library closes the session if it was
        opened after all, and the next try has a new id."""
        deadline = time.monotonic() + OPEN_RETRY_SECONDS
        tag = self.session_id
        while True:
            self.link.check("asr")
            try:
                self.stream = await self.link.asr.open(session_id=self.session_id, language=self.language,
                                                       hotwords=self.hotwords, partials=True, timeout=OPEN_TIMEOUT)
                break
            except DaemonError as e:
                wait = (e.retry_after or 1.0) if e.code == ErrorCode.BUSY else 0.0
                if e.code not in (ErrorCode.BUSY, ErrorCode.TIMEOUT) or time.monotonic() + wait > deadline:
                    raise
                logger.info("ASR session %s: %s (%s); asking again in %.1f s", self.session_id, e.code.value,
                            e.message, wait)
                await asyncio.sleep(wait)
                self.session_id = f"{tag.rsplit('-', 1)[0]}-{new_id()[:8]}"
        self._pump = asyncio.get_running_loop().create_task(self._read(self.stream), name=f"asr-{self.session_id}")

    @property
    def seconds(self) -> float:
        return (self._samples + len(self._pending) // 2) / RATE

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
        if self._closed.is_set() and self._closed_reason != "finalized":
            raise DaemonError(f"the daemon ended the recognition session ({self._closed_reason})",
                              ErrorCode.UNAVAILABLE, session_id=self.session_id)

    async def feed(self, pcm: bytes) -> None:
        """PCM16 mono 16 kHz; waits while the daemon is WINDOW_SECONDS behind what was sent."""
        self._raise_if_failed()
        self._pending += pcm
        while len(self._pending) >= self._step:
            await self._send(self._step)

    @property
    def _step(self) -> int:
        """FORWARD_BYTES (the daemon VAD's tail step, as bridge/asr.py sends), or less when the
        session's `opened` says the daemon takes less at once."""
        most = self.stream.max_chunk_bytes if self.stream is not None else None
        return min(FORWARD_BYTES, most or FORWARD_BYTES)

    async def _send(self, n: int) -> None:
        assert self.stream is not None
        data = bytes(self._pending[:n])
        del self._pending[:n]
        if len(data) % 2:
            data = data[:-1]
        if not data:
            return
        seq = await self.stream.send(data, ack=True)
        self._samples += len(data) // 2
        self._sent_samples[seq] = self._samples
        deadline = time.monotonic() + FINISH_TIMEOUT
        while (self._samples - self._acked) / RATE > WINDOW_SECONDS:
            self._raise_if_failed()
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonError(f"the daemon acknowledged no audio for {FINISH_TIMEOUT:g} s", ErrorCode.TIMEOUT,
                                  session_id=self.session_id)
            self._acked_event.clear()
            try:
                # Set by each ack, and for good when the session closes.
                await asyncio.wait_for(self._acked_event.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def finish(self) -> TranscriptResult:
        """Flush and finalize: every final, joined. DaemonError when the session failed."""
        assert self.stream is not None
        self._raise_if_failed()
        while self._pending:
            await self._send(min(len(self._pending), self._step))
        await self.link.asr.send(P.Finalize(session_id=self.session_id, request_id=new_id()))
        try:
            await asyncio.wait_for(self._closed.wait(), FINISH_TIMEOUT)
        except asyncio.TimeoutError:
            raise DaemonError(f"no final transcript within {FINISH_TIMEOUT:g} s", ErrorCode.TIMEOUT,
                              session_id=self.session_id) from None
        self._raise_if_failed()
        return TranscriptResult(self.deltas.text, list(self.segments), self._samples / RATE, self.language)

    async def abort(self) -> None:
        """The client went away or failed: stop reading, release the daemon session."""
        pump, self._pump = self._pump, None
        if pump is not None and not pump.done():
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        stream = self.stream
        if stream is not None and not self._closed_reason:  # the daemon has not closed it
            await stream.abandon()  # nobody reads its events now; closed at the daemon

    async def _delta(self, delta: str) -> None:
        if delta and self.on_delta is not None:
            await self.on_delta(delta)

    async def _read(self, stream: AsyncASRStream) -> None:
        try:
            async for m in stream.events():
                if isinstance(m, P.Ack):
                    if m.of == "audio":
                        self._acked = max(self._acked, self._sent_samples.pop(m.seq, self._acked))
                        for s in [s for s in self._sent_samples if s < m.seq]:
                            del self._sent_samples[s]
                        self._acked_event.set()
                elif isinstance(m, P.Partial):
                    await self._delta(self.deltas.partial(m.text))
                elif isinstance(m, P.Final):
                    if m.text.strip():
                        self.segments.append(Segment(m.text.strip(), m.start, m.end))
                    await self._delta(self.deltas.final(m.text))
                elif isinstance(m, P.Error):
                    logger.warning("ASR session %s: %s: %s", self.session_id, m.code, m.message)
                    if self.error is None:
                        self.error = DaemonError.from_reply(m)
                elif isinstance(m, P.Closed):
                    self._closed_reason = m.reason
        except Exception:  # the consumer's callback failed (its client went away): the caller aborts
            logger.debug("ASR session %s: event reader stopped", self.session_id, exc_info=True)
        finally:
            self._closed.set()
            self._acked_event.set()


# --- what the daemon says about itself -------------------------------------------------------


class DaemonInfo:
    """The daemon's describe, cached: asked again when older than REFRESH_SECONDS, with a short
    timeout; the last answer (or nothing, before the first) while it does not answer."""

    REFRESH_SECONDS = 30.0

    def __init__(self, link: DaemonLink):
        self.link = link
        self.describe: Optional[Dict[str, Any]] = None
        self._at = -self.REFRESH_SECONDS

    async def refresh(self, timeout: float = 0.5, force: bool = False) -> None:
        if not force and time.monotonic() - self._at < self.REFRESH_SECONDS:
            return
        info = await self.link.describe(timeout)
        if info:
            self.describe, self._at = info, time.monotonic()

    def engine(self, kind: str) -> Dict[str, Any]:
        d = (self.describe or {}).get(kind)
        return d if isinstance(d, dict) else {}

    @property
    def hotwords(self) -> bool:
        """The ASR engine takes hotwords (another refuses a session that sends any)."""
        return bool((self.engine("asr").get("capabilities") or {}).get("hotwords"))

    def voices(self) -> List["Voice"]:
        return voices(self.engine("tts") or None)


# --- voices ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    name: str
    language: Optional[str]        # what the daemon is asked for (None: its default)
    languages: Tuple[str, ...]
    description: str


def speech_languages(info: Optional[Mapping[str, Any]], fallback: Sequence[str]) -> Tuple[str, ...]:
    """The concrete languages (auto left out) an engine's describe record says it handles."""
    try:
        langs = info["capabilities"]["languages"] if info else None  # type: ignore[index]
    except (KeyError, TypeError):
        langs = None
    if not isinstance(langs, list):
        langs = list(fallback)
    return tuple(x for x in langs if isinstance(x, str) and x != "auto")


def voices(tts_info: Optional[Mapping[str, Any]], fallback: Sequence[str] = SPOKEN_LANGUAGES) -> List[Voice]:
    """`s2s` (the daemon picks per text when it can) and one `s2s-<language>` per language."""
    langs = speech_languages(tts_info, fallback)
    engine = str((tts_info or {}).get("engine") or "tts")
    has_auto = "auto" in ((tts_info or {}).get("capabilities") or {}).get("languages", [])
    out = [Voice(DEFAULT_VOICE, "auto" if has_auto else None, langs,
                 f"s2s {engine} ({'language by text' if has_auto else 'default language'})")]
    out += [Voice(f"{DEFAULT_VOICE}-{lang}", lang, (lang,), f"s2s {engine} ({lang})") for lang in langs]
    return out


def find_voice(name: Optional[str], known: Sequence[Voice]) -> Optional[Voice]:
    """A voice by name (also a bare language code such as `zh`); None when unknown."""
    if not name:
        return known[0] if known else None
    for v in known:
        if name == v.name or (v.name != DEFAULT_VOICE and name == v.language):
            return v
    return None


# --- text arriving in pieces ------------------------------------------------------------------


async def speak_text_stream(link: DaemonLink, pieces: AsyncIterator[str], language: Optional[str], tag: str,
                            owner: str = "") -> AsyncIterator[P.SynthAudio]:
    """Text arriving in pieces (an LLM's reply) -> audio chunks, in order.

    One streamed-text request at the daemon (the bridge's replies take the same path): the
    pieces go there as they come, and the daemon cuts the sentences and speaks each as soon as
    it is complete. Text past what one request takes (limits.max_text_chars) goes on in a next
    request (`<tag>-<n>`), whose audio follows."""
    streams: "asyncio.Queue[Optional[RetryingSynthStream]]" = asyncio.Queue()

    async def open_next(n: int) -> RetryingSynthStream:
        link.check("tts")
        s = await link.synthesize_stream(request_id=tag if not n else f"{tag}-{n}", language=language,
                                         owner=owner, timeout=TTS_TIMEOUT)
        streams.put_nowait(s)
        return s

    async def feed() -> None:
        limit = int(link.cfg.limits.max_text_chars)
        n, room = 0, limit
        stream: Optional[RetryingSynthStream] = None
        try:
            async for piece in pieces:
                while piece:
                    if stream is None:
                        stream = await open_next(n)
                    if stream.finished:
                        return  # the reader raises why
                    head, piece = piece[:room], piece[room:]
                    if piece:  # past this request's text: end it here, the rest in the next
                        await stream.end(head)
                        stream, n, room = None, n + 1, limit
                    else:
                        await stream.send(head)
                        room -= len(head)
            if stream is not None and not stream.finished:
                await stream.end()
        finally:
            streams.put_nowait(None)

    feeder = asyncio.get_running_loop().create_task(feed(), name=f"{tag}-text")
    left: List[RetryingSynthStream] = []
    try:
        while True:
            s = await streams.get()
            if s is None:
                break
            left = [s]
            async for chunk in s:
                yield chunk
        await feeder  # what stopped the text, if anything
    finally:
        feeder.cancel()
        while not streams.empty():
            left.append(streams.get_nowait())  # type: ignore[arg-type]
        for s in left:
            if s is not None:
                await s.cancel()  # left early: stop it at the daemon (a no-op once done)

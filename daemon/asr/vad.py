"""Streaming endpointing shared by every ASR engine (fsmn-vad).

- `FsmnVAD` holds the loaded fsmn-vad AutoModel (once per process).
- `VADSegmenter` is one session's streaming state: its own fsmn-vad cache, a bounded ring of
  recent audio, and the utterance bookkeeping. It takes float32 16 kHz audio and yields
  `VADEvent`s (speech start; utterance end with its audio) at absolute sample offsets.
The engines built on it (`StreamingEngine`, `PoolBase`) are in daemon/asr/base.py.

Why these choices:
- fsmn-vad's own default is a *dynamic* end-silence schedule (2 s for the first 10 s of
  speech, ...); we pass `max_end_silence_time` explicitly, which pins the 800 ms of the model's
  config, so short comma pauses (under 0.5 s) never split an utterance and 0.8 s gaps do.
- VAD runs on the CPU in steps of `step_ms` (200 ms), never per 10 ms frame: it is the CPU hot
  spot of FunASR's own server, and a GPU launch per 200 ms of audio buys nothing for a model
  this small. While the VAD counts silence inside an utterance it runs every `tail_step_ms`
  (100 ms) instead: that is where the time is decided (a pause at turn.early_silence, the end at
  0.8 s), and a 200 ms step saw each up to 200 ms late (finals ~90 ms sooner end to end, 7-10 %
  more CPU at 32 tiny streams: BENCHMARKS.md "The VAD's tail step").
- Only the current utterance (plus a few seconds of history for the VAD's look-back) is kept;
  `max_utterance_seconds` forces a final, so memory stays bounded on endless input.
- Speculative turns (`turn.early_silence`, sessions that ask for them): a short silence inside
  an utterance is read from fsmn-vad's own state (its count of silent frames, plus the window
  it needs to call a frame silent), not from a second detector, so "pause" and "end" can never
  disagree about what was speech. The utterance so far is decoded at the pause (`tentative`);
  if the VAD confirms speech again the tentative is withdrawn (`resume`); if the endpoint
  comes with nothing but silence after the pause, the final carries the tentative's text
  instead of decoding the same speech twice.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Deque, Dict, Generator, List, Optional

import numpy as np

from daemon.errors import ModelMissingError
from daemon.rules import VAD_STEP_MS, VAD_TAIL_STEP_MS
from daemon.asr.steps import run_steps
from daemon.asr.vad_batch import VADBlock

logger = logging.getLogger(__name__)


SAMPLE_RATE = 16000
# How far past a pause's speech end the VAD may draw the utterance's end and still have heard
# nothing new (it ends one or two frames after its last speech frame).
PAUSE_END_SLACK = SAMPLE_RATE // 10
# Where speech after an utterance closed at its pause starts: this far before the frame the VAD
# confirmed it at (its window needs some speech to confirm).
RESUME_LOOKBACK = SAMPLE_RATE // 2

# funasr quiet-mode flags accepted by AutoModel.
FUNASR_QUIET = {"disable_update": True, "disable_pbar": True, "disable_log": True}


def require_dir(path: Optional[Path], what: str, marker: str = "config.yaml") -> Path:
    """A configured model directory that must exist (never a hub id: nothing downloads)."""
    if path is None or not (Path(path) / marker).is_file():
        raise ModelMissingError(f"{what} model directory {path} is missing or has no {marker} "
                                f"(install it with s2s-models)", path=str(path))
    return Path(path)


# --- the model ------------------------------------------------------------------------


class FsmnVAD:
    """The loaded fsmn-vad model, shared by all sessions (use it from one thread)."""

    def __init__(self, model_dir: Path, ncpu: int = 1, max_end_silence_ms: int = 800, step_ms: int = VAD_STEP_MS,
                 tail_step_ms: int = VAD_TAIL_STEP_MS):
        self.model_dir = Path(model_dir)
        self.ncpu = ncpu
        self.max_end_silence_ms = max_end_silence_ms
        self.step_ms = step_ms
        self.tail_step_ms = min(tail_step_ms, step_ms)
        # fsmn-vad options read at load (its config's values; these are the shipped ones).
        self.frame_ms = 10
        self.speech_to_sil_ms = 150  # silence the VAD's window needs before it counts frames
        self.lookahead_end_ms = 100  # speech kept past the last speech frame (do_extend)
        self._model: Any = None
        self._batched: Any = None  # daemon.asr.vad_batch.BatchedFsmn once loaded

    def load(self) -> None:
        require_dir(self.model_dir, "fsmn-vad")
        from daemon.asr import funasr_import

        # CPU always: see the module docstring. Only fsmn-vad's own funasr modules are imported.
        self._model = funasr_import.build(funasr_import.VAD_MODULES, model=str(self.model_dir), device="cpu",
                                          ncpu=self.ncpu, **FUNASR_QUIET)
        opts = getattr(getattr(self._model, "model", None), "vad_opts", None)
        if opts is not None:
            self.frame_ms = int(getattr(opts, "frame_in_ms", self.frame_ms))
            self.speech_to_sil_ms = int(getattr(opts, "speech_to_sil_time_thres", self.speech_to_sil_ms))
            self.lookahead_end_ms = int(getattr(opts, "lookahead_time_end_point", self.lookahead_end_ms))
        from daemon.asr.vad_batch import BatchedFsmn

        self._batched = BatchedFsmn(self._model, self.max_end_silence_ms)
        logger.info("vad: loaded %s (step %d ms, %d ms in a silence, end silence %d ms)", self.model_dir,
                    self.step_ms, self.tail_step_ms, self.max_end_silence_ms)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def run(self, audio: np.ndarray, cache: Dict[str, Any], is_final: bool) -> List[List[int]]:
        """Feed one block (a multiple of step_ms, or one tail step, unless final); return [start_ms, end_ms] pairs
        (-1 for a side not in this block), ms relative to the cache's first sample."""
        # funasr runs one model forward per chunk_size of input: a whole block in one forward
        # gives the same segments at a fraction of the cost (the per-forward overhead dominates
        # a 200 ms step), which is what lets merged audio from the daemon run cheaper.
        ms = audio.size * 1000 // SAMPLE_RATE
        chunk_ms = ms if not is_final and (ms < self.step_ms or ms % self.step_ms == 0) else self.step_ms
        try:
            res = self._model.generate(input=audio, cache=cache, is_final=is_final, chunk_size=chunk_ms,
                                       max_end_silence_time=self.max_end_silence_ms, disable_pbar=True)
        except ZeroDivisionError:
            # AutoModel's speed statistics divide by the block's duration in frames: a block
            # too short for one frame (a final flush of a few ms) has nothing to report.
            return []
        return list(res[0]["value"]) if res else []

    def run_requests(self, blocks: List[VADBlock]) -> List[Any]:
        """Many sessions' next blocks at once -> each one's pairs (or the exception it raised).
        Sessions whose blocks have the same number of frames share one encoder forward
        (daemon/asr/vad_batch.py); the per-frame decisions stay each session's own."""
        if self._batched is None or len(blocks) == 1:
            out: List[Any] = []
            for b in blocks:
                try:
                    out.append(self.run(b.audio, b.cache, is_final=False))
                except Exception as e:  # noqa: BLE001 - one session's failure is its own
                    out.append(e)
            return out
        return self._batched.run(blocks)

    def segmenter(self, max_utterance_seconds: float = 30.0, session_id: str = "") -> "VADSegmenter":
        return VADSegmenter(self, max_utterance_seconds, session_id)


# --- per-session segmentation ---------------------------------------------------------


@dataclass
class VADEvent:
    kind: str  # "start" | "end" | "pause" | "resume"
    start: int  # utterance start, absolute samples
    end: int = -1  # utterance end ("end"), speech end before the pause ("pause"), absolute samples
    audio: Optional[np.ndarray] = None  # the utterance ("end"), the utterance so far ("pause")
    reason: str = "vad"  # vad | max_length | finalize | sentence (closed at its pause)
    # "end" only: the utterance was paused (a "pause" event) and no speech came after it.
    after_pause: bool = False


class _Ring:
    """Recent audio as a list of chunks, addressed by absolute sample index."""

    def __init__(self) -> None:
        self.chunks: Deque[np.ndarray] = deque()
        self.start = 0  # absolute index of the first kept sample
        self.end = 0  # absolute index one past the last sample

    def append(self, x: np.ndarray) -> None:
        if x.size:
            self.chunks.append(x)
            self.end += x.size

    def trim(self, keep_from: int) -> None:
        while self.chunks and self.start + self.chunks[0].size <= keep_from:
            self.start += self.chunks.popleft().size

    def slice(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, self.start), min(b, self.end)
        if b <= a:
            return np.zeros(0, dtype=np.float32)
        out, pos = [], self.start
        for c in self.chunks:
            lo, hi = pos, pos + c.size
            if hi > a and lo < b:
                out.append(c[max(a - lo, 0):min(b - lo, c.size)])
            pos = hi
            if pos >= b:
                break
        return np.concatenate(out) if len(out) > 1 else out[0].copy()

    @property
    def size(self) -> int:
        return self.end - self.start


class VADSegmenter:
    """One session's streaming fsmn-vad: push audio, get utterance starts and ends."""

    # Audio kept before the current position while no utterance is open: the VAD reports a
    # start up to ~1 s after it (look-back 200 ms + confirmation + one block).
    HISTORY_SECONDS = 3.0
    # Re-initialise the VAD cache after this much audio without speech (bounds its stats).
    IDLE_RESET_SECONDS = 300.0
    # At most this much audio per fsmn-vad call, so max_length cuts land close to the limit.
    MAX_BLOCK_STEPS = 5

    def __init__(self, vad: FsmnVAD, max_utterance_seconds: float = 30.0, session_id: str = ""):
        self.vad = vad
        self.session_id = session_id
        self.step = int(vad.step_ms * SAMPLE_RATE / 1000)
        self.tail_step = int(vad.tail_step_ms * SAMPLE_RATE / 1000)  # while silence is counted in an utterance
        self.max_utterance = int(max_utterance_seconds * SAMPLE_RATE)
        self.history = int(self.HISTORY_SECONDS * SAMPLE_RATE)
        # Silence inside an utterance that makes a "pause" event (0: none; per session).
        self.early_silence_ms = 0
        # The turn judge called the paused speech unfinished (`hold`): the VAD's end of its
        # segment is ignored for this much silence after the speech (samples; 0: no hold).
        self._hold = 0
        self._held_end: Optional[int] = None  # the VAD's end held back (absolute samples)
        self.reset()

    def reset(self) -> None:
        self._ring = _Ring()
        self._cache: Dict[str, Any] = {}
        self._vad_origin = 0  # absolute sample of the VAD cache's 0 ms
        self._vad_fed = 0  # absolute samples given to the VAD so far
        self._utt_start: Optional[int] = None
        self._last_speech_end = 0
        self._pause_end: Optional[int] = None  # speech end of the open pause (absolute samples)
        self._pause_frame = -1  # the VAD's last speech frame when the pause was seen
        # The utterance was closed at its pause (a whole sentence, `close_at_pause`) while the
        # VAD is still inside its segment: the VAD's last speech frame then; None otherwise.
        self._closed_frame: Optional[int] = None
        self._hold, self._held_end = 0, None

    # -- state ------------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Samples received since the session timeline began."""
        return self._ring.end

    @property
    def in_speech(self) -> bool:
        return self._utt_start is not None

    @property
    def utterance_start(self) -> Optional[int]:
        return self._utt_start

    @property
    def paused(self) -> bool:
        """The open utterance is in a pause ("pause" event given, no speech since)."""
        return self._utt_start is not None and self._pause_end is not None

    @property
    def buffered_samples(self) -> int:
        return self._ring.size

    def audio(self, a: int, b: int) -> np.ndarray:
        return self._ring.slice(a, b)

    # -- streaming --------------------------------------------------------------------

    def push(self, x: np.ndarray) -> List[VADEvent]:
        """Append float32 16 kHz audio; run the VAD over every whole step available."""
        return run_steps(self.push_steps(x), lambda blocks: [self.vad.run(b.audio, b.cache, is_final=False)
                                                              for b in blocks])

    def push_steps(self, x: np.ndarray) -> Generator[VADBlock, Any, List[VADEvent]]:
        """`push` as steps: yields each `VADBlock` for the model and takes back its segments, so a
        scheduler can run many sessions' blocks in one forward (daemon/asr/batch.py). Whole steps,
        merged up to MAX_BLOCK_STEPS; one tail step at a time while the VAD counts silence in an
        utterance (the pause and end checks then run every tail step)."""
        self._ring.append(np.asarray(x, dtype=np.float32))
        events: List[VADEvent] = []
        while True:
            step = self.tail_step if self._utt_start is not None and self.trailing_silence() > 0 else self.step
            if self._ring.end - self._vad_fed < step:
                break
            block = step if step < self.step else step * self.MAX_BLOCK_STEPS
            n = min(block, (self._ring.end - self._vad_fed) // step * step)
            audio = self._ring.slice(self._vad_fed, self._vad_fed + n)
            pairs = yield VADBlock(audio, self._cache)
            events += self._apply(pairs, audio.size, final=False)
        self._trim()
        return events

    def flush(self) -> List[VADEvent]:
        """End of stream: let the VAD close what it has, close an open utterance at the current
        position (reason finalize) and start a fresh VAD cache on the same timeline."""
        tail = self._ring.slice(self._vad_fed, self._ring.end)
        end_of_audio = self._ring.end
        events: List[VADEvent] = []
        if self._held_end is not None:  # held past the VAD's end, and the stream ends: it ends there
            events.append(self._close(self._held_end, "finalize"))
        if tail.size or self._utt_start is not None:
            # funasr returns nothing for an empty final block, so pad with 50 ms of silence;
            # times past the real end are clamped.
            tail = np.concatenate([tail, np.zeros(800, dtype=np.float32)])
            events = self._run(tail, final=True, clamp=end_of_audio)
        for ev in events:
            if ev.kind == "end":
                ev.reason = "finalize"
        if self._utt_start is not None:
            events.append(self._close(end_of_audio, "finalize"))
        self._cache = {}
        self._closed_frame = None
        self._vad_origin = self._vad_fed = end_of_audio
        self._trim()
        return events

    def _run(self, block: np.ndarray, final: bool, clamp: Optional[int] = None) -> List[VADEvent]:
        return self._apply(self.vad.run(block, self._cache, is_final=final), block.size, final, clamp)

    def _apply(self, pairs: List[List[int]], samples: int, final: bool, clamp: Optional[int] = None) -> List[VADEvent]:
        """The model's segments for the next `samples` of audio -> events."""
        self._vad_fed = min(self._vad_fed + samples, self._ring.end)
        limit = clamp if clamp is not None else self._vad_fed
        events: List[VADEvent] = []
        for start_ms, end_ms in pairs:
            if start_ms >= 0 and self._held_end is not None:
                self._hold, self._held_end = 0, None  # speech again inside the hold: the same utterance
            elif start_ms >= 0 and self._utt_start is None:
                s = max(self._vad_origin + int(start_ms) * 16, self._ring.start, self._last_speech_end)
                self._utt_start = min(s, limit)
                events.append(VADEvent("start", self._utt_start))
            if end_ms >= 0 and self._utt_start is not None:
                e = max(min(self._vad_origin + int(end_ms) * 16, limit), self._utt_start)
                if self._hold and not final:
                    self._held_end = e
                else:
                    events.append(self._close(e, "vad"))
            elif end_ms >= 0:
                self._closed_frame = None  # the VAD's end of a segment already closed at its pause
        if self._utt_start is not None and self._vad_fed - self._utt_start >= self.max_utterance:
            # Force a final; the VAD is still in speech, so the rest continues as a new utterance.
            cut = self._utt_start + self.max_utterance
            events.append(self._close(cut, "max_length"))
            self._utt_start = cut
            events.append(VADEvent("start", cut))
        if self._held_end is not None and self._vad_fed - self._held_end >= self._hold:
            events.append(self._close(self._held_end, "vad"))  # turn.max_silence reached
        if self._closed_frame is not None and not final:
            events += self._resume_after_close()
        elif self._utt_start is not None and self.early_silence_ms > 0 and not final:
            events += self._pause_or_resume()
        if not final and self._utt_start is None and \
                self._vad_fed - max(self._last_speech_end, self._vad_origin) > self.IDLE_RESET_SECONDS * SAMPLE_RATE:
            self._cache = {}
            self._vad_origin = self._vad_fed
        return events

    def trailing_silence(self) -> int:
        """Samples of silence the VAD has counted at the end of the open utterance (0: speech)."""
        stats = self._cache.get("stats")
        if stats is None or self._utt_start is None:
            return 0
        return int(getattr(stats, "continous_silence_frame_count", 0)) * self.vad.frame_ms * 16

    def _pause_or_resume(self) -> List[VADEvent]:
        """A "pause" once the VAD has counted early_silence_ms of silence in the open utterance;
        a "resume" when it confirms speech again after one (then the next silence may pause)."""
        stats = self._cache.get("stats")
        if stats is None or self._utt_start is None:
            return []
        last = int(getattr(stats, "latest_confirmed_speech_frame", -1))
        silent = int(getattr(stats, "continous_silence_frame_count", 0))
        if self._pause_end is not None:
            # Speech again: confirmed frames past the pause's by more than the VAD's settling (it
            # may still confirm a frame or two at the pause's edge, more often when it runs every
            # tail step: a "resume" there withdrew the tentative and paused again 100 ms later).
            if (last - self._pause_frame) * self.vad.frame_ms * 16 > PAUSE_END_SLACK:
                ev = VADEvent("resume", self._utt_start, self._vad_origin + last * self.vad.frame_ms * 16)
                self._pause_end, self._pause_frame = None, -1
                return [ev]
            return []
        if silent <= 0 or silent * self.vad.frame_ms + self.vad.speech_to_sil_ms < self.early_silence_ms:
            return []
        # Where the VAD will end the utterance if nothing follows: its last speech frame (which
        # already includes its look-ahead), one frame on.
        end = self._vad_origin + (last + 1) * self.vad.frame_ms * 16
        end = min(max(end, self._utt_start), self._vad_fed)
        self._pause_end, self._pause_frame = end, last
        return [VADEvent("pause", self._utt_start, end, self._ring.slice(self._utt_start, end))]

    def hold(self, seconds: float) -> None:
        """The turn judge called the paused speech unfinished: the VAD's end of this utterance
        waits until `seconds` of silence after the speech; speech again continues it."""
        if self.paused:
            self._hold = int(seconds * SAMPLE_RATE)

    def close_at_pause(self, reason: str = "sentence") -> VADEvent:
        """End the open utterance at its pause now (the engine judged the speech before it a
        whole sentence) instead of at the VAD's end silence. The VAD stays inside its segment:
        its end of it is then ignored, and speech it confirms before that starts a new
        utterance (`_resume_after_close`)."""
        if self._utt_start is None or self._pause_end is None:
            raise RuntimeError("close_at_pause: no paused utterance")
        frame = self._pause_frame
        ev = self._close(self._pause_end, reason)
        self._closed_frame = frame
        return ev

    def _resume_after_close(self) -> List[VADEvent]:
        stats = self._cache.get("stats")
        last = int(getattr(stats, "latest_confirmed_speech_frame", -1)) if stats is not None else -1
        if self._closed_frame is None or last <= self._closed_frame:
            return []
        # Speech again inside the VAD's segment: a new utterance, from a little before the VAD
        # confirmed it (it confirms after a window of speech), never before the closed one's end.
        at = self._vad_origin + last * self.vad.frame_ms * 16 - RESUME_LOOKBACK
        self._utt_start = min(max(at, self._last_speech_end, self._ring.start), self._vad_fed)
        self._closed_frame = None
        return [VADEvent("start", self._utt_start)]

    def _close(self, end: int, reason: str) -> VADEvent:
        start = self._utt_start if self._utt_start is not None else end
        # Nothing but silence since the pause: the final's speech is the pause's (its end lies
        # a frame or two later, where the VAD drew it).
        after_pause = self._pause_end is not None and reason != "max_length" and \
            end - self._pause_end <= PAUSE_END_SLACK
        ev = VADEvent("end", start, end, self._ring.slice(start, end), reason, after_pause)
        self._utt_start = None
        self._last_speech_end = end
        self._pause_end, self._pause_frame = None, -1
        self._hold, self._held_end = 0, None
        return ev

    def _trim(self) -> None:
        keep = self._ring.end - self.history
        if self._utt_start is not None:
            keep = min(keep, self._utt_start)
        self._ring.trim(min(keep, self._vad_fed))

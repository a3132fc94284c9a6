"""ASR admission and lag accounting: pure code with an injected clock (tested without sleeps).

A session's *lag* is the age of its oldest unprocessed audio, counted from when a real-time
sender would have sent it: an audio message is due when it arrives or, when the sender is
ahead of real time, when the previous one would have finished playing, so a file sent faster
than real time is not "behind".

- `open` is refused (`busy`) while any session is more than `limits.max_asr_lag` behind: the
  worker is past capacity and one more stream would make every session's finals later.
- A session more than `limits.max_session_lag` behind has its audio refused (`busy`, the chunk
  dropped) until it is back within `limits.max_asr_lag`: one gap, not scattered frames.
- A session's queued audio is capped at `SESSION_BACKLOG_SECONDS`, and its queued commands
  of any kind (zero-length audio and `reset` included) at `MAX_QUEUED_COMMANDS`.
- `open` is also refused (`busy`) when the streams it would make are predicted to load the
  worker past `limits.max_asr_load` (daemon/asr/load.py: the load measured now plus the cost
  per stream fitted to what the worker did), or the pool's decode thread, where it has one,
  past `load.DECODE_MAX_LOAD`, so the stream one too many is told to retry before the others
  fall behind; `limits.max_asr_load: 0` turns this off.
- Sessions are shared between ZeroMQ peers (`FairShare`), work-conserving: a peer may hold
  any number of sessions while nobody else wants one, but while another peer is waiting (it
  was refused `busy` in the last `WAITING_SECONDS` past its retry hint, and has not been
  admitted since), a peer holding `limits.max_sessions / active peers` or more has its new
  opens refused (`busy`), so the slots its sessions free go to the one waiting. (A bridge is one
  peer for all its browsers: alone it may use every slot.)
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from daemon.asr.load import DECODE_MAX_LOAD, LOAD_WINDOW_SECONDS, LoadModel, streams_throughout
from daemon.config import LimitsConfig
from daemon.errors import AudioError, ErrorCode, S2SError

logger = logging.getLogger(__name__)

# Audio a session may have queued, in seconds; more gets `busy` (the sender is far ahead).
SESSION_BACKLOG_SECONDS = 60.0
# Commands (audio of any length, reset, finalize) a session may have queued; more gets `busy`.
# Room for the whole audio backlog in 20 ms messages (what the bridge sends), no more.
MAX_QUEUED_COMMANDS = 4096
# A session is streaming while its audio arrives within this many seconds of the last; one
# that has not sent audio yet counts as streaming for a window after its open.
STREAMING_GAP_SECONDS = 1.0
# A session this far behind real time means the worker is catching up, not at its steady state.
CATCHING_UP_SECONDS = 0.5


# A peer refused an `open` counts as waiting for this long past the retry hint it was given.
WAITING_SECONDS = 3.0


def retry_after(seconds: float) -> float:
    """A retry hint for `busy`: the expected wait, within 1-30 s."""
    return round(min(30.0, max(1.0, seconds)), 1)


@dataclass
class Backlog:
    """One session's accepted-but-unprocessed audio, and whether it is being shed."""

    session_id: str
    sample_rate: int
    pending: Deque[Tuple[float, int]] = field(default_factory=deque)  # (due time, samples)
    samples: int = 0
    clock: float = 0.0  # when the last accepted audio ends in real time
    shedding: bool = False
    shed_chunks: int = 0
    shed_samples: int = 0
    opened: float = 0.0
    first_audio: Optional[float] = None  # when its first audio arrived
    last_audio: Optional[float] = None   # when its latest audio arrived

    def lag(self, now: float) -> float:
        """Seconds the oldest unprocessed audio is behind real time (0 when caught up)."""
        return max(0.0, now - self.pending[0][0]) if self.pending else 0.0

    def accept(self, samples: int, now: float) -> None:
        if samples:  # an empty message is no audio: it does not make the session a stream
            if self.first_audio is None:
                self.first_audio = now
            self.last_audio = now
        due = max(now, self.clock)
        self.clock = due + samples / self.sample_rate
        self.pending.append((due, samples))
        self.samples += samples

    def done(self, count: int) -> None:
        """`count` audio messages went through the engine."""
        for _ in range(count):
            if not self.pending:
                break
            self.samples -= self.pending.popleft()[1]
        self.samples = max(0, self.samples)

    def forget(self) -> None:
        self.pending.clear()
        self.samples = 0

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate


class Capacity:
    """The admission rules over every session's backlog; `limits` is read per call (reloadable)."""

    def __init__(self, limits: Callable[[], LimitsConfig], clock: Callable[[], float],
                 busy: Callable[[], float] = lambda: 0.0,
                 curve: Callable[[], Optional[Tuple[float, float]]] = lambda: None,
                 decode_busy: Callable[[], float] = lambda: 0.0,
                 decode_curve: Callable[[], Optional[Tuple[float, float]]] = lambda: None):
        self.limits = limits
        self.clock = clock
        self.busy_open_lag = 0
        self.busy_open_load = 0
        self.audio_shed = 0
        self.load = LoadModel(busy, clock, lambda: limits().asr_stream_cost, curve)  # curve: the pool's, at load
        # The pool's decode thread, where it has one (daemon/asr/batch.py; idle otherwise): no
        # prior cost, no ceilings learnt (its saturated windows are bursts of finals), and a
        # straight line (a decode per utterance: after 1 and 2 streams a fitted 0.63 put 4 at 0.38
        # of it, where they measured 0.49 and held p95 1.45 s).
        self.decode = LoadModel(decode_busy, clock, lambda: 0.0, decode_curve, min_exponent=1.0)
        self._batch_seen = False  # this window carried other work than the streams' steady state
        self._churn = False       # a session's audio began or ended in this window, or a session went
        self._seen: Set[str] = set()  # the sessions at the last tick
        self._lag_mark = 0.0      # the worst lag when the last window closed

    def tick(self, backlogs: Iterable[Backlog]) -> None:
        """About every second: close the load window when due (daemon/asr/load.py)."""
        bl = list(backlogs)
        now = self.clock()
        rt = [b for b in bl if not self._ahead(b, now)]
        worst = self.lag(bl, now)[0]
        self._batch_seen = self._batch_seen or len(rt) < len(bl)
        ids = {b.session_id for b in bl}
        t0 = self.load.window_start
        self._churn = self._churn or bool(self._seen - ids) or any(self._began_or_ended(b, t0, now) for b in rt)
        self._seen = ids
        # Falling behind (the lag grew over the window) is the streams' doing; a lag shrinking
        # while a backlog drains is not, and any lag means the load is not their steady state.
        # Nor is a window in which sessions came or went: its load holds the bounded work of
        # sessions not counted as its streams (an ended session's last decode, the first audio
        # of a new one), so saturation then is a burst, not "this many streams are too many".
        growing = worst > CATCHING_UP_SECONDS and worst > self._lag_mark and not self._churn
        def streams(t0: float) -> int:
            return streams_throughout([b.first_audio for b in rt], [b.last_audio for b in rt], t0, now,
                                      STREAMING_GAP_SECONDS)

        steady = not self._batch_seen and not self._churn
        # A decode parks its session's feed: the lag it makes is the decode thread's own work.
        self.decode.tick(streams, clean=steady)
        if self.load.tick(streams, clean=steady and worst <= CATCHING_UP_SECONDS, behind=growing):
            self._batch_seen = self._churn = False
            self._lag_mark = worst

    @staticmethod
    def _began_or_ended(b: Backlog, t0: float, now: float) -> bool:
        """The session's audio began after t0, or stopped arriving (it was finalized, or went
        quiet) within the window: not a stream through all of it."""
        if b.first_audio is None or b.last_audio is None:
            return False
        return b.first_audio > t0 or (now - b.last_audio > STREAMING_GAP_SECONDS
                                      and b.last_audio + STREAMING_GAP_SECONDS > t0)

    @staticmethod
    def _ahead(b: Backlog, now: float) -> bool:
        """Sending faster than real time (a file): not a stream."""
        return b.clock > now + STREAMING_GAP_SECONDS

    def streaming(self, backlogs: Iterable[Backlog]) -> List[Backlog]:
        """The real-time streams now: sessions whose audio keeps arriving at about real time, and
        those opened in the last two windows that have sent none yet (counted as streams)."""
        now = self.clock()
        return [b for b in backlogs
                if (b.last_audio is not None and now - b.last_audio <= STREAMING_GAP_SECONDS and not self._ahead(b, now))
                or (b.last_audio is None and now - b.opened <= 2 * LOAD_WINDOW_SECONDS)]

    @staticmethod
    def lag(backlogs: Iterable[Backlog], now: float) -> Tuple[float, float]:
        """(worst session lag behind real time, audio seconds queued over all sessions)."""
        worst, queued = 0.0, 0.0
        for b in backlogs:
            worst = max(worst, b.lag(now))
            queued += b.seconds
        return worst, queued

    def admit_open(self, open_sessions: int, backlogs: Iterable[Backlog], session_id: str = "") -> None:
        lim = self.limits()
        if open_sessions >= lim.max_sessions:
            raise S2SError(f"{open_sessions} sessions open (limits.max_sessions); retry later", ErrorCode.BUSY,
                           retry_after=1.0)
        backlogs = list(backlogs)
        worst, queued = self.lag(backlogs, self.clock())
        if worst > lim.max_asr_lag:
            self.busy_open_lag += 1
            logger.info("open %s refused: ASR %.1f s behind real time, %.1f s audio queued (limits.max_asr_lag=%g)",
                        session_id, worst, queued, lim.max_asr_lag)
            raise S2SError(f"speech recognition is at capacity ({worst:.1f} s behind real time, "
                           f"limits.max_asr_lag={lim.max_asr_lag:g}); retry later", ErrorCode.BUSY,
                           retry_after=retry_after(worst - lim.max_asr_lag + 1.0))
        live = self.streaming(backlogs)
        # With no other stream live there is nobody to protect: one stream is always served
        # (the lag rule above still holds).
        if lim.max_asr_load > 0 and live:
            for model, thread, limit, why in (
                    (self.load, "worker", lim.max_asr_load, f"limits.max_asr_load={lim.max_asr_load:g}"),
                    (self.decode, "decode thread", min(lim.max_asr_load, DECODE_MAX_LOAD),
                     f"its finals queue past {min(lim.max_asr_load, DECODE_MAX_LOAD):.0%}")):
                predicted, fit = model.predict(len(live) + 1)
                if predicted <= limit:
                    continue
                self.busy_open_load += 1
                logger.info("open %s refused: %d streams predicted to load the ASR %s %.0f %% (%.3f x N ^ %.2f; "
                            "saturated at %s; measured %.0f %%; limit %.0f %%)", session_id, len(live) + 1, thread,
                            100 * predicted, fit.scale, fit.exponent, model.saturated_at, 100 * model.load,
                            100 * limit)
                raise S2SError(f"speech recognition is at capacity ({len(live)} real-time streams; one more is "
                               f"predicted to load its {thread} {predicted:.0%}, {why}); retry later",
                               ErrorCode.BUSY, retry_after=retry_after(LOAD_WINDOW_SECONDS + 1.0))

    def stream_capacity(self, max_load: float) -> int:
        """Real-time streams predicted to fit (0: no limit set): the fewer of the worker's and
        the decode thread's."""
        worker = self.load.capacity(max_load)
        decode = self.decode.capacity(min(max_load, DECODE_MAX_LOAD))
        return min(worker, decode) if worker and decode else worker

    def admit_command(self, b: Backlog, queued: int) -> None:
        """One more command for a session that has `queued` commands waiting."""
        if queued >= MAX_QUEUED_COMMANDS:
            raise S2SError(f"session {b.session_id} has {queued} commands queued; slow down", ErrorCode.BUSY,
                           retry_after=1.0)

    def admit_audio(self, b: Backlog, nbytes: int, queued: int) -> int:
        """Check one audio message of `nbytes` PCM16 bytes; account for it; return its samples."""
        lim = self.limits()
        if nbytes % 2:
            raise AudioError(f"PCM16 audio must have an even number of bytes, got {nbytes}")
        if nbytes > lim.max_chunk_seconds * b.sample_rate * 2:
            raise AudioError(f"audio chunk of {nbytes // 2 / b.sample_rate:.2f} s exceeds limits.max_chunk_seconds="
                             f"{lim.max_chunk_seconds:g}")
        self.admit_command(b, queued)
        samples = nbytes // 2
        if b.samples + samples > SESSION_BACKLOG_SECONDS * b.sample_rate:
            raise S2SError(f"session {b.session_id} has {SESSION_BACKLOG_SECONDS:g} s of audio queued; slow down",
                           ErrorCode.BUSY, retry_after=1.0)
        now = self.clock()
        self._check_lag(b, now, samples, lim)
        b.accept(samples, now)
        return samples

    def _check_lag(self, b: Backlog, now: float, samples: int, lim: LimitsConfig) -> None:
        lag = b.lag(now)
        if b.shedding and lag <= lim.max_asr_lag:
            b.shedding = False
            logger.info("session %s: caught up (%.1f s behind); accepting audio again (%d messages, %.1f s dropped)",
                        b.session_id, lag, b.shed_chunks, b.shed_samples / b.sample_rate)
        elif not b.shedding and lag > lim.max_session_lag:
            b.shedding = True
            logger.warning("session %s: %.1f s behind real time (limits.max_session_lag=%g): refusing audio until "
                           "within %g s", b.session_id, lag, lim.max_session_lag, lim.max_asr_lag)
        if b.shedding:
            b.shed_chunks += 1
            b.shed_samples += samples
            self.audio_shed += 1
            raise S2SError(f"speech recognition is {lag:.1f} s behind real time for session {b.session_id} "
                           f"(limits.max_session_lag={lim.max_session_lag:g}); audio dropped",
                           ErrorCode.BUSY, retry_after=retry_after(lag - lim.max_asr_lag))


class FairShare:
    """Sessions per peer while another peer waits (see the module docstring). Pure: the peers'
    session counts are passed in, the clock is injected."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.waiting: Dict[bytes, float] = {}  # peer -> until when it counts as waiting
        self.refused = 0

    def check(self, peer: bytes, held: Mapping[bytes, int], capacity: int, label: str = "") -> None:
        """Refuse (`busy`) an open from `peer` holding its share or more while another peer
        waits. `held`: sessions per peer now; `capacity`: limits.max_sessions."""
        now = self.clock()
        for p in [p for p, until in self.waiting.items() if until < now]:
            del self.waiting[p]
        others = [p for p in self.waiting if p != peer]
        if not others:
            return
        active = {p for p, n in held.items() if n > 0} | set(self.waiting) | {peer}
        share = max(1, capacity // len(active))
        mine = held.get(peer, 0)
        if mine >= share:
            self.refused += 1
            logger.info("open %s refused: its client holds %d sessions, its share while %d other client(s) wait "
                        "is %d (%d clients, limits.max_sessions=%d)", label, mine, len(others), share, len(active),
                        capacity)
            raise S2SError(f"this client holds {mine} speech sessions and {len(others)} other client(s) are waiting "
                           f"for one: {share} each while they wait ({capacity} sessions, {len(active)} clients); "
                           f"retry later", ErrorCode.BUSY, retry_after=retry_after(2.0))

    def refused_open(self, peer: bytes, hint: Optional[float]) -> None:
        """An open from `peer` was refused `busy`: it waits (counts as active) for a while."""
        self.waiting[peer] = self.clock() + (hint or 0.0) + WAITING_SECONDS

    def admitted(self, peer: bytes) -> None:
        self.waiting.pop(peer, None)

    def forget(self, peer: bytes) -> None:
        """The peer is gone."""
        self.waiting.pop(peer, None)

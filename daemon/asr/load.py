"""What the ASR worker can take: its measured load and the predicted cost of more streams.

Pure code with an injected clock and busy-time source (tested with fake numbers).

The worker's *load* is the fraction of wall time it spent running calls over the last window
(`LOAD_WINDOW_SECONDS`), from `Worker.busy_s`. Each window also counts the streams that were
sending audio through all of it, and the pair (streams, load) is one observation of the cost
curve. With batching across sessions (daemon/asr/batch.py) that curve is concave: a lone stream
pays every per-call overhead alone, 24 streams share it, so each added stream costs less than
the one before. A straight line fitted at light load and extrapolated (what this module did
first) refused half of what the worker could serve: after 1 and then 8 streams it admitted 17 of
32 that a fresh daemon held at final p95 0.45 s. The model is now a power law
`load = scale x N ** exponent`, fitted by weighted least squares in log-log to recent
observations (each window's weight decaying by `DECAY`), with the exponent held between
`MIN_EXPONENT` (strongly shared cost: the tiny FunASR engines measure about 0.5 from 1 to 48
streams) and 1 (no sharing: a cost proportional to the streams, as Whisper's or a fake's). Where
the observations span a single N the exponent cannot be measured and is taken at
`MIN_EXPONENT`: the headroom the worker measured is spent at the rate a batching worker shows,
and real saturation, not an extrapolation, says where it ends.

Windows where the worker was saturated say only "at least this much": they are left out of the
fit, but the fewest streams that saturated it while the streams fell behind real time are
remembered, and no more streams than that are predicted to fit (until a window with as many
streams is measured unsaturated, or for `SATURATION_MEMORY_SECONDS`); a saturated window with
nobody behind (one long decode) is a burst, not a capacity. So is a window in which sessions
came or went (daemon/asr/capacity.py passes it as not `behind` and not `clean`): its load holds
work of sessions that are not among its streams, an ended session's final decode or a new one's
first audio. Sessions of one utterance each (the Wyoming adapter's: open, a few seconds of audio,
finalize) make every window such a one: when several finals land together the worker is full
and the next utterances' audio waits, with one or two sessions streaming through the whole
window, and a ceiling learned there ("saturated at 1") admitted one utterance at a time (issue
26: ~100 refusals and an 8-client p95 of 14 s). Such sessions are held back by the lag rule
(`limits.max_asr_lag`) alone, which is what past capacity means for them.

Only real-time streams are counted: a session sending faster than real time (a file being
transcribed) takes whatever the worker has left, so a window in which one was sending is not
an observation of the curve (`tick(..., clean=False)`); nor is one that ends with a session
behind real time (the worker was catching up: its load belonged to earlier, busier windows).

A pool that answers its offline decodes on a thread of its own (a full-size FunASR pool on the
CPU) has two of these models: the worker thread's (feeds: VAD, streaming chunks) and the decode
thread's (finals), each from that thread's own busy time. One figure for both, capped at one
core, read 4 full-size streams as 0.86-0.93 of the worker (0.58 + 0.47 measured apart) and
admitted 3 in half the runs, where the two threads on two cores held 4; its calibrated curve
had the same sum. The decode thread's prediction is held under `DECODE_MAX_LOAD`, the worker's
under `limits.max_asr_load`. The decode thread's curve is a straight line (`min_exponent` 1: a
decode per utterance), its scale the mean load per stream over a longer memory (`LINEAR_DECAY`):
its windows are bursts, and the mean of their logarithms priced a stream at a third.

Admission (`Capacity.admit_open`) asks `predict(streams after the new one)`, counting the
streams opened but not measured yet too, so a burst of opens at one instant cannot all be
admitted into a worker that then falls behind. Before anything has been measured each stream
costs `limits.asr_stream_cost` (a straight line: what a fresh daemon admits at once), unless
the pool measured its own cost curve at load (`curve`: full-size FunASR models,
daemon/asr/calibrate.py): then that curve, never below the line. The calibrated exponent is
also the one taken while the observations span a single N (the tiny models' 0.5 would let a
daemon that served one Paraformer-large stream admit eight).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

LOAD_WINDOW_SECONDS = 2.0
# The most a pool's decode thread (daemon/asr/batch.py: a full-size pool's finals) may be predicted
# busy. It serves finals, which come in bursts (utterances that end together), so it queues long
# before it is full: 4 full-size streams kept it 0.47 busy at final p95 0.98 s, 5 kept it 0.54
# busy at 1.46 s and 6 at 0.55 and 1.57 s, while the worker thread was 0.58 / 0.65 / 0.69 busy
# (admission off, fresh daemons, s2s-bench capacity --engines full, BENCHMARKS.md). Later the
# same day, the machine slower (the pool's calibration pricing a stream at 0.139-0.172 of it
# against 0.127), 4 admitted streams held p95 1.34-1.76 s fresh and 1.50-1.55 s after earlier
# load, 3 held 0.72-0.94 s (0.42 of it): at 0.55 admission let 4 in whenever the calibration
# came out low. Measured per stream it is 0.117-0.141 (4 streams 0.47-0.52); the calibration,
# speech all the time, 0.127-0.172: at 0.5 the 4th is refused wherever a stream costs 0.125 or
# more (where 4 no longer held), the 3rd only where the calibration says 0.167.
DECODE_MAX_LOAD = 0.5
DECAY = 0.85                 # weight kept by an observation per newer window
# ... on a straight line's sums (the decode thread's): its windows are bursts, so its mean needs
# a longer memory (~40 s) to say the same thing twice.
LINEAR_DECAY = 0.95
SATURATED = 0.95             # a window this busy measured a floor, not the demand
SATURATION_MEMORY_SECONDS = 30.0  # how long "N streams saturated it" holds as a ceiling
MIN_SPREAD = 0.02            # variance of ln N below which the observations are "one N"
MIN_EXPONENT = 0.5           # the most concave cost curve believed (and the one assumed at one N)
MIN_LOAD = 1e-3              # a window's load is taken as at least this (logarithms)

logger = logging.getLogger(__name__)


@dataclass
class Fit:
    """load = scale x streams ** exponent; `ref`: the stream count the observations centre on."""

    scale: float
    exponent: float = 1.0
    ref: float = 1.0

    @property
    def per_stream(self) -> float:
        """What one more stream costs where the worker was measured (describe's
        `asr_stream_cost`): the curve's slope at `ref`."""
        return self.exponent * self.scale * self.ref ** (self.exponent - 1.0)

    @property
    def fixed(self) -> float:
        """The shared part of the load there (describe's `asr_fixed_load`): where the curve's
        tangent at `ref` meets zero streams."""
        return self.load_at(self.ref) * (1.0 - self.exponent)

    def load_at(self, streams: float) -> float:
        return self.scale * max(streams, 0.0) ** self.exponent

    def load(self, streams: int) -> float:
        return self.load_at(float(streams))

    def capacity(self, max_load: float) -> int:
        """Real-time streams that fit under max_load by this fit (0: none, or no limit set)."""
        if max_load <= 0 or self.scale <= 0:
            return 0
        return max(0, int((max_load / self.scale) ** (1.0 / self.exponent) + 1e-9))


class LoadModel:
    """Measured worker load, and a fitted cost curve of real-time streams."""

    def __init__(self, busy: Callable[[], float], clock: Callable[[], float], prior: Callable[[], float],
                 curve: Callable[[], Optional[Tuple[float, float]]] = lambda: None,
                 min_exponent: float = MIN_EXPONENT):
        self.busy = busy
        self.min_exponent = min_exponent  # the most concave curve believed for this thread
        self.clock = clock
        self.prior = prior
        self.curve = curve  # (scale, exponent) the pool measured at load, or None
        self.load = 0.0              # busy fraction over the last complete window
        self.window_start = clock()  # start of the window being measured now
        self._busy0 = busy()
        self._sums = [0.0] * 5       # decayed sums: w, w*x, w*y, w*x*x, w*x*y (x = ln N, y = ln load)
        self._linear = [0.0, 0.0]    # decayed sums of N and of the load (a straight line's ratio)
        self.observations = 0
        self.saturated_at: Optional[int] = None  # fewest streams seen saturating the worker
        self._saturated_seen = 0.0                # ... when last seen

    def tick(self, streams_throughout: Callable[[float], int], clean: bool = True, behind: bool = False) -> bool:
        """Close the window if it is long enough; `streams_throughout(t0)` counts the streams
        that sent audio through all of [t0, now]. `clean` False: the window also carried work
        that is not the streams' steady state (a file sent faster than real time, a backlog
        being caught up): it measures the load but teaches nothing. `behind`: the streams fell
        (further) behind real time over the window, so a saturated window was their doing (a
        ceiling); saturation with nobody falling behind is a burst (a long decode) or a backlog
        draining, not a capacity. True when a window closed."""
        now = self.clock()
        dt = now - self.window_start
        if dt < LOAD_WINDOW_SECONDS:
            return False
        busy = self.busy()
        self.load = min(1.0, max(0.0, (busy - self._busy0) / dt))
        n = streams_throughout(self.window_start)
        if n > 0 and behind and self.load >= SATURATED:
            if self.saturated_at is None or n < self.saturated_at:
                logger.info("ASR worker saturated (%.0f %%) by %d real-time streams falling behind: at most %d "
                            "streams are admitted for %g s", 100 * self.load, n, n - 1, SATURATION_MEMORY_SECONDS)
            self.saturated_at = n if self.saturated_at is None else min(self.saturated_at, n)
            self._saturated_seen = now
        elif n > 0 and clean and not behind and (self.load < SATURATED or self.min_exponent >= 1.0):
            # A straight line is a mean: a bursty thread's full windows (its decodes) belong in it.
            self.observe(n, self.load)
            if self.saturated_at is not None and n >= self.saturated_at:
                self.saturated_at = None  # as many streams fit now (the machine got quieter)
        if self.saturated_at is not None and now - self._saturated_seen > SATURATION_MEMORY_SECONDS:
            self.saturated_at = None  # not seen again for a while: let the fit speak
        self.window_start, self._busy0 = now, busy
        return True

    def observe(self, streams: int, load: float) -> None:
        s = [v * DECAY for v in self._sums]
        x, y = math.log(max(streams, 1)), math.log(max(load, MIN_LOAD))
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            s[i] += v
        self._sums = s
        self._linear = [self._linear[0] * LINEAR_DECAY + streams, self._linear[1] * LINEAR_DECAY + load]
        self.observations += 1

    def fit(self) -> Fit:
        w, sx, sy, sxx, sxy = self._sums
        curve = self.curve()
        if w <= 0:
            if curve is not None and curve[0] > self.prior():
                return Fit(curve[0], min(1.0, max(self.min_exponent, curve[1])))
            return Fit(max(self.prior(), 1e-4), 1.0)
        mx, my = sx / w, sy / w
        if self.min_exponent >= 1.0:  # a straight line: the load per stream over the windows (a
            # mean of loads, not of their logarithms: bursty windows, most near 0, pulled it to a third)
            return Fit(max(self._linear[1] / max(self._linear[0], 1e-9), 1e-4), 1.0, math.exp(mx))
        var = sxx / w - mx * mx
        if var < MIN_SPREAD:  # one N: the exponent cannot be measured
            p = self.min_exponent if curve is None else min(1.0, max(self.min_exponent, curve[1]))
        else:
            p = min(1.0, max(self.min_exponent, (sxy / w - mx * my) / var))
        return Fit(max(math.exp(my - p * mx), 1e-4), p, math.exp(mx))

    def predict(self, streams: int) -> Tuple[float, Fit]:
        """Predicted load with `streams` real-time streams, and the fit it came from."""
        f = self.fit()
        load = f.load(streams)
        if self.saturated_at is not None and streams >= self.saturated_at:
            load = max(load, SATURATED)
        return load, f

    def capacity(self, max_load: float) -> int:
        """Real-time streams predicted to fit under max_load (0: no limit set)."""
        n = self.fit().capacity(max_load)
        return min(n, self.saturated_at - 1) if self.saturated_at is not None and n else n


def streams_throughout(first_audio: "list[Optional[float]]", last_audio: "list[Optional[float]]", t0: float,
                       now: float, gap: float = 1.0) -> int:
    """Streams whose audio began by t0 and was still arriving within `gap` of now."""
    return sum(1 for a, b in zip(first_audio, last_audio, strict=True)
               if a is not None and b is not None and a <= t0 and now - b <= gap)

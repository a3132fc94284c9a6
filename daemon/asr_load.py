"""What the ASR worker can take: its measured load and the predicted cost of more streams.

Pure code with an injected clock and busy-time source (tested with fake numbers).

The worker's *load* is the fraction of wall time it spent running calls over the last window
(`LOAD_WINDOW_SECONDS`), from `Worker.busy_s`. Each window also counts the streams that were
sending audio through all of it, and the pair (streams, load) is one observation of the cost
curve. With batching across sessions (daemon/asr_batch.py) that curve is not a line through the
origin: a lone stream pays every per-call overhead alone, 24 streams share it, so the average
cost per stream falls as streams are added. The model is a line `load = fixed + per_stream x N`
fitted to recent observations (weighted least squares, each window's weight decaying by
`DECAY`). With observations at one N only, the slope cannot be measured: the per-stream cost
is then the smaller of the average and `limits.asr_stream_cost` (the configured marginal cost),
and the rest of the measured load is the fixed part. Windows where the worker was saturated say
only "at least this much": they are left out of the fit, but the fewest streams that saturated
it while the streams fell behind real time are remembered, and no more streams than that are
predicted to fit (until a window with as many streams is measured unsaturated, or for
`SATURATION_MEMORY_SECONDS`); a saturated window with nobody behind (one long decode) is a
burst, not a capacity.

Only real-time streams are counted: a session sending faster than real time (a file being
transcribed) takes whatever the worker has left, so a window in which one was sending is not
an observation of the curve (`tick(..., clean=False)`); nor is one that ends with a session
behind real time (the worker was catching up: its load belonged to earlier, busier windows).

Admission (`Capacity.admit_open`) asks `predict(streams after the new one)`, counting the
streams opened but not measured yet too, so a burst of opens at one instant cannot all be
admitted into a worker that then falls behind. Before anything has been measured the
per-stream cost is `limits.asr_stream_cost`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

LOAD_WINDOW_SECONDS = 2.0
DECAY = 0.85                 # weight kept by an observation per newer window
SATURATED = 0.95             # a window this busy measured a floor, not the demand
SATURATION_MEMORY_SECONDS = 30.0  # how long "N streams saturated it" holds as a ceiling
MIN_SPREAD = 0.05            # variance of N below which the observations are "one N"


@dataclass
class Fit:
    fixed: float
    per_stream: float

    def load(self, streams: int) -> float:
        return self.fixed + self.per_stream * max(streams, 0)

    def capacity(self, max_load: float) -> int:
        """Real-time streams that fit under max_load by this fit (0: none, or no limit set)."""
        if max_load <= 0 or self.per_stream <= 0:
            return 0
        return max(0, int((max_load - self.fixed) / self.per_stream + 1e-9))


class LoadModel:
    """Measured worker load, and a fitted cost per real-time stream."""

    def __init__(self, busy: Callable[[], float], clock: Callable[[], float], prior: Callable[[], float]):
        self.busy = busy
        self.clock = clock
        self.prior = prior
        self.load = 0.0              # busy fraction over the last complete window
        self.window_start = clock()  # start of the window being measured now
        self._busy0 = busy()
        self._sums = [0.0] * 5       # decayed sums: w, w*n, w*l, w*n*n, w*n*l
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
            self.saturated_at = n if self.saturated_at is None else min(self.saturated_at, n)
            self._saturated_seen = now
        elif n > 0 and clean and not behind and self.load < SATURATED:
            self.observe(n, self.load)
            if self.saturated_at is not None and n >= self.saturated_at:
                self.saturated_at = None  # as many streams fit now (the machine got quieter)
        if self.saturated_at is not None and now - self._saturated_seen > SATURATION_MEMORY_SECONDS:
            self.saturated_at = None  # not seen again for a while: let the fit speak
        self.window_start, self._busy0 = now, busy
        return True

    def observe(self, streams: int, load: float) -> None:
        s = [v * DECAY for v in self._sums]
        n, ld = float(streams), float(load)
        for i, v in enumerate((1.0, n, ld, n * n, n * ld)):
            s[i] += v
        self._sums = s
        self.observations += 1

    def fit(self) -> Fit:
        w, sn, sl, snn, snl = self._sums
        prior = max(self.prior(), 1e-4)
        if w <= 0:
            return Fit(0.0, prior)
        mn, ml = sn / w, sl / w
        var = snn / w - mn * mn
        if mn <= 0:
            return Fit(0.0, prior)
        if var < MIN_SPREAD:  # one N: the configured marginal cost, at most the average
            per = min(ml / mn, prior)
            return Fit(max(ml - per * mn, 0.0), max(per, 1e-4))
        per = (snl / w - mn * ml) / var
        if per <= 0:  # noise (or a cost that does not grow): charge the average
            return Fit(0.0, max(ml / mn, 1e-4))
        fixed = ml - per * mn
        if fixed < 0:  # a line through the origin fits at least as well
            return Fit(0.0, max(ml / mn, 1e-4))
        return Fit(fixed, per)

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

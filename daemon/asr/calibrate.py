"""What one real-time stream costs a full-size FunASR pool, measured when it loads.

Admission (daemon/asr/load.py) learns the cost of streams from the worker's measured load, but
before it has measured anything it can only assume, and the assumption that fits the tiny
models (`limits.asr_stream_cost`, 0.0225 of the worker per stream) let a fresh daemon admit 40
streams of Paraformer-large where 2 fell behind. So a full-size pool times its own model calls
once at load, on the worker, before any session: one streaming chunk for 1 and for
`CALIBRATE_STREAMS` sessions at once (batched, daemon/asr/paraformer_stream.py), one offline
decode of `DECODE_SECONDS`, and a session fed a second of quiet in 60 ms frames (the VAD,
the frontends and the feed's own steps: what every stream pays whether it speaks or not).
From those, the worker seconds per second of `n` real-time streams that speak all the time
(the worst case):

    cost(n) = chunk(n) / 0.6 s + n x (decode / DECODE_SECONDS + a fed second)

and the power law through cost(1) and cost(CALIBRATE_STREAMS) is the curve admission starts
from (`LoadModel(curve=...)`) until it has measured the real one. A pool that decodes on a
thread of its own (`offload_decodes`) gets two curves: the worker's, `chunk(n) / 0.6 s + n x a
fed second`, and the decode thread's, `n x decode / DECODE_SECONDS` (one load figure for both
priced 4 full-size streams at 0.86-0.93 and admitted 3 of them in half the runs, where the two
threads held 4). Small models are not calibrated: their cost is per-call overhead that the prior
already describes.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)

CALIBRATE_STREAMS = 4
DECODE_SECONDS = 3.0
CHUNK_SECONDS = 0.6
WARM_CHUNKS = 2    # chunks run before the timed ones (the first ones have no look-back yet)
REPEATS = 3        # each call timed this many times, the median kept: one slice lost to another
                   # process must not bend the curve (at load 5 a single timing put one
                   # session's chunk above four sessions')
FRAME_SECONDS = 0.06  # the fed second goes in frames this long (what the bridge and bench send)


def curve(cost1: float, cost_n: float, n: int = CALIBRATE_STREAMS) -> Tuple[float, float]:
    """(scale, exponent) of the power law through cost(1) and cost(n); exponent within [0.5, 1]
    (pure)."""
    scale = max(cost1, 1e-4)
    p = math.log(max(cost_n, 1e-9) / scale) / math.log(n) if n > 1 else 1.0
    return scale, min(1.0, max(0.5, p))


def _timed(fn: Callable[[], Any]) -> float:
    """The median wall time of REPEATS calls."""
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(stream: Optional[Callable[[List[np.ndarray], List[Any]], Any]], decode: Callable[[List[np.ndarray]], Any],
            feed: Callable[[np.ndarray], Any], rate: int, chunk_samples: int,
            decode_apart: bool = False) -> Tuple[Tuple[float, float], Optional[Tuple[float, float]]]:
    """Time the pool's calls (run on its worker) on quiet noise; the worker's (scale, exponent)
    curve, and the decode thread's where `decode_apart` (else None: the decodes are the
    worker's). `stream(chunks, caches)`: one batched streaming call, or None without partials;
    `decode(audios)`: one offline decode; `feed(frame)`: one frame into one session."""
    rng = np.random.default_rng(0)
    audio = (0.05 * rng.standard_normal(int(DECODE_SECONDS * rate))).astype(np.float32)
    chunk = audio[:chunk_samples]

    def chunk_time(n: int) -> float:
        if stream is None:
            return 0.0
        caches: List[Any] = [{} for _ in range(n)]
        call = stream
        for _ in range(WARM_CHUNKS):
            call([chunk] * n, caches)
        return _timed(lambda: call([chunk] * n, caches))

    chunk1, chunk_n = chunk_time(1), chunk_time(CALIBRATE_STREAMS)
    decode([audio])  # first-call allocations
    per_s = _timed(lambda: decode([audio])) / DECODE_SECONDS
    quiet = (0.02 * audio[:rate]).astype(np.float32)
    step = int(FRAME_SECONDS * rate)
    frames = [quiet[off:off + step] for off in range(0, rate, step)]

    def fed_second() -> None:
        for f in frames:
            feed(f)

    vad_s = _timed(fed_second)
    on_worker = 0.0 if decode_apart else per_s
    cost1 = chunk1 / CHUNK_SECONDS + on_worker + vad_s
    cost_n = chunk_n / CHUNK_SECONDS + CALIBRATE_STREAMS * (on_worker + vad_s)
    scale, p = curve(cost1, cost_n)
    decoder = (per_s, 1.0) if decode_apart else None
    logger.info("asr calibration: a streaming chunk %.0f ms (%d at once: %.0f ms), a %g s decode %.0f ms, a fed second "
                "%.0f ms -> one stream %.3f of the worker, %d streams %.3f (load = %.3f x N ^ %.2f)%s",
                1000 * chunk1, CALIBRATE_STREAMS, 1000 * chunk_n, DECODE_SECONDS, 1000 * per_s * DECODE_SECONDS,
                1000 * vad_s, cost1, CALIBRATE_STREAMS, cost_n, scale, p,
                f"; the decode thread {per_s:.3f} per stream" if decode_apart else "")
    return (scale, p), decoder

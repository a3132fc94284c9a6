"""The ASR worker's cost model (daemon/asr/load.py) and admission by predicted cost
(daemon/asr/capacity.py), with a fake clock and fake busy time: no sleeps."""

from __future__ import annotations

import pytest

from daemon.asr.capacity import Backlog, Capacity
from daemon.asr.load import LOAD_WINDOW_SECONDS, MIN_EXPONENT, LoadModel, streams_throughout
from daemon.config import LimitsConfig
from daemon.errors import ErrorCode, S2SError


class Clock:
    def __init__(self) -> None:
        self.t = 100.0
        self.busy = 0.0

    def __call__(self) -> float:
        return self.t


def model(prior: float = 0.03) -> "tuple[LoadModel, Clock]":
    c = Clock()
    return LoadModel(lambda: c.busy, c, lambda: prior), c


def run_window(m: LoadModel, c: Clock, streams: int, load: float, behind: bool = False) -> None:
    c.t += LOAD_WINDOW_SECONDS
    c.busy += load * LOAD_WINDOW_SECONDS
    assert m.tick(lambda t0: streams, behind=behind)


def test_before_any_measurement_the_prior_prices_a_stream():
    m, _ = model(prior=0.05)
    f = m.fit()
    assert (f.fixed, f.per_stream) == (0.0, 0.05)
    assert f.capacity(0.9) == 18
    assert m.predict(10)[0] == pytest.approx(0.5)


def test_a_window_measures_the_worker_and_the_streams():
    m, c = model(prior=0.03)
    run_window(m, c, streams=4, load=0.4)
    assert m.load == pytest.approx(0.4)
    # one N seen: the exponent is unknown; the most concave believed, through the measured point
    f = m.fit()
    assert f.exponent == MIN_EXPONENT == 0.5 and f.load(4) == pytest.approx(0.4)
    # describe: the curve's tangent where measured (0.05 more per stream on 0.2 shared)
    assert f.per_stream == pytest.approx(0.05) and f.fixed == pytest.approx(0.2)
    assert f.capacity(0.9) == 20  # 0.4 x (20 / 4) ** 0.5 = 0.894
    assert not m.tick(lambda t0: 4)  # the next window is not due yet


def test_a_cheap_engine_measured_at_one_count_is_not_charged_the_prior():
    m, c = model(prior=0.05)
    run_window(m, c, streams=10, load=0.2)
    f = m.fit()
    assert f.load(10) == pytest.approx(0.2) and f.capacity(0.9) == 202


def test_shared_overhead_makes_the_curve_concave():
    """Batching: 0.2 at 4 streams, 0.5 at 16 -> load ~ N ** 0.66 (a line through both points,
    0.1 + 0.025 N, would put 32 streams at 0.9; the curve at 0.79)."""
    m, c = model()
    for _ in range(3):
        run_window(m, c, 4, 0.2)
        run_window(m, c, 16, 0.5)
    f = m.fit()
    assert f.exponent == pytest.approx(0.661, abs=1e-3)
    assert f.load(4) == pytest.approx(0.2, abs=1e-6) and f.load(16) == pytest.approx(0.5, abs=1e-6)
    assert m.predict(32)[0] == pytest.approx(0.79, abs=0.005)
    assert f.capacity(0.9) == 38


def test_a_cost_proportional_to_the_streams_is_extrapolated_as_a_line():
    """No sharing (Whisper, or a fake costing per second of audio): 0.4 at 1, 0.8 at 2."""
    m, c = model()
    run_window(m, c, 1, 0.4)
    assert m.capacity(0.9) == 5  # one count: 0.4 x sqrt(N), until the second count is measured
    run_window(m, c, 2, 0.8)
    assert m.fit().exponent == pytest.approx(1.0) and m.capacity(0.9) == 2
    assert m.predict(3)[0] == pytest.approx(1.2, abs=0.01)
    run_window(m, c, 2, 0.95 * 0.99)  # dearer than a line: held at a line (1 at most)
    assert m.fit().exponent == 1.0


def test_light_load_then_a_burst_is_admitted():
    """Issue 23 item 12: a daemon that had served 1 and then 8 tiny-FunASR streams (0.14 and 0.38
    of the worker, BENCHMARKS) admitted 17 of 32 offered at once: the line through its light-load
    points put 18 streams at 94 %. A fresh daemon held all 32 (0.75 of the worker). The curve
    admits the 32 and still stops a burst well before the worker would be full."""
    c = Clock()
    cap = Capacity(lambda: limits(max_asr_load=0.9, asr_stream_cost=0.0225, max_sessions=200), c, lambda: c.busy)
    for n, load in ((1, 0.14), (8, 0.38)):
        live = [Backlog(f"w{n}-{i}", 16000, opened=c.t) for i in range(n)]
        for _ in range(4):
            c.t += LOAD_WINDOW_SECONDS
            c.busy += load * LOAD_WINDOW_SECONDS
            for b in live:
                b.accept(1600, c.t)  # audio arriving, processed at once (no lag)
                b.done(1)
            cap.tick(live)
        c.t += 5.0  # the warm-up streams end; the daemon idles a moment
    burst: list = []
    refused = None
    for i in range(64):
        try:
            cap.admit_open(len(burst), burst, f"b{i}")
        except S2SError as e:
            refused = i
            break
        burst.append(Backlog(f"b{i}", 16000, opened=c.t))
    assert refused is not None and refused >= 32, f"refused the {refused}th stream of a burst the worker can serve"
    assert refused <= 48  # ~0.14 x N ** 0.5 passes 0.9 at 43: a burst still stops
    assert cap.load.predict(32)[0] == pytest.approx(0.77, abs=0.03)  # measured at 32: ~0.75


def test_saturation_is_remembered_as_a_ceiling_not_learned_as_a_cost():
    m, c = model(prior=0.01)  # a prior far too low for this engine: measured once, it is not used
    run_window(m, c, 1, 0.3)
    assert m.capacity(0.9) == 9  # 0.3 x sqrt(N): one count measured, the most concave curve believed
    run_window(m, c, 6, 1.0, behind=True)  # full and streams late: demand unknown, left out of the fit
    assert m.observations == 1 and m.saturated_at == 6
    assert m.capacity(0.9) == 5 and m.predict(6)[0] >= 0.95
    run_window(m, c, 3, 0.9 * 0.99)
    f = m.fit()  # now two N: 0.3 at 1, 0.89 at 3 -> a line, ~0.3 per stream
    assert f.exponent == pytest.approx(0.99, abs=0.01) and m.capacity(0.9) == 3
    run_window(m, c, 6, 0.9)  # six fit after all (quieter machine): the ceiling goes
    assert m.saturated_at is None


def test_the_saturation_ceiling_is_forgotten_when_not_seen_again():
    from daemon.asr.load import SATURATION_MEMORY_SECONDS

    m, c = model()
    run_window(m, c, 10, 1.0, behind=True)
    assert m.saturated_at == 10
    for _ in range(int(SATURATION_MEMORY_SECONDS / LOAD_WINDOW_SECONDS) + 1):
        run_window(m, c, 0, 0.0)  # nobody streaming
    assert m.saturated_at is None


def test_a_saturated_window_with_nobody_behind_is_a_burst_not_a_ceiling():
    """One Whisper stream's long decode fills a window; nobody fell behind: no ceiling."""
    m, c = model()
    run_window(m, c, 1, 1.0, behind=False)
    assert m.saturated_at is None and m.observations == 0


def test_a_lone_stream_is_always_admitted():
    """Nothing live to protect: even a prediction past the limit does not refuse the first."""
    c = Clock()
    cap = Capacity(lambda: limits(max_asr_load=0.9, asr_stream_cost=2.0, max_sessions=100), c, lambda: c.busy)
    cap.admit_open(0, [], "first")
    first = Backlog("first", 16000, opened=c.t)
    with pytest.raises(S2SError):
        cap.admit_open(1, [first], "second")


def test_streams_falling_behind_set_the_ceiling_a_draining_backlog_does_not():
    c = Clock()
    cap = Capacity(lambda: limits(max_asr_load=0.9, asr_stream_cost=0.03, max_sessions=100), c, lambda: c.busy)
    live = [Backlog(f"s{i}", 16000, opened=c.t) for i in range(6)]

    def window(lag_s: float) -> None:
        c.t += LOAD_WINDOW_SECONDS
        c.busy += 1.0 * LOAD_WINDOW_SECONDS
        for b in live:
            b.forget()
            b.accept(1600, c.t - lag_s)  # audio due `lag_s` ago, not processed yet
            if b.first_audio is not None and b.first_audio > c.t - 10:
                b.first_audio = c.t - 10
            b.last_audio = c.t
        cap.tick(live)

    window(2.0)  # the lag grew from 0 to 2 s with six streams at full load: a ceiling
    assert cap.load.saturated_at == 6
    cap.load.saturated_at = None
    window(1.0)  # full load, lag shrinking (2 -> 1 s): the backlog draining, no ceiling
    assert cap.load.saturated_at is None and cap.load.observations == 0


def test_a_backlog_being_caught_up_teaches_nothing():
    """Streams ending while the worker still works off their backlog: high load, few streams."""
    c = Clock()
    cap = Capacity(lambda: limits(max_asr_load=0.9, asr_stream_cost=0.03, max_sessions=100), c, lambda: c.busy)
    b = Backlog("late", 16000, opened=c.t - 10)
    b.accept(16000 * 3, c.t - 5)  # 3 s accepted 5 s ago, still unprocessed: 5 s behind
    b.first_audio = c.t - 10
    b.last_audio = c.t
    c.t += LOAD_WINDOW_SECONDS
    c.busy += 0.95 * LOAD_WINDOW_SECONDS
    cap.tick([b])
    assert cap.load.observations == 0 and cap.load.saturated_at is None


def test_a_window_with_other_work_is_not_an_observation():
    m, c = model()
    c.t += LOAD_WINDOW_SECONDS
    c.busy += 0.9 * LOAD_WINDOW_SECONDS
    assert m.tick(lambda t0: 1, clean=False)
    assert m.load == pytest.approx(0.9) and m.observations == 0


def test_streams_throughout_counts_only_streams_sending_all_window():
    assert streams_throughout([0.0, 5.0, None, 0.0], [9.5, 9.9, None, 7.0], t0=2.0, now=10.0) == 1


def limits(**kw) -> LimitsConfig:
    return LimitsConfig(**kw)


def test_a_burst_of_opens_stops_where_the_predicted_load_would_pass_the_limit():
    """All at one instant, nothing measured: each admitted open is charged the prior."""
    c = Clock()
    cap = Capacity(lambda: limits(max_asr_load=0.9, asr_stream_cost=0.1, max_sessions=100), c, lambda: c.busy)
    backlogs = []
    refused = None
    for i in range(20):
        try:
            cap.admit_open(len(backlogs), backlogs, f"s{i}")
        except S2SError as e:
            refused = (i, e)
            break
        backlogs.append(Backlog(f"s{i}", 16000, opened=c.t))
    assert refused is not None and refused[0] == 9, refused  # 9 x 0.1 = 0.9 fits, the 10th does not
    assert refused[1].code == ErrorCode.BUSY and refused[1].extra["retry_after"] >= 1 and "predicted" in str(refused[1])
    assert cap.busy_open_load == 1


def test_measured_streams_set_the_price_and_silent_sessions_do_not_count():
    c = Clock()
    cap = Capacity(lambda: limits(max_asr_load=0.9, asr_stream_cost=0.05, max_sessions=100), c, lambda: c.busy)
    live = [Backlog(f"s{i}", 16000, opened=c.t) for i in range(10)]
    idle = [Backlog(f"i{i}", 16000, opened=c.t - 60) for i in range(5)]  # open, never sent audio
    for _ in range(3):
        c.t += LOAD_WINDOW_SECONDS
        c.busy += 0.3 * LOAD_WINDOW_SECONDS
        for b in live:
            b.accept(1600, c.t)  # audio arriving, processed at once (no lag)
            b.done(1)
        cap.tick(live + idle)
    assert cap.load.fit().load(10) == pytest.approx(0.3)
    assert len(cap.streaming(live + idle)) == 10
    cap.admit_open(15, live + idle, "fits")  # 0.3 x sqrt(11 / 10): far below 0.9


def test_a_file_sent_faster_than_real_time_is_not_a_stream_and_does_not_teach_the_cost():
    c = Clock()
    cap = Capacity(lambda: limits(max_asr_load=0.9, asr_stream_cost=0.03, max_sessions=100), c, lambda: c.busy)
    file = Backlog("file", 16000, opened=c.t)
    for _ in range(3):
        file.accept(16000 * 20, c.t)  # 20 s of audio at once: far ahead of real time
        file.done(1)
        c.t += LOAD_WINDOW_SECONDS
        c.busy += 0.95 * LOAD_WINDOW_SECONDS
        cap.tick([file])
    assert cap.streaming([file]) == []
    assert cap.load.observations == 0
    cap.admit_open(1, [file], "a real-time stream")  # the transcription job does not block it


def test_zero_turns_the_prediction_off():
    c = Clock()
    cap = Capacity(lambda: limits(max_asr_load=0.0, asr_stream_cost=1.0, max_sessions=100), c, lambda: c.busy)
    backlogs = [Backlog(f"s{i}", 16000, opened=c.t) for i in range(10)]
    cap.admit_open(10, backlogs, "any")


def test_the_limit_is_validated():
    from daemon.config import ConfigError, parse_config

    with pytest.raises(ConfigError):
        parse_config({"limits": {"max_asr_load": 1.5}})
    assert parse_config({"limits": {"max_asr_load": 0}}).limits.max_asr_load == 0


# --- a full-size pool's cost curve, measured at load (daemon/asr/calibrate.py) ---------------------

def curved(curve: "tuple[float, float] | None", prior: float = 0.0225) -> "tuple[LoadModel, Clock]":
    c = Clock()
    return LoadModel(lambda: c.busy, c, lambda: prior, lambda: curve), c


def test_a_fresh_daemon_admits_what_the_calibrated_curve_holds_not_the_tiny_prior():
    # The case: Paraformer-large, the tiny-model prior (0.0225 a stream) let a fresh
    # daemon admit 40 streams where 2 fell behind. The pool's own measurement at load (one
    # stream 0.3 of the worker, 4 streams 0.75: exponent 0.66) admits 4 under 0.9.
    m, _ = curved((0.3, 0.66))
    assert m.fit().capacity(0.9) == 5 and m.predict(4)[0] == pytest.approx(0.3 * 4 ** 0.66)
    assert m.predict(6)[0] > 0.9
    # Without a curve (small models) the prior prices a stream, exactly as before.
    plain, _ = curved(None)
    assert plain.fit().capacity(0.9) == 40


def test_the_curve_never_prices_a_stream_below_the_prior():
    m, _ = curved((0.001, 0.5), prior=0.05)
    assert (m.fit().scale, m.fit().exponent) == (0.05, 1.0)


def test_after_one_measured_count_the_calibrated_exponent_extrapolates_not_the_most_concave():
    # One full-size stream measured at 0.3 of the worker: with the tiny models' 0.5 the fit
    # predicted 8 streams under 0.9 (0.3 x 9 ** 0.5 = 0.9); with the calibrated 0.9, 3.
    m, c = curved((0.25, 0.9))
    run_window(m, c, streams=1, load=0.3)
    f = m.fit()
    assert f.exponent == pytest.approx(0.9) and f.load(1) == pytest.approx(0.3)
    assert f.capacity(0.9) == 3
    tiny, c2 = curved(None)
    run_window(tiny, c2, streams=1, load=0.3)
    assert tiny.fit().exponent == MIN_EXPONENT and tiny.fit().capacity(0.9) == 9


def test_measured_counts_overrule_the_calibrated_exponent():
    m, c = curved((0.25, 0.9))
    for _ in range(3):
        run_window(m, c, streams=1, load=0.2)
        run_window(m, c, streams=4, load=0.4)
    assert m.fit().exponent == pytest.approx(0.5, abs=1e-6)


def test_calibration_curve_through_two_counts():
    from daemon.asr.calibrate import curve

    scale, p = curve(0.3, 0.3 * 4 ** 0.7, 4)
    assert scale == pytest.approx(0.3) and p == pytest.approx(0.7)
    assert curve(0.3, 0.3, 4)[1] == 0.5   # a flat measurement is held at the most concave believed
    assert curve(0.3, 3.0, 4)[1] == 1.0   # and a superlinear one at a straight line


def per_utterance_clients(cap: Capacity, c: Clock, clients: int, seconds: float, final_cost: float,
                          utterance: float = 3.5, vad_cost: float = 0.01) -> "tuple[int, float]":
    """Wyoming's pattern (issue 26), simulated in 50 ms steps: each client sends one utterance
    per session (open, `utterance` seconds of audio in real time in 200 ms messages, finalize),
    and opens the next session when the last one's final is out; a client refused `busy` asks
    again after the retry hint. A fake FIFO worker: each message costs `vad_cost`, a finalize
    `final_cost` (the burst of a Whisper final), the session closes when its final is decoded;
    the health loop ticks admission every second. (busy refusals, worst lag seen)."""
    from collections import deque

    sessions: dict = {}
    work: deque = deque()          # [session id, cost left, what]
    clients_at = [{"sid": None, "next": c.t + 0.3 * k, "sent": 0, "step": 0} for k in range(clients)]
    refused, worst, n = 0, 0.0, 0
    for step in range(int(seconds / 0.05)):
        c.t += 0.05
        for k, cl in enumerate(clients_at):
            if cl["sid"] is None:
                if c.t < cl["next"]:
                    continue
                try:
                    cap.admit_open(len(sessions), list(sessions.values()), f"c{k}")
                except S2SError as e:
                    refused += 1
                    cl["next"] = c.t + e.extra["retry_after"]
                    continue
                n += 1
                cl.update(sid=f"c{k}-{n}", sent=0, step=step)
                sessions[cl["sid"]] = Backlog(cl["sid"], 16000, opened=c.t)
            elif (step - cl["step"]) % 4 == 0 and cl["sent"] >= 0:
                if cl["sent"] < utterance / 0.2:
                    cap.admit_audio(sessions[cl["sid"]], 6400, 0)
                    work.append([cl["sid"], vad_cost, "audio"])
                    cl["sent"] += 1
                else:
                    work.append([cl["sid"], final_cost, k])
                    cl["sent"] = -1  # finalized: waiting for its final
        room = 0.05
        while work and room > 0:
            take = min(work[0][1], room)
            room, work[0][1], c.busy = room - take, work[0][1] - take, c.busy + take
            if work[0][1] > 1e-12:
                break
            sid, _, what = work.popleft()
            if what == "audio":
                sessions[sid].done(1)
            else:
                del sessions[sid]
                clients_at[what].update(sid=None, next=c.t)
        worst = max(worst, cap.lag(sessions.values(), c.t)[0])
        if step % 20 == 0:
            cap.tick(list(sessions.values()))
    return refused, worst


def test_finals_of_per_utterance_sessions_are_a_burst_not_a_ceiling():
    """Issue 26: eight Wyoming clients, each utterance its own session. When finals land
    together the worker is saturated for a moment and the next utterances' audio waits behind
    them (the lag grows) while only one or two sessions have streamed through the whole window:
    admission learned "saturated at 1-2 streams" (and a per-stream cost from the same windows)
    and then admitted one or two at a time; the kept bench log had ~100 such refusals and an
    8-client p95 of 14-18 s. A window in which sessions came or went (an ended one's final, a
    new one's first audio) is a burst: no ceiling, no observation. The worker keeps up here
    (worst lag under limits.max_asr_lag), so nobody should be refused."""
    c = Clock()
    cap = Capacity(lambda: limits(max_asr_load=0.9, asr_stream_cost=0.0225, max_sessions=32), c, lambda: c.busy)
    refused, worst = per_utterance_clients(cap, c, clients=8, seconds=60.0, final_cost=0.3)
    assert worst < limits().max_asr_lag
    assert refused == 0 and cap.load.saturated_at is None


def test_per_utterance_sessions_past_capacity_are_still_refused():
    """The same pattern with twice the clients: the worker cannot keep up, and the lag rule
    says `busy` (the sessions' audio would otherwise queue ever later)."""
    c = Clock()
    cap = Capacity(lambda: limits(max_asr_load=0.9, asr_stream_cost=0.0225, max_sessions=32), c, lambda: c.busy)
    refused, worst = per_utterance_clients(cap, c, clients=16, seconds=60.0, final_cost=0.3)
    assert refused > 0 and cap.busy_open_lag > 0
    assert worst < limits().max_session_lag  # refused in time: nobody's audio is shed


# --- a pool that decodes on a thread of its own: two load figures (issue 30) ----------------------

def _two_threads(worker: float, decode: float, streams: int = 3) -> "tuple[Capacity, Clock, list]":
    """Admission after windows of `streams` real-time streams that kept the worker thread
    `worker` busy and the decode thread `decode` busy (the figures of 4 full-size streams:
    0.58 and 0.47 of each thread, on two cores)."""
    c = Clock()
    dec = {"busy": 0.0}
    cap = Capacity(lambda: limits(max_asr_load=0.9, asr_stream_cost=0.0225, max_sessions=100), c, lambda: c.busy,
                   lambda: None, lambda: dec["busy"])
    live = [Backlog(f"s{i}", 16000, opened=c.t) for i in range(streams)]
    for _ in range(6):
        c.t += LOAD_WINDOW_SECONDS
        c.busy += worker * LOAD_WINDOW_SECONDS
        dec["busy"] += decode * LOAD_WINDOW_SECONDS
        for b in live:
            b.accept(1600, c.t)
            b.done(1)
        cap.tick(live)
    return cap, c, live


def test_the_worker_and_the_decode_thread_are_measured_apart():
    """3 streams kept the worker 0.5 and the decode thread 0.3 busy: together 0.8 of 'one core',
    which one figure extrapolated past 0.9 for a 4th stream; each thread has room for it."""
    cap, _, live = _two_threads(worker=0.5, decode=0.3)
    assert cap.load.load == pytest.approx(0.5) and cap.decode.load == pytest.approx(0.3)
    cap.admit_open(len(live), live, "fourth")
    assert cap.busy_open_load == 0 and cap.stream_capacity(0.9) >= 4


def test_a_busy_decode_thread_refuses_a_stream_the_worker_could_take():
    """Finals queue on the decode thread long before it is full: 5 streams kept it 0.54 busy
    at final p95 1.46 s. With 3 streams at 0.4 of it, a 4th is predicted at 0.53: refused, and
    the message says which thread."""
    cap, _, live = _two_threads(worker=0.30, decode=0.4)
    with pytest.raises(S2SError) as e:
        cap.admit_open(len(live), live, "fourth")
    assert e.value.code == ErrorCode.BUSY and "decode thread" in str(e.value)
    assert cap.stream_capacity(0.9) == 3


def test_calibration_gives_the_decode_thread_its_own_curve():
    import time

    from daemon.asr.calibrate import measure

    def decode(audios: list) -> None:
        time.sleep(0.03)  # FAKE: a decode of 30 ms per 3 s of audio; the streaming calls cost ~nothing

    worker, decoder = measure(lambda chunks, caches: None, decode, lambda frame: None, 16000, 9600, decode_apart=True)
    together, none = measure(lambda chunks, caches: None, decode, lambda frame: None, 16000, 9600)
    assert none is None and decoder is not None
    assert 0.0099 < decoder[0] < 0.03 and decoder[1] == 1.0  # a sleep is never shorter; a loaded machine longer
    assert worker[0] < 0.005 < together[0]  # the worker's curve no longer carries the decodes


def test_the_decode_threads_cost_is_a_straight_line():
    """After 1 and 2 full-size streams (0.158 and 0.244 of the decode thread) a concave fit put 4
    streams at 0.38 and admitted them; they measured 0.49 and held p95 1.45 s. Decodes are one
    per utterance: the line through what was measured refuses the 4th."""
    c = Clock()
    dec = {"busy": 0.0}
    cap = Capacity(lambda: limits(max_asr_load=0.9, asr_stream_cost=0.0225, max_sessions=100), c, lambda: c.busy,
                   lambda: None, lambda: dec["busy"])
    for n, decode in ((1, 0.158), (2, 0.244)):
        live = [Backlog(f"w{n}-{i}", 16000, opened=c.t) for i in range(n)]
        for _ in range(6):
            c.t += LOAD_WINDOW_SECONDS
            c.busy += 0.2 * n * LOAD_WINDOW_SECONDS
            dec["busy"] += decode * LOAD_WINDOW_SECONDS
            for b in live:
                b.accept(1600, c.t)
                b.done(1)
            cap.tick(live)
    assert cap.decode.fit().exponent == 1.0 and cap.decode.predict(4)[0] > 0.5
    assert cap.stream_capacity(0.9) == 3


def _bursty_decode_thread(streams: int, windows: int, worker: float, decode_load, parked=lambda k: False) -> Capacity:
    """`streams` real-time streams for `windows` windows: the worker `worker` busy, the decode
    thread `decode_load(k)` busy in window k, the sessions' audio waiting through window k where
    `parked(k)` (a decode holds their feeds: they lag), done in the next."""
    c = Clock()
    dec = {"busy": 0.0}
    cap = Capacity(lambda: limits(max_asr_load=0.9, asr_stream_cost=0.0225, max_sessions=100), c, lambda: c.busy,
                   lambda: None, lambda: dec["busy"])
    live = [Backlog(f"b{i}", 16000, opened=c.t) for i in range(streams)]
    for k in range(windows):
        c.t += LOAD_WINDOW_SECONDS
        c.busy += worker * LOAD_WINDOW_SECONDS
        dec["busy"] += decode_load(k) * LOAD_WINDOW_SECONDS
        for b in live:
            b.accept(1600, c.t - (0.8 if parked(k) else 0.0))  # parked: 0.8 s behind at the tick
            if not parked(k):
                b.done(2)
        cap.tick(live)
    return cap


def test_a_bursty_decode_thread_is_priced_by_its_mean_load():
    """The decode thread is busy in bursts (a decode at each utterance end): at 2 streams most
    2 s windows read near 0 and some near 1. The mean of their logarithms priced a stream at a
    third of what it cost; the line is the mean load per stream."""
    cap = _bursty_decode_thread(2, 12, 0.4, lambda k: 0.9 if k % 4 == 3 else 0.02)  # mean ~0.24
    assert cap.decode.observations >= 8
    # ~0.48 (the recent windows weigh more: 0.6 here); the logarithms' mean gave ~0.1
    assert 0.35 < cap.decode.predict(4)[0] < 0.7
    assert cap.stream_capacity(0.9) <= 3


def test_a_decode_threads_full_windows_count_in_its_mean():
    """Four full-size streams with the chunks gathered at a tick: the decode thread read 0.9-1.0
    in the windows with decodes and little between them. Windows that full were left out of the
    line as a ceiling, so it priced a stream at a tenth of its cost and admitted 6 of 6 (final
    p95 1.35-2.19 s). A straight line is a mean: its full windows count."""
    cap = _bursty_decode_thread(4, 16, 0.5, lambda k: 1.0 if k % 3 == 2 else 0.2)  # mean ~0.47
    assert 0.09 < cap.decode.fit().scale < 0.15  # per stream: the mean load over 4
    assert cap.decode.predict(5)[0] > 0.5 and cap.stream_capacity(0.9) == 4


def test_a_decode_threads_windows_count_while_its_decodes_hold_the_sessions_back():
    """A decode parks its session's feed, so in the windows the decode thread is busy the
    sessions lag. Those windows taught the line nothing (a lagging window is a backlog for the
    worker), so after a warm-up it again priced a stream low and admitted 6 of 6 (p95 2.04 s).
    The lag a decode makes is the decode thread's own work: its windows count."""
    cap = _bursty_decode_thread(4, 16, 0.5, lambda k: 1.0 if k % 3 == 2 else 0.2, parked=lambda k: k % 3 == 2)
    assert 0.09 < cap.decode.fit().scale < 0.15
    assert cap.stream_capacity(0.9) == 4

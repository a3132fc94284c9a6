"""s2s-bench capacity: the recordings and the statistics (pure), and one short real sweep against
a daemon on the tiny FunASR models started by the benchmark's own stack code."""

from __future__ import annotations

import argparse
import json

import pytest

from daemon.wire import protocol as P
from daemon.tools.bench import capacity as cap
from daemon.tools.bench.cli import main, parse_args
from daemon.tools.bench.common import RATE, load_manifest


@pytest.fixture(scope="module")
def utts(fixtures_dir):
    return load_manifest(fixtures_dir / "manifest.jsonl")


# --- pure parts -------------------------------------------------------------------------------


def test_recordings_lengths_and_determinism(utts):
    recs = cap.build_recordings(utts)
    assert len(recs) == cap.RECORDINGS == 5
    assert recs[0].id == "zh_long"
    for r in recs:
        assert cap.RECORDING_MIN_S <= r.seconds <= cap.RECORDING_MAX_S, (r.id, r.seconds)
        assert len(r.pcm) % 2 == 0
    made = recs[1:]
    assert all(len(r.parts) >= 3 and all(p.startswith("zh_0") for p in r.parts) for r in made)
    assert len({r.parts for r in made}) == len(made)  # four different recordings
    again = cap.build_recordings(utts)
    assert [(r.id, r.pcm) for r in again] == [(r.id, r.pcm) for r in recs]
    # The joins are the utterances plus 0.8-1.0 s of quiet between them.
    by_id = {u.id: u for u in utts}
    for r in made:
        speech = sum(by_id[p].seconds for p in r.parts)
        gaps = r.seconds - speech
        assert 0.8 * (len(r.parts) - 1) - 1e-3 <= gaps <= 1.0 * (len(r.parts) - 1) + 1e-3
    cut = cap.cap_recordings(recs, 4.0)
    assert [len(r.pcm) for r in cut] == [4 * RATE * 2] * 5 and cut[0].pcm == recs[0].pcm[:4 * RATE * 2]
    assert cap.cap_recordings(recs, 30.0) == recs
    with pytest.raises(SystemExit):
        cap.build_recordings([u for u in utts if u.lang == "en"])


def test_streams_option_and_session_slots():
    assert cap.parse_streams(cap.DEFAULT_STREAMS) == [1, 4, 8, 12, 16, 24, 32]
    assert cap.parse_streams("8, 2,2") == [2, 8]
    for bad in ("", "0,4", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            cap.parse_streams(bad)
    args = parse_args(["capacity", "--streams", "4,40"])
    assert args.streams == [4, 40] and cap.stack_sessions(args.streams) >= 40
    assert parse_args(["capacity"]).streams == [1, 4, 8, 12, 16, 24, 32]
    assert cap.FRAME_BYTES == 1920


def test_read_events():
    rec = cap.StreamRecord(0, "r")
    ev = [(10.0, P.SpeechStart(session_id="s", utterance=0)),
          (10.6, P.Partial(session_id="s", text="a", utterance=0)),
          (11.2, P.Partial(session_id="s", text="ab", utterance=0)),
          (12.0, P.Partial(session_id="s", text="abc", utterance=0)),
          (12.5, P.Final(session_id="s", text="abc", utterance=0, reason="vad")),
          (13.0, P.Partial(session_id="s", text="d", utterance=1)),  # a new utterance: no gap across
          (13.6, P.Partial(session_id="s", text="de", utterance=1)),
          (14.0, P.Error(code="busy", session_id="s")),
          (15.3, P.Final(session_id="s", text="def", utterance=1, reason="finalize", request_id="fin")),
          (15.3, P.Closed(session_id="s", request_id="fin", reason="finalized"))]
    cap.read_events(rec, ev, t_end=15.0, finalize_id="fin")
    assert rec.partials == 5 and rec.finals == 2 and rec.drained
    assert rec.partial_gaps_s == pytest.approx([0.6, 0.8, 0.6])
    assert rec.final_latency_s == pytest.approx(0.3)
    assert rec.errors == {"busy": 1}
    lost = cap.StreamRecord(1, "r")
    cap.read_events(lost, ev[:5], t_end=15.0, finalize_id="fin")
    assert lost.final_latency_s is None and not lost.drained


def _rec(i, latency, gaps=(0.6,), admitted=True, busy=False, audio=10.0, errors=None):
    return cap.StreamRecord(i, "r", admitted=admitted, refused_busy=busy, audio_s=audio if admitted else 0.0,
                            final_latency_s=latency, partial_gaps_s=list(gaps), drained=latency is not None,
                            errors=dict(errors or {}), finals=1 if latency is not None else 0)


def test_summarize_and_holds():
    good = [_rec(i, 0.1 * (i + 1), gaps=(0.6, 0.6, 0.7)) for i in range(4)]
    s = cap.summarize(4, good, daemon_cpu_s=8.0, client_cpu_s=0.4, wall_s=20.0, max_lag_s=0.3)
    assert (s["streams"], s["admitted"], s["refused_busy"], s["audio_s"]) == (4, 4, 0, 40.0)
    assert s["final_latency_s"]["p50"] == pytest.approx(0.25) and s["final_latency_s"]["max"] == pytest.approx(0.4)
    assert s["final_latency_s"]["p95"] == pytest.approx(0.385)
    assert s["partial_cadence_s"]["p50"] == pytest.approx(0.6) and s["partial_cadence_s"]["n"] == 12
    assert s["cpu_s_per_audio_s"] == pytest.approx(0.2)
    assert s["daemon_cpu_percent"] == pytest.approx(40.0) and s["client_cpu_percent"] == pytest.approx(2.0)
    assert s["holds"] and s["undrained"] == 0 and s["errors"] == {}
    # One refused (busy): the admitted three are measured, the point does not hold.
    part = good[:3] + [_rec(3, None, gaps=(), admitted=False, busy=True)]
    r = cap.summarize(4, part, 6.0, None, 20.0)
    assert (r["admitted"], r["refused_busy"], r["audio_s"], r["holds"]) == (3, 1, 30.0, False)
    assert r["cpu_s_per_audio_s"] == pytest.approx(0.2) and r["client_cpu_percent"] is None
    # Slow finals: p95 over CAPACITY_P95_S; errors summed by code; a stream without an answer.
    slow = [_rec(0, 0.5, errors={"busy": 2}), _rec(1, 3.0, errors={"busy": 1}), _rec(2, None)]
    t = cap.summarize(3, slow, None, None, 20.0)
    assert t["final_latency_s"]["p95"] > cap.CAPACITY_P95_S and not t["holds"]
    assert t["errors"] == {"busy": 3} and t["undrained"] == 1 and t["cpu_s_per_audio_s"] is None
    empty = cap.summarize(2, [_rec(0, None, admitted=False, busy=True)] * 2, 1.0, 0.1, 5.0)
    assert empty["final_latency_s"]["p50"] is None and not empty["holds"]
    assert cap.largest_holding([s, r, t]) == 4
    assert cap.largest_holding([dict(s, streams=1), dict(s, streams=8), r]) == 8
    assert cap.largest_holding([r, t]) is None
    out = cap.print_capacity({"frame_ms": 60, "p95_limit_s": 1.0, "recordings": [{"id": "a", "seconds": 14.45}],
                              "points": [s, dict(t, load_avg=[1.52, 2.04])], "holds_up_to": 4})
    assert "holds up to N = 4" in out and "busy 3, no final answer 1" in out
    assert "load avg" in out and "1.5-2.0" in out  # the machine's load beside each point


# --- a real short sweep -----------------------------------------------------------------------


def test_capacity_real_run(models_dir, tmp_path):
    """Two points (1 and 2 streams) of 4 s recordings against the tiny FunASR daemon."""
    rc = main(["capacity", "--engines", "tiny", "--models", str(models_dir), "--streams", "1,2", "--seconds", "4",
               "--drain-timeout", "30", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "capacity.json").read_text(encoding="utf-8"))
    assert data["mode"] == "capacity" and data["stack"]["asr"]["engine"] == "funasr"
    r = data["result"]
    assert [x["seconds"] for x in r["recordings"]] == [4.0] * 5
    assert [p["streams"] for p in r["points"]] == [1, 2]
    for p in r["points"]:
        n = p["streams"]
        assert p["admitted"] == n and p["refused_busy"] == 0 and p["undrained"] == 0
        assert p["audio_s"] == pytest.approx(4.0 * n, abs=0.07)
        assert p["finals"] >= n  # at least the one answering each finalize
        assert 0.0 <= p["final_latency_s"]["p50"] <= p["final_latency_s"]["p95"] < 10.0
        assert p["partials"] > 0 and 0.1 < p["partial_cadence_s"]["p50"] < 5.0
        assert p["cpu_s_per_audio_s"] > 0 and p["daemon_cpu_percent"] > 0
        assert p["client_cpu_percent"] is not None and p["sessions_before"] == 0
        assert set(p) >= {"final_latency_s", "partial_cadence_s", "errors", "holds", "daemon_max_lag_s"}
        assert set(p["admission"]) >= {"worker_load_max", "worker_load_mean", "decode_load_max", "asr_stream_cost", "asr_fixed_load"}
        assert 0.0 < p["admission"]["worker_load_max"] <= 1.0
    assert r["holds_up_to"] in (None, 1, 2)

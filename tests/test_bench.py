"""s2s-bench: quick smoke runs of every mode against one real daemon + bridge (bundled Whisper
base + fsmn-vad and Piper, echo agent), started once by the benchmark's own stack code, with
tiny sizes. Each run's JSON is checked for its fields and for values that make sense.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from daemon.tools import bench


@pytest.fixture(scope="module")
def stack(models_dir, tmp_path_factory):
    args = bench.parse_args(["e2e", "--engines", "bundled", "--models", str(models_dir)])
    with bench.open_stack(args, need_bridge=True, sessions=4) as st:
        yield st


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory, fixtures_dir):
    """zh/08 (Whisper base gets it right) and en/01, with absolute paths."""
    rows = [json.loads(l) for l in (fixtures_dir / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if l]
    keep = [dict(r, path=str(fixtures_dir / r["path"])) for r in rows if r["id"] in ("zh_08", "en_01")]
    p = tmp_path_factory.mktemp("manifest") / "manifest.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
    return p


def attach(st: bench.Stack, mode: str, out: Path, *extra: str) -> list:
    return [mode, "--asr", st.asr, "--tts", st.tts, "--bridge", st.bridge, "--config", str(st.tmp / "s2s.yaml"),
            "--out", str(out), *extra]


def load(out: Path, mode: str) -> dict:
    data = json.loads((out / f"{mode}.json").read_text(encoding="utf-8"))
    assert data["mode"] == mode and data["machine"]["cpus"] == os.cpu_count()
    assert data["stack"]["asr"]["engine"] == "whisper" and data["stack"]["tts"]["engine"] == "piper"
    return data["result"]


# --- pure parts -------------------------------------------------------------------------------


def test_stats_and_judge():
    s = bench.stats_ms([0.001, 0.002, 0.003, 0.004])
    assert s["n"] == 4 and s["p50"] == pytest.approx(2.5) and s["max"] == pytest.approx(4.0)
    assert bench.stats_ms([])["p50"] is None
    good = bench.judge({"paths": {"daemon": {"cer_zh": 0.02}}}, {"per_sentence": {"p95": 300.0}},
                       {"speech_end_to_first_audio": {"p95": 1500.0}, "missing": 0}, {"available": False, "why": "no GPU"})
    assert [r["result"] for r in good] == ["PASS", "PASS", "PASS", "n/a"]
    assert good[3]["value"] == "n/a (no GPU)"
    bad = bench.judge({"paths": {"daemon": {"cer_zh": 0.30}}}, {"per_sentence": {"p95": 900.0}},
                      {"speech_end_to_first_audio": {"p95": 1500.0}, "missing": 1},
                      {"available": True, "daemon_nvidia_smi_mib": 5000})
    assert [r["result"] for r in bad] == ["FAIL", "FAIL", "FAIL", "FAIL"]


def test_bridge_log_counters_and_proc():
    log = ("x conn c1: released ({'audio_bytes_in': 640, 'audio_dropped': 2})\n"
           "y conn c2: released ({'audio_dropped': 3, 'finals': 1})\n")
    assert bench.bridge_released_stats(log) == {"audio_bytes_in": 640, "audio_dropped": 5, "finals": 1}
    a = bench.proc_sample(os.getpid())
    sum(range(200000))
    b = bench.proc_sample(os.getpid())
    assert a["rss"] > 10 * 2 ** 20 and b["cpu_s"] >= a["cpu_s"]
    assert bench.proc_sample(2 ** 22 + 12345) is None


def test_engine_configs_validate(tmp_path, models_dir):
    from daemon.config import parse_config

    for engines, asr, tts in (("bundled", "whisper", "piper"), ("tiny", "funasr", "melo"), ("full", "funasr", "melo")):
        data = bench.engine_config(engines, models_dir, tmp_path / "run", sessions=40)
        cfg = parse_config(data, "test", env={})
        assert (cfg.asr.engine, cfg.tts.engine) == (asr, tts)
        assert cfg.limits.max_sessions >= 44 and cfg.bridge.max_connections >= 44 and cfg.bridge.port == 0
        assert cfg.agent.kind == "echo"
    for tts in ("kokoro", "kokoro+piper"):  # s2s-bench tts --engines bundled --tts-engine ... --tts-threads 1
        cfg = parse_config(bench.engine_config("bundled", models_dir, tmp_path / "run", tts_engine=tts, tts_threads=1),
                           "test", env={})
        assert (cfg.tts.engine, cfg.tts.kokoro.model, cfg.tts.kokoro.threads) == (tts, "kokoro", 1)
    # s2s-bench asr --whisper-beam 1: the trade-off against the default beam
    cfg = parse_config(bench.engine_config("bundled", models_dir, tmp_path / "run", whisper_beam=1), "test", env={})
    assert cfg.asr.whisper.beam_size == 1
    default = parse_config(bench.engine_config("bundled", models_dir, tmp_path / "run"), "test", env={})
    assert default.asr.whisper.beam_size == 5


def test_full_size_dims():
    """The full-size synth configs carry Paraformer-large / MeloTTS-Chinese / mBERT dims
    (parameter counts are checked by `s2s-models synth --size full --plan`, not here: ~25 s)."""
    from daemon.models import tiny_full, tiny_funasr

    d = tiny_full.paraformer_dims()
    enc = tiny_funasr.config_bicif(d)["encoder_conf"]
    dec = tiny_funasr.config_bicif(d)["decoder_conf"]
    assert (enc["output_size"], enc["attention_heads"], enc["linear_units"], enc["num_blocks"], enc["kernel_size"]) == \
        (512, 4, 2048, 50, 11)
    assert dec["num_blocks"] == 16
    vocab = tiny_full.paraformer_vocab()
    assert len(vocab) == 8404 and len(set(vocab)) == 8404 and vocab[:3] == ["<blank>", "<s>", "</s>"]
    assert vocab[-1] == "<unk>"
    assert tiny_full.bert_config()["vocab_size"] == 105879 and len(tiny_full.bert_vocab()) == 105879
    bert = tiny_full.bert_config()
    assert (bert["num_hidden_layers"], bert["hidden_size"]) == (12, 768)


# --- modes ------------------------------------------------------------------------------------


def test_ipc(stack, tmp_path, small_manifest):
    assert bench.main(attach(stack, "ipc", tmp_path, "--chunks", "20", "--requests", "2",
                             "--manifest", str(small_manifest))) == 0
    r = load(tmp_path, "ipc")
    assert r["in_process_compared"] is True
    q = r["asr_quiet"]
    assert q["daemon_round_trip"]["n"] == 20 and q["in_process_feed"]["n"] == 20 and q["overhead"]["n"] == 20
    assert 0 < r["ping"]["p50"] < 200
    assert q["daemon_round_trip"]["p50"] > 0 and -100 < q["overhead"]["p50"] < 200
    assert r["tts"]["daemon_round_trip"]["n"] == 2 and r["tts"]["in_process"]["n"] == 2


def test_asr(stack, tmp_path, small_manifest):
    assert bench.main(attach(stack, "asr", tmp_path, "--repeat", "1", "--manifest", str(small_manifest))) == 0
    r = load(tmp_path, "asr")
    assert r["engine"] == "whisper" and r["files"] == 2 and set(r["paths"]) == {"daemon", "engine", "library"}
    for p in r["paths"].values():
        assert 0 < p["rtf"] < 10 and set(p["hyps"]) == {"zh_08", "en_01"}
    # Whisper base transcribes zh/08 right (after the documented normalisation), on all paths.
    assert r["paths"]["daemon"]["cer_zh"] < 0.2 and r["paths"]["library"]["cer_zh"] < 0.2
    assert 0.2 < r["ratio_daemon_engine"] < 5 and 0.2 < r["ratio_daemon_library"] < 5


def test_tts(stack, tmp_path):
    assert bench.main(attach(stack, "tts", tmp_path, "--replies", "2", "--repeat", "1")) == 0
    r = load(tmp_path, "tts")
    assert r["language"] == "en" and r["replies"] == 2 and r["sentences"] >= 5
    assert r["per_sentence"]["n"] == r["sentences"]
    assert 0 < r["first_audio"]["p50"] <= r["whole_reply"]["p50"]
    assert 0 < r["first_over_whole_p50"] < 1 and r["rtf_p50"] > 0


def test_e2e(stack, tmp_path):
    assert bench.main(attach(stack, "e2e", tmp_path, "--utterances", "1", "--tail", "8")) == 0
    r = load(tmp_path, "e2e")
    assert r["missing"] == 0 and r["speech_end_to_first_audio"]["n"] == 1
    total = r["speech_end_to_first_audio"]["p50"]
    assert total == pytest.approx(r["speech_end_to_final"]["p50"] + r["final_to_first_audio"]["p50"], abs=1.0)
    assert 0 < r["final_to_first_audio"]["p50"] < total
    assert r["samples"][0]["final"]


def test_load(stack, tmp_path, small_manifest):
    args = bench.parse_args(["load", "--sessions", "2", "--seconds", "3", "--manifest", str(small_manifest)])
    r = bench.run_load(stack, args)
    assert "Load: 2 real-time sessions" in bench.print_load(r)
    assert r["sessions_ok"] == 2 and r["frames_sent"] == 2 * 75
    assert r["dropped_frames"] == 0 and r["undrained_sessions"] == 0
    procs = r["processes"]
    assert set(procs) == {"daemon", "bridge", "bench client"}
    assert procs["daemon"]["rss_mib"] > 100 and procs["bridge"]["rss_mib"] > 10
    assert procs["daemon"]["cpu_percent"] >= 0


def test_soak(stack, tmp_path):
    args = bench.parse_args(["soak", "--sessions", "5", "--speech-every", "5"])
    r = bench.run_soak(stack, args)
    assert "Soak: 5 sequential sessions" in bench.print_soak(r)
    assert r["failures"] == 0 and r["replies"] == 1
    assert r["leaked"] == {"daemon_sessions": 0, "daemon_tts_requests": 0, "bridge_connections": 0}
    for k in ("daemon", "bridge"):
        g = r["rss"][k]
        assert g["rss_start_mib"] > 0 and g["rss_end_mib"] > 0 and g["growth_percent"] is not None


def test_acceptance(stack, tmp_path, small_manifest):
    rc = bench.main(attach(stack, "acceptance", tmp_path, "--no-inprocess", "--repeat", "1", "--replies", "1",
                           "--utterances", "1", "--manifest", str(small_manifest)))
    r = load(tmp_path, "acceptance")
    names = [c["criterion"] for c in r["criteria"]]
    assert len(names) == 4 and names[0].startswith("ASR CER") and names[3].startswith("P100 VRAM")
    assert r["criteria"][3]["result"] == "n/a" and r["gpu"]["available"] is False
    assert rc == (1 if any(c["result"] == "FAIL" for c in r["criteria"]) else 0)
    assert r["asr"]["paths"]["daemon"]["cer_zh"] is not None and r["e2e"]["missing"] == 0

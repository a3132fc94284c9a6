"""The ASR path: a session's audio becomes partials and finals.

`sessions` (the request handler, one task per session) and `capacity`/`load` (admission by measured
cost) run on the daemon's loop; `batch` and `steps` drive every session's feed as step generators,
alone or in lock-step, on the ASR worker; `base` is what both engines share (`StreamingEngine`,
`PoolBase`); `funasr_engine` (Paraformer with `paraformer_stream`, `fbank_batch`) and
`whisper_engine` are the engines; `vad`/`vad_batch` find speech; `turn_judge` decides the end of a
turn from the speech.
"""

"""The TTS path: text becomes PCM16 speech.

`jobs` (the request handler and the fair queue in front of the TTS worker) runs on the daemon's
loop; `stream` turns streamed text into sentences as it arrives; `textsplit` is the one place text
becomes sentences; `base` (`SentenceTTS`) is what every engine shares; `melo_engine` (with
`melo_offline`), `kokoro_engine` (and kokoro+piper routing) and `piper_engine` are the engines.
"""

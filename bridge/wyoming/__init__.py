"""s2s-wyoming: the Wyoming protocol (Home Assistant's voice pipelines) in front of the speech daemon.

Laid out like rhasspy's wyoming-faster-whisper: `__main__.py` reads the config, connects to the
daemon and serves the ports; `handler.py` serves one connection (describe -> info, transcribe +
audio -> transcript with transcript-start/-chunk/-stop, synthesize and synthesize-start/-chunk/
-stop -> audio). Engines, batching, admission and limits are the daemon's; this is a thin client
of it (daemon/wire/client_async.py through bridge/daemon_link.py), sharing bridge/speech.py with the
OpenAI adapter (bridge/openai_api).
"""

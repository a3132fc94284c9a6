"""s2s-openai: the OpenAI audio API (Open WebUI, LibreChat, the openai SDKs) in front of the speech daemon.

`__main__.py` reads the config, connects to the daemon and serves http://HOST:PORT/v1;
`handler.py` serves the routes (/v1/audio/transcriptions, /v1/audio/speech, /v1/models) with
OpenAI's error bodies; `formats.py` writes transcripts in each response_format and encodes
speech in each audio format as it arrives. Engines, batching, admission and limits are the
daemon's; this is a thin client of it (bridge/daemon_link.py), sharing bridge/speech.py with the
Wyoming adapter (bridge/wyoming).

HTTP is aiohttp: multipart uploads are read part by part as they arrive (so the upload limit
holds before the body is buffered), and chunked and server-sent-event responses are written as
the daemon produces audio; it runs on the same asyncio loop as the daemon client. The websockets
library the browser bridge uses cannot read request bodies.
"""

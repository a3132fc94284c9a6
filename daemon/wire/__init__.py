"""The wire protocol and the client library that speaks it.

`protocol` (with `protocol_fields`) is the one definition of every message on the ASR and TTS
sockets, validated both ways; `client_base` is what the clients share; `client` (blocking: `s2s-ctl`,
scripts) and `client_async` (asyncio: the bridge and the adapters) are the public clients.
"""

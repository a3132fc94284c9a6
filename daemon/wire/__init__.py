"""The wire protocol and the client library that speaks it.

`protocol` (with `protocol_fields`) is the one definition of every message on the ASR and TTS
sockets, validated both ways. The client library is one sans-I/O core, `client_core` (ids,
messages, reply matching, errors, stream state), under two thin I/O shells: `client` (blocking:
`s2s-ctl`, scripts) and `client_async` (asyncio: the bridge and the adapters), the public clients;
`client_base` is the socket side both shells share. `curve` holds the CURVE keys and the rule for
tcp:// (both sides); `placement` chooses among several daemons (the front ends, s2s-bench scaleout).
"""

"""The serving core: the daemon process around the engines.

`server` wires it together (`Daemon`); `transport` owns the ZeroMQ ROUTER sockets and the frames;
`workers` are the threads that run model work off the event loop; `factory` builds the engines the
configuration names (with their fallbacks); `health` answers `describe`/health; `reload` applies
SIGHUP; `notify` speaks to systemd (READY, WATCHDOG, STATUS).
"""

"""The bridge's Prometheus metrics (`GET /metrics`), on a registry of its own.

Bridge series (prefix `s2s_bridge_`): connections (total, open), refused connections by
reason (full, per_address, pending: closed while waiting to log in to make room, origin,
token_in_url), closed connections by reason, turns by source, speculative turns by outcome, errors by
code and source, and two
latency histograms: speech end -> final and final (or typed text) -> first reply audio.
The daemon's counters from its `describe` are exported beside them as
`s2s_daemon_<name>_total`, with `s2s_daemon_up` (1 when `describe` answered); with several
daemons (cluster.daemons) each daemon's, labelled `daemon` (its last answer's values while it is
out), and `s2s_bridge_daemon_{up,asr_sessions,asr_room,tts_room,placed_asr,placed_tts}` per daemon.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


def _numbers(d: Dict[str, Any]) -> Dict[str, float]:
    return {re.sub(r"[^a-zA-Z0-9_]", "_", str(k)): float(v) for k, v in sorted(d.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _daemon_families(daemons: List[Tuple[str, bool, Dict[str, Any], Dict[str, Any]]],
                     labels: List[str]) -> Iterable[Any]:
    """`s2s_daemon_up`, `s2s_daemon_<counter>_total` and `s2s_daemon_<queue>` for each (name, up,
    counters, queues); with `labels` (["daemon"]) one sample per daemon, else the one daemon's."""
    up = GaugeMetricFamily("s2s_daemon_up", "1 when the speech daemon answered describe", labels=labels)
    for name, is_up, _, _ in daemons:
        up.add_metric([name] if labels else [], 1.0 if is_up else 0.0)
    yield up
    for kind, family, help_ in (("counters", CounterMetricFamily, "speech daemon counter"),
                                ("queues", GaugeMetricFamily, "speech daemon")):
        samples: Dict[str, List[Tuple[str, float]]] = {}
        for name, _, counters, queues in daemons:
            for key, value in _numbers(counters if kind == "counters" else queues).items():
                samples.setdefault(key, []).append((name, value))
        for key, values in samples.items():
            f = family(f"s2s_daemon_{key}", f"{help_} {key}", labels=labels)
            for name, value in values:
                f.add_metric([name] if labels else [], value)
            yield f


class _DaemonCollector:
    """Exports the last `describe` counters the bridge fetched (set before each scrape)."""

    def __init__(self) -> None:
        self.info: Optional[Dict[str, Any]] = None

    def collect(self) -> Iterable[Any]:
        info = self.info or {}
        per = info.get("daemon_series")
        if per:  # several daemons (cluster.daemons): every daemon's series, label `daemon`
            yield from _daemon_families([(str(r["name"]), bool(r["up"]), r["counters"], r["queues"]) for r in per],
                                        ["daemon"])
        else:
            yield from _daemon_families([("", self.info is not None, info.get("counters") or {},
                                          info.get("queues") or {})], [])

        rows = (self.info or {}).get("placement") or []  # several daemons (daemon/wire/placement.py)
        if rows:
            for key, help_ in (("up", "1 while the daemon is in placement"), ("asr_sessions", "its ASR sessions"),
                               ("asr_room", "ASR sessions it has room for"), ("tts_room", "syntheses it has room for"),
                               ("placed_asr", "ASR sessions placed on it"), ("placed_tts", "syntheses placed on it")):
                g = GaugeMetricFamily(f"s2s_bridge_daemon_{key}", f"per daemon: {help_}", labels=["daemon"])
                for r in rows:
                    g.add_metric([str(r["name"])], float(r[key]))
                yield g

    def describe(self) -> Iterable[Any]:
        return []  # unchecked collector: names depend on what the daemon reports


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter("s2s_bridge_connections", "browser connections accepted", registry=r)
        self.open = Gauge("s2s_bridge_connections_open", "browser connections open now", registry=r)
        self.refused = Counter("s2s_bridge_refused", "connections refused", ["reason"], registry=r)
        self.closed = Counter("s2s_bridge_closed", "connections closed by the bridge", ["reason"], registry=r)
        self.turns = Counter("s2s_bridge_turns", "agent turns started", ["source"], registry=r)
        self.errors = Counter("s2s_bridge_errors", "error events sent to browsers", ["code", "source"], registry=r)
        self.final_latency = Histogram("s2s_bridge_asr_final_latency_seconds",
                                       "speech end (its audio arriving at the bridge) -> final", registry=r,
                                       buckets=LATENCY_BUCKETS)
        self.first_audio_latency = Histogram("s2s_bridge_first_audio_latency_seconds",
                                             "final or typed text -> first reply audio", registry=r,
                                             buckets=LATENCY_BUCKETS)
        self.speculative = Counter("s2s_bridge_speculative_turns", "speculative turns (started on a tentative) "
                                   "by outcome: released at the final, or cancelled (wasted)", ["outcome"],
                                   registry=r)
        for outcome in ("released", "cancelled"):
            self.speculative.labels(outcome)
        self.daemon = _DaemonCollector()
        r.register(self.daemon)  # type: ignore[arg-type]
        for reason in ("full", "per_address", "pending", "origin", "token_in_url"):
            self.refused.labels(reason)

    def error(self, code: str, source: str) -> None:
        self.errors.labels(code, source).inc()

    def render(self, daemon_info: Optional[Dict[str, Any]]) -> bytes:
        self.daemon.info = daemon_info
        return generate_latest(self.registry)

    def count(self, counter: Counter, *labels: str) -> int:
        """Current value of a counter (for /healthz detail)."""
        c = counter.labels(*labels) if labels else counter
        return int(c._value.get())  # noqa: SLF001 - prometheus_client has no public getter

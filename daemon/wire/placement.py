"""Placement over several speech daemons (issue 29): which daemon gets each new ASR session and
each synthesis.

An ASR stream is stateful (VAD, streaming caches, the speculative turn live in one daemon), so
sessions cannot be spread message by message: each new session and each synthesis is placed on
one daemon and stays there (the caller keeps the `Member` it was given for the session's life).

- **Load and capacity** come from each daemon's `describe` (its admission measures both), asked
  every `INTERVAL` seconds: ASR room = min(limits.max_sessions, queues.asr_stream_capacity) -
  queues.asr_sessions; TTS room = limits.max_tts_queue - queues.tts_requests. What was placed
  since the last answer counts against the room at once, so a burst of opens is spread rather
  than piled on the daemon that looked emptiest a moment ago.
- **Most room wins**; ties go to the daemon with fewer sessions, then to the first listed.
- **Out of placement within a second**: a daemon whose connection the client's socket monitor
  saw refused or lost is out at once; one that has not answered `describe` for `DOWN_AFTER`
  seconds (hung, or its host gone) is out then; a stopping daemon (describe's
  `daemon.stopping`, or a `shutting_down` refusal reported by `refused`) is out at once and
  comes back when it answers as a fresh process. Every change is one log line.
- `/healthz` and `/metrics`: `report()` gives each daemon's state (up, stopping, why, room,
  sessions, last answer age).

The members are whatever talks to one daemon (`Member`: a name, `describe`, `reachable`), so
this module does not depend on how the clients are made. Used by the front ends
(bridge/daemon_pool.py) and by `s2s-bench scaleout`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Optional, Protocol, Sequence, TypeVar

from daemon.errors import ErrorCode, S2SError
from daemon.wire.client_base import missing_endpoint

logger = logging.getLogger(__name__)

# Seconds between describes of each daemon, and how long a daemon may go without answering one.
INTERVAL = 0.25
DOWN_AFTER = 1.0
KINDS = ("asr", "tts")
# Refusals after which the next daemon is tried (first_taker).
TRY_ELSEWHERE = (ErrorCode.SHUTTING_DOWN, ErrorCode.UNAVAILABLE, ErrorCode.BUSY)
T = TypeVar("T")


class Member(Protocol):
    """One daemon as placement sees it."""

    name: str

    async def describe(self, timeout: float) -> Dict[str, Any]: ...

    def reachable(self) -> Optional[bool]:
        """False when the socket monitor saw the connection refused or lost; None: not known."""
        ...


@dataclass
class DaemonState:
    member: Member
    up: bool = False
    stopping: bool = False
    why: str = "not asked yet"
    answered: float = float("-inf")
    pid: Optional[int] = None
    sessions: Dict[str, int] = field(default_factory=lambda: {"asr": 0, "tts": 0})
    capacity: Dict[str, int] = field(default_factory=lambda: {"asr": 0, "tts": 0})
    placed: Dict[str, int] = field(default_factory=lambda: {"asr": 0, "tts": 0})
    placed_total: Dict[str, int] = field(default_factory=lambda: {"asr": 0, "tts": 0})
    # Its last describe's counters and queue depths (the bridge's /metrics, one series per daemon).
    counters: Dict[str, Any] = field(default_factory=dict)
    queues: Dict[str, Any] = field(default_factory=dict)

    def room(self, kind: str) -> int:
        return self.capacity[kind] - self.sessions[kind] - self.placed[kind]


def capacities(info: Dict[str, Any]) -> Dict[str, Dict[str, int]]:
    """{"sessions": {asr, tts}, "capacity": {asr, tts}} from a describe reply."""
    q, lim = info.get("queues") or {}, info.get("limits") or {}
    max_sessions = int(lim.get("max_sessions") or 0)
    streams = q.get("asr_stream_capacity")
    asr_cap = max_sessions if not isinstance(streams, (int, float)) else min(max_sessions, int(streams))
    return {"sessions": {"asr": int(q.get("asr_sessions") or 0), "tts": int(q.get("tts_requests") or 0)},
            "capacity": {"asr": asr_cap, "tts": int(lim.get("max_tts_queue") or 0)}}


class Placement:
    def __init__(self, members: Sequence[Member], interval: float = INTERVAL, down_after: float = DOWN_AFTER,
                 clock: Callable[[], float] = time.monotonic):
        if not members:
            raise ValueError("placement needs at least one daemon")
        self.states = [DaemonState(m) for m in members]
        self.interval, self.down_after, self.clock = interval, down_after, clock
        self._task: Optional["asyncio.Task[None]"] = None

    # --- learning -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.poll()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="placement")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad answer end placement
                logger.exception("placement: polling the daemons failed")

    async def poll(self) -> None:
        """Describe every daemon at once (each within down_after seconds) and update its state."""
        await asyncio.gather(*(self._poll_one(s) for s in self.states))

    async def _poll_one(self, s: DaemonState) -> None:
        if s.member.reachable() is False:
            self._set(s, False, "its connection is refused or lost")
            return
        try:
            info = await s.member.describe(self.down_after)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._judge(s, f"describe failed: {getattr(e, 'message', e)}")
            return
        self._learn(s, info)

    def _learn(self, s: DaemonState, info: Dict[str, Any]) -> None:
        d = info.get("daemon") or {}
        pid = d.get("pid")
        if s.stopping and pid == s.pid and not d.get("stopping"):
            pass  # a shutting_down refusal is believed until another process answers
        else:
            s.stopping = bool(d.get("stopping"))
        s.pid = pid
        s.answered = self.clock()
        s.counters, s.queues = dict(info.get("counters") or {}), dict(info.get("queues") or {})
        c = capacities(info)
        s.sessions, s.capacity = c["sessions"], c["capacity"]
        s.placed = {"asr": 0, "tts": 0}
        if s.stopping:
            self._set(s, False, "stopping (draining)")
        elif d.get("healthy") is False:
            self._set(s, False, "unhealthy (its engine workers)")
        else:
            self._set(s, True, "")

    def _judge(self, s: DaemonState, why: str) -> None:
        """No answer this time: out once the last answer is older than down_after."""
        if self.clock() - s.answered >= self.down_after:
            self._set(s, False, f"no answer for {self.down_after:g} s ({why})")

    def _set(self, s: DaemonState, up: bool, why: str) -> None:
        if up != s.up:
            if up:
                logger.info("placement: daemon %s is in (room asr %d, tts %d)", s.member.name, s.room("asr"),
                            s.room("tts"))
            else:
                logger.warning("placement: daemon %s is out: %s", s.member.name, why)
        s.up, s.why = up, why

    def refused(self, member: Member, code: ErrorCode) -> None:
        """The caller's open/synthesize on `member` was refused: a stopping daemon is out now."""
        for s in self.states:
            if s.member is member and code == ErrorCode.SHUTTING_DOWN:
                s.stopping = True
                self._set(s, False, "stopping (it refused a new session: shutting_down)")

    def lost(self, member: Member) -> None:
        """The caller saw the daemon's connection lost: out now (before the next poll)."""
        for s in self.states:
            if s.member is member:
                self._set(s, False, "its connection is refused or lost")

    # --- placing ------------------------------------------------------------------------------

    def live(self) -> List[DaemonState]:
        now = self.clock()
        out = []
        for s in self.states:
            if s.up and (s.member.reachable() is False or now - s.answered >= self.down_after):
                self._set(s, False, "its connection is refused or lost" if s.member.reachable() is False
                          else f"no answer for {self.down_after:g} s")
            if s.up:
                out.append(s)
        return out

    def place(self, kind: str, exclude: Sequence[Member] = ()) -> Member:
        """The daemon with the most room for one more `kind` ("asr" session or "tts" request);
        S2SError(unavailable) when no daemon is in placement. A full daemon may be returned (the
        one with the most room): it answers `busy` with retry_after, as a single daemon would."""
        if kind not in KINDS:
            raise ValueError(kind)
        live = [s for s in self.live() if s.member not in exclude]
        if not live:
            why = "; ".join(f"{s.member.name}: {s.why}" for s in self.states)
            raise S2SError(f"no speech daemon is available ({why})", ErrorCode.UNAVAILABLE)
        best = max(live, key=lambda s: (s.room(kind), -(s.sessions[kind] + s.placed[kind]),
                                        -self.states.index(s)))
        best.placed[kind] += 1
        best.placed_total[kind] += 1
        return best.member

    async def first_taker(self, kind: str, attempt: Callable[[Member], Awaitable[T]]) -> T:
        """`attempt(member)` on the daemon with the most room; refused `shutting_down`,
        `unavailable` or `busy` (TRY_ELSEWHERE), on the next one, until one takes it. The last
        refusal is raised when none does (S2SError unavailable when no daemon is in placement)."""
        tried: List[Member] = []
        last: Optional[S2SError] = None
        while True:
            try:
                m = self.place(kind, exclude=tried)
            except S2SError:
                if last is not None:
                    raise last from None
                raise
            tried.append(m)
            try:
                return await attempt(m)
            except S2SError as e:
                if e.code not in TRY_ELSEWHERE:
                    raise
                self.refused(m, e.code)
                if e.code == ErrorCode.UNAVAILABLE:
                    self.lost(m)
                logger.info("%s on daemon %s refused (%s): trying another", kind, m.name, e.code.value)
                last = e

    # --- reporting ----------------------------------------------------------------------------

    def report(self) -> List[Dict[str, Any]]:
        """Each daemon for /healthz and /metrics."""
        now = self.clock()
        self.live()
        return [{"name": s.member.name, "up": s.up, "stopping": s.stopping, "why": s.why,
                 "answered_ago": None if s.answered == float("-inf") else round(now - s.answered, 3),
                 "asr_sessions": s.sessions["asr"], "asr_capacity": s.capacity["asr"], "asr_room": s.room("asr"),
                 "tts_requests": s.sessions["tts"], "tts_capacity": s.capacity["tts"], "tts_room": s.room("tts"),
                 "placed_asr": s.placed_total["asr"], "placed_tts": s.placed_total["tts"]} for s in self.states]


    def series(self) -> List[Dict[str, Any]]:
        """Each daemon's last describe counters and queues, for /metrics (label `daemon`); a daemon
        out of placement keeps its last answer's values (counters do not go back) with up 0."""
        return [{"name": s.member.name, "up": s.up, "counters": s.counters, "queues": s.queues}
                for s in self.states]


class ClientMember:
    """A `Member` over the asyncio clients of one daemon (daemon.wire.client): describe on its ASR
    socket; unreachable when either socket file is missing or either connection was refused or lost."""

    def __init__(self, name: str, asr: Any, tts: Any):
        self.name, self.asr, self.tts = name, asr, tts

    async def describe(self, timeout: float) -> Dict[str, Any]:
        info: Dict[str, Any] = await self.asr.describe(timeout)
        return info

    def reachable(self) -> Optional[bool]:
        if missing_endpoint(self.asr.endpoint) or missing_endpoint(self.tts.endpoint):
            return False
        states = (self.asr.reachable, self.tts.reachable)
        if False in states:
            return False
        return True if all(states) else None

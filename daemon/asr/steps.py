"""Driving step generators: a session's work written as a generator that yields model requests
and takes their answers (`ASRSession.feed_steps`, daemon/engines.py; daemon/asr/base.py). `drive` advances many in lock-step, answering each
round's requests together (daemon/asr/batch.py, the batched worker); `run_steps` is the same
with one generator alone (an engine's own `feed()`, `finalize_events()`, `VADSegmenter.push`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Generator, Iterable, List, Optional, Sequence, Set, Tuple, TypeVar

logger = logging.getLogger(__name__)

R = TypeVar("R")

Done = Callable[[int, Any, Optional[BaseException]], None]


Park = Callable[[List[Tuple[int, Any]]], Set[int]]


def drive(run_requests: Callable[[Sequence[Any]], Iterable[Tuple[int, Any]]],
          steps: Sequence[Generator[Any, Any, Any]], done: Done,
          first: Optional[Sequence[Tuple[Any, Optional[BaseException]]]] = None, park: Optional[Park] = None,
          later: Optional[Callable[[Any], bool]] = None) -> None:
    """Advance every generator until it returns; `done(i, value, error)` once per generator.
    `run_requests(reqs)` yields (index into reqs, answer or exception).

    `first[i]`: the (answer, error) generator i is resumed with (default: started afresh), for a
    generator that left an earlier drive waiting on a request. `park(round)` sees each round's
    requests as (generator index, request) before they are answered and returns the indices it
    takes: those generators leave this drive without `done` (the caller answers their request
    elsewhere and drives them again with `first`). Requests that are `later` wait while any other
    kind is waiting, so they are answered together: sessions whose feeds start with different
    requests (a VAD block or not) reach their streaming chunks in different rounds."""
    waiting: Dict[int, Any] = {}

    def advance(i: int, value: Any = None, error: Optional[BaseException] = None) -> None:
        try:
            req = steps[i].throw(error) if error is not None else steps[i].send(value)
        except StopIteration as stop:
            done(i, stop.value, None)
            return
        except Exception as e:  # noqa: BLE001 - the session's own failure, reported to it
            done(i, None, e)
            return
        waiting[i] = req

    for i in range(len(steps)):
        if first is None:
            advance(i)
        else:
            advance(i, *first[i])
    while waiting:
        round_ = list(waiting.items())
        waiting.clear()
        if later is not None and not all(later(req) for _, req in round_):
            waiting.update((i, req) for i, req in round_ if later(req))
            round_ = [(i, req) for i, req in round_ if not later(req)]
        if park is not None:
            taken = park(round_)
            round_ = [r for r in round_ if r[0] not in taken]
        answered = set()
        try:
            for pos, answer in run_requests([req for _, req in round_]):
                answered.add(pos)
                if isinstance(answer, BaseException):
                    advance(round_[pos][0], error=answer)
                else:
                    advance(round_[pos][0], answer)
        except Exception as e:  # noqa: BLE001 - the batch machinery itself failed: every waiter
            logger.exception("asr: answering %d requests failed", len(round_))
            for pos, (i, _) in enumerate(round_):
                if pos not in answered:
                    advance(i, error=e)


def run_steps(steps: Generator[Any, Any, R], run: Callable[[List[Any]], List[Any]]) -> R:
    """Drive one step generator alone: `run(requests)` answers a round in order (an answer that
    is an exception, or one `run` raises, is raised inside the generator)."""
    out: Dict[str, Any] = {}

    def done(_i: int, value: Any, error: Optional[BaseException]) -> None:
        out.update(value=value, error=error)

    drive(lambda reqs: enumerate(run(list(reqs))), [steps], done)
    if out["error"] is not None:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


def asking(req: Any, steps: Generator[Any, Any, R]) -> Generator[Any, Any, R]:
    """Steps that yielded `req` and were not answered yet, as fresh steps: the first thing they
    yield is `req`, its answer (or error) goes on into `steps`, and so on (FeedBatcher: steps
    driven on the decode thread up to their next model request go back to the worker with it)."""
    value: Any = None
    error: Optional[BaseException] = None
    while True:
        try:
            value, error = (yield req), None
        except Exception as e:  # noqa: BLE001 - the request's failure is the steps' to handle
            value, error = None, e
        try:
            req = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

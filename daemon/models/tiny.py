"""`s2s-models tiny`: deterministic tiny random models in the exact on-disk layouts of the
real ones, so tests run the real funasr and melo loaders and inference code offline.

Each builder module exposes COMPONENTS: {name: builder(out_dir: Path) -> None}; a builder
writes DIR/<name> and records it with modelstore.record().
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

logger = logging.getLogger(__name__)


def components() -> Dict[str, Callable[[Path], None]]:
    from daemon.models import tiny_funasr, tiny_melo

    out: Dict[str, Callable[[Path], None]] = {}
    out.update(tiny_funasr.COMPONENTS)
    out.update(tiny_melo.COMPONENTS)
    return out


def build(out: Path, only: Optional[Iterable[str]] = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    comps = components()
    names = list(only) if only else list(comps)
    unknown = [n for n in names if n not in comps]
    if unknown:
        from daemon.models.store import ModelStoreError

        raise ModelStoreError(f"unknown tiny component(s) {', '.join(unknown)}; known: {', '.join(comps)}")
    for name in names:
        logger.info("tiny: %s", name)
        comps[name](out)

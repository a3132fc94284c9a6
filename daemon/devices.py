"""Which device and dtype an engine runs on: a pure decision plus a thin probe.

`choose_device()` is a plain function of availability facts so that every case
(P100 with/without sm_60 kernels, missing GPU index, bf16 requests on Pascal) is tested
without a GPU. `probe_cuda()` gathers the facts from torch at load time, never at import.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, MutableMapping, Optional, Sequence, Tuple, TypeVar

from daemon.errors import EngineError, S2SError

logger = logging.getLogger(__name__)


# CPU threads per engine when asr.ncpu is 0 (auto), by what measured best here (BENCHMARKS.md,
# "Thread policy"): torch's FunASR models are small calls that a second thread only spins on
# (the same wall time for twice the CPU at one stream, and far worse with the cores shared);
# CTranslate2's Whisper decodes are large GEMMs that two threads finish 27 % sooner.
# A full-size FunASR model's offline decode (Paraformer-large, 220 M) is large GEMMs too: two
# threads finish it 1.85x sooner alone ("funasr-large": the pool applies it to those decodes
# only), but not under the daemon's OPENMP_ENV (below), where the second thread sleeps between
# the forward's parallel regions: 324 against 305 ms on one (BENCHMARKS.md "Int8 finals").
AUTO_THREADS = {"funasr": 1, "funasr-large": 2, "whisper": 2}


# OpenMP's idle threads sleep instead of spinning (GNU libgomp under torch, Intel's under
# CTranslate2). The daemon runs its event loop, the ASR and TTS workers and their thread pools
# on a few cores; spinning threads took whole time slices from the one doing the work: a 3 s
# Whisper final took 12-16 s in the daemon against 1.8 s alone, 1.5-2.5 s with this
# (BENCHMARKS.md "OpenMP threads"). Read when the runtimes load, so it is set before any model.
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def quiet_thread_pools(env: MutableMapping[str, str] = os.environ) -> None:
    """Set OPENMP_ENV where the environment has not chosen otherwise (called by the daemon's
    main before anything loads torch, CTranslate2 or onnxruntime)."""
    for key, value in OPENMP_ENV.items():
        env.setdefault(key, value)


def cpu_threads(configured: int, engine: str) -> int:
    """asr.ncpu for this engine: the configured count, or (0) the measured best, within the cores."""
    if configured > 0:
        return configured
    return max(1, min(AUTO_THREADS.get(engine, 1), os.cpu_count() or 1))


@dataclass(frozen=True)
class CudaFacts:
    """What torch says about CUDA on this host."""

    available: bool = False
    device_count: int = 0
    # (major, minor) compute capability per device index.
    capabilities: Tuple[Tuple[int, int], ...] = ()
    # torch.cuda.get_arch_list(), e.g. ("sm_60", "sm_70", ...)
    arch_list: Tuple[str, ...] = ()
    names: Tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cpu" or "cuda:N"
    dtype: str  # "float32" or "float16"
    requested: str
    # Empty when the request was honoured; otherwise one line saying why not.
    fallback_reason: str = ""
    name: str = ""

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def _arch_supported(cap: Tuple[int, int], arch_list: Sequence[str]) -> bool:
    """True when the build has kernels for this compute capability.

    A build carries SASS for the listed sm_XY and PTX (compute_XY) that can JIT forward;
    an exact sm match, or a compute_ entry at or below the device, is enough.
    """
    major, minor = cap
    if f"sm_{major}{minor}" in arch_list:
        return True
    for a in arch_list:
        if a.startswith("compute_"):
            try:
                v = int(a.split("_", 1)[1])
            except ValueError:
                continue
            if v // 10 <= major and v <= major * 10 + minor:
                return True
    return False


def choose_device(requested: str, dtype: str, facts: CudaFacts) -> DeviceChoice:
    """Decide device and dtype.

    requested: "cpu", "auto", "cuda" or "cuda:N"; dtype: "auto", "float16", "float32"
    (anything else, e.g. "bfloat16", is treated as a request for float16 on CUDA below
    compute 8.0 and float32 on CPU).
    """
    def cpu(reason: str = "") -> DeviceChoice:
        return DeviceChoice("cpu", "float32", requested, reason, "cpu")

    if requested == "cpu":
        return cpu()
    if requested == "auto":
        if not facts.available or facts.device_count == 0:
            return cpu()  # auto never counts as a fallback
        index = 0
    else:
        index = int(requested.split(":", 1)[1]) if ":" in requested else 0
        if not facts.available:
            why = facts.error or "CUDA is not available"
            return cpu(f"{requested} requested but {why}; using cpu")
        if index >= facts.device_count:
            return cpu(f"{requested} requested but only {facts.device_count} CUDA device(s) present; using cpu")

    cap = facts.capabilities[index] if index < len(facts.capabilities) else (0, 0)
    name = facts.names[index] if index < len(facts.names) else f"cuda:{index}"
    if not _arch_supported(cap, facts.arch_list):
        sm = f"sm_{cap[0]}{cap[1]}"
        msg = (f"{requested} ({name}, compute {cap[0]}.{cap[1]}) has no {sm} kernels in this torch build "
               f"(arch list: {' '.join(facts.arch_list) or 'empty'}); using cpu. "
               f"Install torch<2.15 from PyTorch's CUDA 12.6 index (scripts/install-speech-p100.sh)")
        if requested == "auto":
            return cpu()
        return cpu(msg)

    if dtype == "float32":
        out_dtype = "float32"
    elif dtype == "bfloat16" and cap >= (8, 0):
        out_dtype = "bfloat16"
    else:
        # "auto", "float16", and bfloat16 on pre-Ampere cards (P100 cannot do bf16).
        out_dtype = "float16" if cap >= (6, 0) else "float32"
    return DeviceChoice(f"cuda:{index}", out_dtype, requested, "", name)


def probe_cuda() -> CudaFacts:
    """Ask torch about CUDA. Imports torch; call it from main(), not at import."""
    try:
        import torch
    except Exception as e:  # pragma: no cover - torch is a hard dependency
        return CudaFacts(error=f"torch import failed: {e}")
    try:
        if not torch.cuda.is_available():
            return CudaFacts(error="CUDA is not available")
        n = torch.cuda.device_count()
        caps = tuple(tuple(torch.cuda.get_device_capability(i)) for i in range(n))
        names = tuple(torch.cuda.get_device_name(i) for i in range(n))
        return CudaFacts(True, n, caps, tuple(torch.cuda.get_arch_list()), names)  # type: ignore[arg-type]
    except Exception as e:
        return CudaFacts(error=f"CUDA probe failed: {e}")


def resolve(requested: str, dtype: str = "auto", facts: Optional[CudaFacts] = None, what: str = "") -> DeviceChoice:
    """Probe (unless facts are given), choose, and log one clear line on fallback."""
    choice = choose_device(requested, dtype, facts if facts is not None else probe_cuda())
    if choice.fallback_reason:
        logger.warning("%s: %s", what or "device", choice.fallback_reason)
    else:
        logger.info("%s: using %s (%s) with %s", what or "device", choice.device, choice.name, choice.dtype)
    return choice


def is_cuda_error(exc: BaseException) -> bool:
    """True for errors that mean 'the GPU failed', after which a CPU retry makes sense."""
    name = type(exc).__name__
    text = str(exc)
    return (
        name in ("OutOfMemoryError", "CudaError", "AcceleratorError")
        or "CUDA" in text
        or "cuda" in text and "out of memory" in text
        or "CUBLAS" in text
        or "cuDNN" in text
    )


# --- the CUDA -> fallback device guard, for every engine ------------------------------------------

T = TypeVar("T")
Note = Callable[[str, str, str], None]  # (from device, to device, reason): record a fallback taken


def load_with_fallback(requested: str, dtype: str, what: str, load: Callable[[str, str], None], note: Note,
                       to: str = "cpu", any_error: bool = False) -> DeviceChoice:
    """Resolve `requested` (noting a fallback when it cannot be had), then `load(device, dtype)`.
    When that load fails on CUDA with a CUDA error (or, `any_error`, with any error but an
    S2SError), note it and load once more on `to` (float32). Returns where it loaded. A failure
    that is not retried is raised as it came, or, with `any_error`, as EngineError."""
    choice = resolve(requested, dtype, what=what)
    if choice.fallback_reason:
        note(requested, choice.device, choice.fallback_reason)
    try:
        load(choice.device, choice.dtype)
        return choice
    except S2SError:
        raise
    except Exception as e:
        retry = choice.is_cuda and to != choice.device and (any_error or is_cuda_error(e))
        if not retry:
            if any_error:
                raise EngineError(f"{what}: load on {choice.device} failed: {e}") from e
            raise
        logger.warning("%s: load on %s failed (%s); falling back to %s", what, choice.device, e, to)
        note(choice.device, to, f"CUDA error loading models: {e}" if is_cuda_error(e) else str(e))
    load(to, "float32")
    return DeviceChoice(to, "float32", requested, "load failed", to)


def run_with_fallback(run: Callable[[], T], name: str, what: str, device: str, to: str, move: Callable[[], None],
                      note: Callable[[str], None], passthrough: Tuple[type[BaseException], ...] = (S2SError,)) -> T:
    """run() for engine `name`; after a CUDA error on `device`, note the reason ("CUDA error during
    <what>: ..."), move() the models to `to` once and run again. `passthrough` errors are raised
    as they came; any other failure is logged and raised as EngineError ("<what> failed: ...")."""
    try:
        return run()
    except passthrough:
        raise
    except Exception as e:
        if not (device.startswith("cuda") and is_cuda_error(e)) or device == to:
            logger.exception("%s: %s failed", name, what)
            raise EngineError(f"{what} failed: {e}") from e
        logger.warning("%s: CUDA error during %s on %s (%s); moving to %s", name, what, device, e, to)
        note(f"CUDA error during {what}: {e}")
        move()
    try:
        return run()
    except passthrough:
        raise
    except Exception as e2:
        logger.exception("%s: %s failed on %s after the fallback", name, what, to)
        raise EngineError(f"{what} failed: {e2}") from e2

"""TEST ONLY: run the real daemon with simulated GPU faults injected into the libraries it
calls; nothing in daemon/ knows about this file.

    python tests/gpu_faults.py --config FILE [s2s-speechd arguments]

Environment:
  S2S_FAKE_GPU=1   torch reports one CUDA device (compute 7.0, kernels present), so
                   daemon.devices chooses cuda:0 for the engines; the libraries then get the
                   CPU instead (faster-whisper's WhisperModel(device="cuda") loads on the CPU,
                   Piper's use_cuda=True is dropped), so the daemon's own code believes it runs
                   on the GPU and takes its GPU error paths for real.
  S2S_FAULT_DIR    directory whose files `asr_oom` and `tts_oom` hold a count N: the next N
                   calls of the real inference (faster_whisper.WhisperModel.transcribe or
                   .encode, piper.PiperVoice.synthesize) raise torch.cuda.OutOfMemoryError, as a GPU
                   out of memory in the middle of a request does. A test writes the file while
                   the daemon runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OOM_TEXT = ("CUDA out of memory. Tried to allocate 1.50 GiB (GPU 0; 15.89 GiB total capacity; "
            "14.20 GiB already allocated; 0 bytes free; simulated by tests/gpu_faults.py)")


def _take(name: str) -> bool:
    """True (and one less left) when the fault file `name` asks for another failure."""
    d = os.environ.get("S2S_FAULT_DIR")
    if not d:
        return False
    f = Path(d) / name
    try:
        n = int(f.read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    if n <= 0:
        return False
    f.write_text(str(n - 1))
    return True


def _oom() -> BaseException:
    import torch

    return torch.cuda.OutOfMemoryError(OOM_TEXT)


def install() -> None:
    import faster_whisper
    import onnxruntime
    import piper

    from daemon import devices

    fake_gpu = os.environ.get("S2S_FAKE_GPU") == "1"
    if fake_gpu:
        facts = devices.CudaFacts(True, 1, ((7, 0),), ("sm_70", "sm_80"), ("Simulated GPU (tests/gpu_faults.py)",))
        devices.probe_cuda = lambda: facts  # type: ignore[assignment]
        providers = onnxruntime.get_available_providers

        def get_available_providers() -> Any:
            return list(providers()) + ["CUDAExecutionProvider"]

        onnxruntime.get_available_providers = get_available_providers

    WM = faster_whisper.WhisperModel
    wm_init, wm_transcribe = WM.__init__, WM.transcribe

    def init(self: Any, model: Any, device: str = "auto", *a: Any, **kw: Any) -> None:
        on_gpu = device == "cuda"
        if on_gpu:
            device = "cpu"
            kw.pop("device_index", None)
            kw["compute_type"] = "int8"
            kw["cpu_threads"] = 1
        wm_init(self, model, device, *a, **kw)
        self._s2s_on_gpu = on_gpu

    def transcribe(self: Any, *a: Any, **kw: Any) -> Any:
        if _take("asr_oom"):
            raise _oom()
        return wm_transcribe(self, *a, **kw)

    wm_encode = WM.encode

    def encode(self: Any, *a: Any, **kw: Any) -> Any:  # the daemon's batched decodes start here
        if _take("asr_oom"):
            raise _oom()
        return wm_encode(self, *a, **kw)

    WM.__init__, WM.transcribe, WM.encode = init, transcribe, encode

    PV = piper.PiperVoice
    pv_load, pv_synth = PV.load, PV.synthesize

    def load(*a: Any, use_cuda: bool = False, **kw: Any) -> Any:
        return pv_load(*a, use_cuda=False, **kw)

    def synthesize(self: Any, *a: Any, **kw: Any) -> Any:
        if _take("tts_oom"):
            raise _oom()
        return pv_synth(self, *a, **kw)

    PV.load, PV.synthesize = staticmethod(load), synthesize


if __name__ == "__main__":
    install()
    from daemon.__main__ import main

    sys.exit(main(sys.argv[1:]))

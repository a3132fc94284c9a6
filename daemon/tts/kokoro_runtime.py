"""How Kokoro's ONNX model is run: onnxruntime, or its decoder in bfloat16 through OpenVINO.

`tts.kokoro.runtime`:
- `onnxruntime`: the whole model in one onnxruntime session (float32 convolutions, int8 matmuls),
  on the CPU or CUDA.
- `openvino`: the model as `s2s-models bundled` splits it (daemon/models/kokoro_onnx.py `split`):
  the text encoder, prosody and the harmonic source in onnxruntime as before, the decoder's
  convolutions in OpenVINO, in bfloat16 where the CPU has bf16 instructions (AMX, AVX-512 BF16),
  float32 elsewhere. 2x faster on this machine and heard as well (BENCHMARKS.md "Kokoro's decoder
  in bfloat16").
- `auto` (default): `openvino` on a CPU with bf16 when the split files and the openvino package
  are there, else `onnxruntime`; why is logged and shown by describe (`runtime_reason`).

Both take the same feeds and return the same waveform; each `run` is one sentence, callers
serialise them (the engine's one synthesis thread), and the split one also holds its own lock.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from daemon.errors import ModelMissingError
from daemon.models.kokoro_onnx import SPLIT_DECODER, SPLIT_ENCODER, import_openvino

logger = logging.getLogger(__name__)

# OpenVINO keeps a call's intermediate buffers at the largest shape it has run (~30 MB per second of
# audio here); after a call longer than this (samples at 24 kHz) they are handed back (~0.1 s, and
# ~0.15 s more on the next call to allocate again). Typical sentences are 1-6 s.
RELEASE_AFTER_SAMPLES = 8 * 24000


def _ort_session(path: Path, threads: int, providers: List[Any]) -> Tuple[Any, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    # The CPU arena gives back what a run took beyond its start (a long call's would be kept).
    run_options = ort.RunOptions()
    if "CUDAExecutionProvider" not in session.get_providers():
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return session, run_options


class OrtModel:
    """The whole model in one onnxruntime session."""

    def __init__(self, path: Path, threads: int, device: str):
        import onnxruntime as ort

        providers: List[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("CUDA requested but onnxruntime has no CUDAExecutionProvider")
            index = device.split(":")[1] if ":" in device else "0"
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(index)}))
        self._session, self._run_options = _ort_session(path, threads, providers)
        self.providers = list(self._session.get_providers())
        if device.startswith("cuda") and "CUDAExecutionProvider" not in self.providers:
            raise RuntimeError("onnxruntime did not enable CUDAExecutionProvider")
        self.name = "onnxruntime"

    def run(self, feeds: Dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self._session.run(None, feeds, self._run_options)[0], dtype=np.float32)


class SplitModel:
    """The encoder half in onnxruntime (float32), the decoder half in OpenVINO (bf16 where the CPU
    has it)."""

    def __init__(self, model_dir: Path, threads: int, bf16: bool):
        ov = import_openvino()

        self._encoder, self._run_options = _ort_session(model_dir / SPLIT_ENCODER, threads,
                                                        ["CPUExecutionProvider"])
        self._cut = [o.name for o in self._encoder.get_outputs()]
        precision = "bf16" if bf16 else "f32"
        compiled = ov.Core().compile_model(str(model_dir / SPLIT_DECODER), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision,
            # The ASR worker shares these cores: threads pinned to them would fight it.
            "ENABLE_CPU_PINNING": False})
        self._inputs = [p.get_any_name() for p in compiled.inputs]
        missing = set(self._inputs) - set(self._cut)
        if missing:
            raise RuntimeError(f"{SPLIT_DECODER} reads {sorted(missing)}, which {SPLIT_ENCODER} does not give "
                               "(files from different splits: re-run s2s-models bundled)")
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()
        self.providers = ["CPUExecutionProvider", f"OpenVINO CPU ({precision})"]
        self.name = f"openvino ({precision} decoder)"

    def run(self, feeds: Dict[str, np.ndarray]) -> np.ndarray:
        with self._lock:
            cut = dict(zip(self._cut, self._encoder.run(self._cut, feeds, self._run_options)))
            self._request.infer({name: cut[name] for name in self._inputs})
            out = np.array(self._request.get_output_tensor(0).data, dtype=np.float32)
            if out.size > RELEASE_AFTER_SAMPLES:
                self._compiled.release_memory()
            return out


def choose(runtime: str, model_dir: Path, device: str) -> Tuple[str, bool, str]:
    """(the runtime to open, bf16?, why) for tts.kokoro.runtime on this device and host."""
    decoder = model_dir / SPLIT_DECODER
    split_files = [model_dir / SPLIT_ENCODER, decoder, decoder.with_suffix(".bin")]
    if runtime == "onnxruntime":
        return "onnxruntime", False, "tts.kokoro.runtime: onnxruntime"
    if device.startswith("cuda"):
        if runtime == "openvino":
            raise RuntimeError(f"tts.kokoro.runtime: openvino runs on the CPU only (the device is {device})")
        return "onnxruntime", False, f"auto: {device}"
    missing = [p.name for p in split_files if not p.is_file()]
    if missing:
        why = f"no {', '.join(missing)} in {model_dir} (s2s-models bundled writes them)"
        if runtime == "openvino":
            raise ModelMissingError(f"tts.kokoro.runtime: openvino needs the split model: {why}")
        return "onnxruntime", False, f"auto: {why}"
    try:
        ov = import_openvino()
    except ImportError as e:
        if runtime == "openvino":
            raise
        return "onnxruntime", False, f"auto: the openvino package is not importable ({e})"
    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if runtime == "auto" and not bf16:
        return "onnxruntime", False, "auto: this CPU has no bf16 instructions (OpenVINO in float32 is no faster)"
    return "openvino", bf16, "auto: this CPU has bf16" if runtime == "auto" else "tts.kokoro.runtime: openvino"


def open_model(runtime: str, model_dir: Path, model_file: str, device: str, threads: int) -> Tuple[Any, str]:
    """(the model, why this runtime) for tts.kokoro.runtime; `auto` falls back to onnxruntime
    when the split model fails to open, and says why."""
    chosen, bf16, why = choose(runtime, model_dir, device)
    if chosen == "openvino":
        try:
            return SplitModel(model_dir, threads, bf16), why
        except Exception as e:  # noqa: BLE001 (any failure of the optional runtime: fall back, say why)
            if runtime == "openvino":
                raise
            why = f"auto: the split model failed to open ({type(e).__name__}: {e})"
            logger.warning("tts.kokoro: %s; running the whole model in onnxruntime", why)
    return OrtModel(model_dir / model_file, threads, device), why

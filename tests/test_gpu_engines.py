"""The engines on a real GPU (marked `gpu`; run by scripts/gpu-check.sh on a lent machine, skipped
with the reason everywhere torch sees no CUDA): FunASR's fp32 and fp16 paths, the batched streaming
Paraformer on CUDA against funasr's one-session path, MeloTTS on CUDA, the CUDA -> CPU fallback with a
real out-of-memory (the card filled first), and what `describe` says from a real daemon.

Device: $S2S_GPU_DEVICE (default cuda:0). Models: the tiny ones ($S2S_TEST_MODELS). Figures that are
findings rather than pass/fail (fp16 texts against fp32) go to the junit report as properties, which
the GPU check's report shows.
"""

from __future__ import annotations

import os
from typing import Any, List

import numpy as np
import pytest
import torch

from daemon.asr.funasr_engine import STREAM_KW, STREAM_SAMPLES, FunASRPool
from daemon.audio import read_wav
from helpers.funasr_tiny import make_config

_dev = os.environ.get("S2S_GPU_DEVICE", "cuda:0")
DEVICE = "cuda:0" if _dev == "cuda" else _dev
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or DEVICE == "cpu",
                       reason="needs a CUDA GPU: torch.cuda.is_available() is False here (or S2S_GPU_DEVICE=cpu); "
                              "scripts/gpu-check.sh runs these on a GPU machine"),
]


@pytest.fixture(scope="module")
def speech(fixtures_dir, manifest) -> List[np.ndarray]:
    return [read_wav(fixtures_dir / r["path"])[0] for r in manifest if r["lang"] == "zh"]


def _run_session(pool: FunASRPool, x: np.ndarray, name: str) -> List[Any]:
    eng = pool.open(name)

    def work() -> List[Any]:
        return eng.feed(x) + eng.finalize_events()

    return pool.submit(work).result(timeout=120)


def _finals(events: List[Any]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "final")


@pytest.fixture(scope="module")
def cpu_texts(models_dir, speech):
    p = FunASRPool(make_config(models_dir))
    p.load()
    try:
        return [p.submit(p.decode, x).result(timeout=120) for x in speech[:3]]
    finally:
        p.shutdown()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_funasr_on_cuda(models_dir, speech, cpu_texts, dtype, record_property):
    """Loads on the GPU in the asked dtype (fp16 = autocast), decodes and streams with no fallback."""
    p = FunASRPool(make_config(models_dir, device=DEVICE, dtype=dtype))
    p.load()
    try:
        info = p.info().to_dict()
        assert (info["device"], info["dtype"], info["fallbacks"]) == (DEVICE, dtype, [])
        texts = [p.submit(p.decode, x).result(timeout=120) for x in speech[:3]]
        events = _run_session(p, speech[0], "gpu")
        assert events and events[-1]["type"] == "final"
        assert p.device == DEVICE and p.fallbacks == []
        same = sum(a == b for a, b in zip(texts, cpu_texts))
        record_property("offline_texts_equal_to_cpu", f"{same}/{len(texts)}")
        record_property("streamed_final", _finals(events)[:60])
        if dtype == "float32":
            # fp32 on the GPU is the CPU's arithmetic up to rounding (cuDNN may use TF32 on newer cards).
            assert same >= len(texts) - 1, (texts, cpu_texts)
    finally:
        p.shutdown()


def _chunks(x: np.ndarray) -> List[np.ndarray]:
    return [x[i:i + STREAM_SAMPLES] for i in range(0, len(x) - STREAM_SAMPLES + 1, STREAM_SAMPLES)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_batched_streaming_on_cuda_equals_one_session(models_dir, speech, dtype, record_property):
    """The batched streaming Paraformer (left-padded look-back caches, one forward for all sessions)
    on CUDA gives each session, chunk by chunk, the text funasr's one-session path gives it on CUDA."""
    import contextlib

    from funasr import AutoModel

    from daemon.asr.paraformer_stream import BatchedStreaming
    from daemon.asr.vad import FUNASR_QUIET

    m = AutoModel(model=str(models_dir / "tiny" / "paraformer-streaming"), frontend_conf={"dither": 0.0},
                  device=DEVICE, ncpu=1, **FUNASR_QUIET)
    cast = torch.autocast("cuda", dtype=torch.float16) if dtype == "float16" else contextlib.nullcontext()
    chunks = [_chunks(x) for x in speech]
    starts = [i % 3 for i in range(len(chunks))]
    with cast:
        ref = []
        for cs in chunks:
            cache: dict = {}
            ref.append([(m.generate(input=c, cache=cache, is_final=False, disable_pbar=True, **STREAM_KW) or
                         [{"text": ""}])[0]["text"] for c in cs])
        batched = BatchedStreaming(m)
        caches: List[dict] = [{} for _ in chunks]
        got: List[List[str]] = [[] for _ in chunks]
        for step in range(max(len(cs) + s for cs, s in zip(chunks, starts))):
            due = [(i, cs[step - s]) for i, (cs, s) in enumerate(zip(chunks, starts)) if 0 <= step - s < len(cs)]
            for (i, _), text in zip(due, batched.run([c for _, c in due], [caches[i] for i, _ in due], STREAM_KW)):
                got[i].append(text)
    agree = sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r))
    total = sum(len(r) for r in ref)
    record_property("chunks_equal", f"{agree}/{total}")
    if dtype == "float32":
        assert got == ref
    else:
        # fp16: padded and unpadded rows round differently; most chunks must still agree.
        assert agree >= 0.9 * total, (got, ref)


def _melo(models_dir, **kw):
    from daemon.tts.melo_engine import MeloConfig, MeloTTSEngine

    t = models_dir / "tiny"
    return MeloTTSEngine(MeloConfig(model_dir=t / "melo-zh", hf_home=t / "hf", nltk_data=t / "nltk_data", **kw))


def test_melo_on_cuda(models_dir, record_property):
    eng = _melo(models_dir, device=DEVICE)
    eng.load()
    try:
        info = eng.info().to_dict()
        assert (info["device"], info["fallbacks"]) == (DEVICE, [])
        record_property("dtype", f"{info['dtype']} (the melo engine has no fp16 path)")
        x = np.frombuffer(eng.synthesize("你好，今天天气很好。打开WiFi。"), dtype="<i2").astype(np.float32)
        assert x.size > 2400 and np.isfinite(x).all() and np.abs(x).max() > 100
        assert eng.device == DEVICE and eng.fallbacks == []
    finally:
        eng.shutdown()


class CardFilled:
    """Allocate the GPU's free memory (largest blocks first, down to 64 KiB) so the next real
    allocation runs out: a real CUDA out-of-memory, not an injected one."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.blocks: List[torch.Tensor] = []

    def __enter__(self) -> "CardFilled":
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        size = 1 << 30
        while size >= 1 << 16:
            try:
                self.blocks.append(torch.empty(size, dtype=torch.uint8, device=self.device))
            except torch.cuda.OutOfMemoryError:
                size //= 4
        return self

    def __exit__(self, *exc: Any) -> None:
        self.blocks.clear()
        torch.cuda.empty_cache()


def test_funasr_out_of_memory_falls_back_to_cpu(models_dir, speech, cpu_texts):
    p = FunASRPool(make_config(models_dir, device=DEVICE, dtype="float32"))
    p.load()
    try:
        p.submit(p.decode, speech[0]).result(timeout=120)
        long = np.concatenate(speech[:3] * 4)
        with CardFilled(DEVICE):
            text = p.submit(p.decode, long).result(timeout=300)
        assert p.device == "cpu", "filling the card provoked no out-of-memory"
        f = p.fallbacks[0]
        assert (f.from_, f.to, f.when) == (DEVICE, "cpu", "recognition") and "out of memory" in f.reason.lower()
        assert isinstance(text, str)
        assert p.submit(p.decode, speech[0]).result(timeout=120) == cpu_texts[0]
    finally:
        p.shutdown()


def test_melo_out_of_memory_falls_back_to_cpu(models_dir):
    eng = _melo(models_dir, device=DEVICE, fallback_device="cpu")
    eng.load()
    try:
        with CardFilled(DEVICE):
            pcm = eng.synthesize("今天天气很好，我们出去走走吧。")
        assert eng.device == "cpu", "filling the card provoked no out-of-memory"
        assert "out of memory" in eng.fallbacks[0].reason.lower() and len(pcm) > 4800
    finally:
        eng.shutdown()


def test_describe_from_a_real_daemon(models_dir):
    """A daemon started on the GPU reports the device and dtype it chose (fp16 with dtype auto)."""
    from daemon.tools.bench.cli import parse_args
    from daemon.tools.bench.stack import open_stack

    args = parse_args(["ipc", "--engines", "tiny", "--models", str(models_dir), "--device", DEVICE,
                       "--start-timeout", "180"])
    with open_stack(args, need_bridge=False, sessions=2) as st:
        a, t = st.info["asr"], st.info["tts"]
    assert (a["device"], a["dtype"]) == (DEVICE, "float16") and a.get("fallbacks", []) == []
    assert t["device"] == DEVICE and st.info.get("fallbacks", []) == []

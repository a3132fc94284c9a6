"""FunASR engine: offline Paraformer + fsmn-vad + CT-Transformer punctuation, with optional
2-pass partials from a streaming Paraformer and per-session hotwords (SeACo-Paraformer).

The 2-pass design of FunASR's own server: the streaming VAD (daemon/asr/vad.py) finds where an
utterance starts and ends; while it is open the streaming Paraformer (`ParaformerStreaming`)
gets every 600 ms of speech and its running text goes out as `partial` events; when it ends
the offline model decodes the whole segment, punctuation is added, and a `final` goes out.

Models load from local directories only (`disable_update=True`; a missing directory raises
ModelMissingError, it is never taken for a hub id). One `FunASRPool` holds the models for
the process; `FunASREngine`s hold only a session's streaming state. Inference runs on the
pool's single worker thread (`submit`). fp16 on CUDA is done with autocast (weights stay
float32): funasr's BiCif/SeACo inference paths do not cast their input to half.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from daemon import devices
from daemon.config import FunASRModels
from daemon.engines import ASREvent, Capabilities, EngineInfo, PartialEvent
from daemon.errors import EngineError, ModelMissingError, S2SError
from daemon.rules import LANGUAGES
from daemon.serving.workers import extend_budget
from daemon.asr import calibrate
from daemon.asr.base import ASRSettings, Decode, PoolBase, SentenceEnd, Steps, StreamChunk, StreamingEngine, join_cjk
from daemon.asr.paraformer_stream import BatchedStreaming
from daemon.asr.vad import FUNASR_QUIET, SAMPLE_RATE, FsmnVAD, require_dir

logger = logging.getLogger(__name__)

# funasr model classes that take `hotword=` at generate time.
HOTWORD_MODELS = ("SeacoParaformer", "ContextualParaformer")
STREAMING_MODELS = ("ParaformerStreaming",)
# FunASR's server settings for the streaming model: 600 ms chunks, 300 ms look-ahead.
STREAM_CHUNK = [0, 10, 5]
STREAM_SAMPLES = STREAM_CHUNK[1] * 960
# How much longer than its budget a call that reloads the models on the CPU may run.
RELOAD_BUDGET_SECONDS = 120.0
# CT-Transformer labels that end a sentence, and the marks it writes (stripped before asking it).
SENTENCE_END_LABELS = ("。", "？")
PUNCTUATION_MARKS = "，。？、,.?!！"
# A model directory this big is "full size" (Paraformer-large: 880 MB of float32 weights, 220 M
# parameters; the tiny test models: a few MB): on the CPU its Paraformers run int8 (`quantize`)
# and its offline decodes get `ncpu_large` intra-op threads (BENCHMARKS.md, "Capacity at full
# size"). Small models keep one thread and float32: their calls are too short for either to pay.
# Judged from the files, before loading: funasr fixes a model's threads when it is built.
LARGE_MODEL_BYTES = 200_000_000
# Layers `_int8` leaves float: the token scores, whose near-ties int8 would break.
KEEP_FLOAT = ("decoder.output_layer",)
# A full-size streaming chunk is bound by reading the weights: 4 sessions' chunks in one forward
# cost 1.4x one alone (int8: 185 against 129 ms). While 2+ sessions speak, a session's due chunk
# waits for the next tick of a shared clock (every chunk period), so theirs run in the same
# worker calls instead of one call each (a partial comes up to one period later, as often).
CHUNK_PERIOD = STREAM_SAMPLES / SAMPLE_RATE
# ... and for this long after a tick the daemon holds the worker's next call until every streaming
# session's feed is in (their frames come every 60 ms): one forward for all their chunks.
CHUNK_GATHER = 0.08
# A session whose last chunk ran this long ago runs its due one at once: a chunk due just after a
# tick would otherwise wait a period, and its partial come 1.2 s after the one before.
CHUNK_MAX_WAIT = 0.9
# Sessions that ran a chunk this recently are streaming speech (a session fed silence runs none).
CHUNK_ACTIVE = CHUNK_MAX_WAIT + CHUNK_PERIOD
STREAM_KW = {"chunk_size": STREAM_CHUNK, "encoder_chunk_look_back": 4, "decoder_chunk_look_back": 1}


@dataclass(frozen=True, kw_only=True)
class FunASRConfig(ASRSettings):
    paraformer_dir: Path
    punc_dir: Optional[Path] = None
    streaming_dir: Optional[Path] = None
    partials: bool = True
    partial_interval: float = 0.6
    ncpu_large: int = 1  # intra-op threads for a full-size model's offline decodes
    # full-size models on the CPU: "auto" partials and finals int8 (FunASR's CPU runtime's default,
    # --quantize true), "partials" the streaming model only, "off" float32 (asr.funasr.quantize)
    quantize: str = FunASRModels.quantize
    batch_size: int = 1

    @classmethod
    def from_config(cls, cfg: Any) -> "FunASRConfig":
        """From a daemon.config.Config; relative model paths resolve under models_root."""
        f = cfg.asr.funasr
        return cls(
            paraformer_dir=cfg.model_path(f.paraformer),
            punc_dir=cfg.model_path(f.punc) if f.punc else None,
            streaming_dir=cfg.model_path(f.streaming) if f.streaming else None,
            partials=cfg.asr.partials, partial_interval=cfg.asr.partial_interval, quantize=f.quantize,
            ncpu_large=devices.cpu_threads(cfg.asr.ncpu, "funasr-large"), **ASRSettings.of(cfg, "funasr", f.vad))

    def missing(self) -> List[str]:
        """Required model directories that are absent (cheap; no model is loaded)."""
        return [str(p) for p in (self.paraformer_dir, self.vad_dir) if not (Path(p) / "config.yaml").is_file()]


def model_class(model_dir: Path) -> str:
    """The funasr class named by a model directory's config.yaml."""
    import yaml

    try:
        data = yaml.safe_load((Path(model_dir) / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError) as e:
        raise ModelMissingError(f"{model_dir}/config.yaml: cannot read ({e})") from None
    return str(data.get("model", "")) if isinstance(data, dict) else ""


class FunASRPool(PoolBase):
    """Loaded FunASR models shared by every session, with one device worker."""

    name = "funasr"
    config: FunASRConfig

    def __init__(self, config: FunASRConfig):
        super().__init__(config)
        self.generation = 0  # bumped when models are reloaded (CPU fallback)
        self.asr_class = ""
        self.streaming_class = ""
        self.notes: List[str] = []
        self._asr: Any = None
        self._punc: Any = None
        self._stream: Any = None
        self._stream_batcher: Optional[BatchedStreaming] = None
        self._decode_lock = threading.Lock()  # the worker's finalize and the decode thread share the model
        self.large = False  # full-size models (LARGE_MODEL_BYTES): int8 (quantize), threaded decodes
        self._chunk_ran: Dict[str, float] = {}  # session id -> when its last streaming chunk ran
        # measured at load (daemon/asr/calibrate.py): the worker's and the decode thread's
        self.cost_curve: Optional[Tuple[float, float]] = None
        self.decode_cost_curve: Optional[Tuple[float, float]] = None

    # -- loading ----------------------------------------------------------------------

    def load(self) -> None:
        c = self.config
        require_dir(c.paraformer_dir, "paraformer")
        require_dir(c.vad_dir, "fsmn-vad")
        self.asr_class = model_class(c.paraformer_dir)
        t0 = time.monotonic()
        self.vad = FsmnVAD(c.vad_dir, ncpu=c.ncpu)
        self.vad.load()
        devices.load_with_fallback(c.device, c.dtype, "asr.funasr", self._load_models,
                                   lambda src, dst, why: self._note_fallback(src, dst, why, "load"))
        self._loaded = True
        if self.large:
            self.cost_curve, self.decode_cost_curve = calibrate.measure(
                self._stream_batch if self._stream is not None else None,
                lambda audios: self._decode_batch(audios, ()),
                self.open("calibration", partials=False).feed, SAMPLE_RATE, STREAM_SAMPLES, self.offload_decodes)
        logger.info("funasr: loaded %s (%s) on %s/%s in %.1f s; punctuation %s; partials %s",
                    c.paraformer_dir, self.asr_class, self.device, self.dtype, time.monotonic() - t0,
                    "on" if self._punc is not None else "off", "on" if self._stream is not None else "off")

    def _load_models(self, device: str, dtype: str) -> None:
        from daemon.asr import funasr_import

        AutoModel = functools.partial(funasr_import.build, funasr_import.PARAFORMER_MODULES)  # not all of funasr

        c = self.config
        common = dict(device=device, ncpu=c.ncpu, batch_size=c.batch_size, **FUNASR_QUIET)
        # dither 0: the frontend's default dither makes results vary from run to run.
        large = device == "cpu" and _large(c.paraformer_dir)
        # funasr resets torch's threads to a model's ncpu at every generate: the offline model's is its own.
        asr = AutoModel(model=str(c.paraformer_dir), frontend_conf={"dither": 0.0},
                        **dict(common, ncpu=c.ncpu_large if large else c.ncpu))
        punc = None
        if c.punc_dir is not None:
            if (Path(c.punc_dir) / "config.yaml").is_file():
                punc = AutoModel(model=str(c.punc_dir), **common)
            else:
                self._note(f"punctuation model {c.punc_dir} is missing; finals have no punctuation")
        stream = None
        if c.streaming_dir is not None and c.partials:
            if not (Path(c.streaming_dir) / "config.yaml").is_file():
                self._note(f"streaming model {c.streaming_dir} is missing; no partials")
            else:
                self.streaming_class = model_class(c.streaming_dir)
                if self.streaming_class not in STREAMING_MODELS:
                    self._note(f"{c.streaming_dir} is a {self.streaming_class}, not a streaming Paraformer; "
                               f"no partials")
                else:
                    stream = AutoModel(model=str(c.streaming_dir), frontend_conf={"dither": 0.0}, **common)
        self.large = large
        self.offload_decodes = large  # about a second of compute: on the decode thread (asr/batch.py)
        if stream is not None and device == "cpu" and c.quantize != "off" and _large(c.streaming_dir):
            _int8(stream.model)
            self._note("the streaming Paraformer is full size: its partials run int8 on the CPU")
        if large and c.quantize == "auto":
            _int8(asr.model)
            self._note("the offline Paraformer is full size: its finals run int8 on the CPU "
                       "(asr.funasr.quantize: partials or off for float32)")
        self._asr, self._punc, self._stream = asr, punc, stream
        self.device, self.dtype = device, dtype
        self.generation += 1

    def _note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)
            logger.warning("funasr: %s", msg)

    def streaming_sessions(self) -> int:
        """Sessions that ran a streaming chunk within CHUNK_ACTIVE (the speakers, not the sessions
        fed silence; read on the worker and the decode thread: a snapshot)."""
        since = time.monotonic() - CHUNK_ACTIVE
        recent = {k: t for k, t in list(self._chunk_ran.items()) if t >= since}
        if len(self._chunk_ran) > 2 * len(recent) + 64:  # forget sessions long quiet or gone
            self._chunk_ran = recent
        return len(recent)

    def chunk_due(self, session_id: str, overdue: float) -> bool:
        """Whether a session's streaming chunk, complete `overdue` seconds of audio ago, runs in
        this feed (and if so it is noted as run): at once for small models, a session speaking
        alone, or one whose last chunk ran CHUNK_MAX_WAIT ago or more; else once a tick of the
        shared clock (monotonic time in CHUNK_PERIOD steps) has passed since it was due."""
        if not self.large:
            return True  # and nothing noted: only the tick reads it, and pruning runs only here
        now = time.monotonic()
        run = (self.streaming_sessions() < 2 or overdue >= now % CHUNK_PERIOD
               or now - self._chunk_ran.get(session_id, -CHUNK_ACTIVE) >= CHUNK_MAX_WAIT)
        if run:
            self._chunk_ran[session_id] = now
        return run

    def gather_wait(self, pending: int) -> float:
        """Right after a tick (CHUNK_GATHER), the time left until every streaming session's feed
        is in; 0 for small models, no streaming model, a session streaming alone, or once they all are."""
        if not self.large or self._stream is None:
            return 0.0  # on the event loop at every feed: nothing more for small models
        streaming = self.streaming_sessions()
        if streaming < 2 or pending >= streaming:
            return 0.0
        return max(0.0, CHUNK_GATHER - time.monotonic() % CHUNK_PERIOD)

    # -- inference (run these on the worker) ------------------------------------------

    def _autocast(self) -> Any:
        if self.device.startswith("cuda") and self.dtype == "float16":
            import torch

            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _guarded(self, what: str, fn: Any, *args: Any) -> Any:
        """Run fn; after a CUDA error reload everything on the CPU once and retry."""
        def run() -> Any:
            with self._autocast():
                return fn(*args)

        def to_cpu() -> None:
            extend_budget(RELOAD_BUDGET_SECONDS)  # a model reload is a legitimately long call
            self._load_models("cpu", "float32")

        return devices.run_with_fallback(run, self.name, what, self.device, "cpu", to_cpu,
                                         lambda why: self._note_fallback(self.device, "cpu", why, "recognition"))

    def decode(self, audio: np.ndarray, hotwords: Sequence[str] = ()) -> str:
        """Offline Paraformer on one utterance, then punctuation; plain text."""
        return str(self._guarded("recognition", self._decode_batch, [audio], tuple(hotwords))[0])

    def decode_request(self, req: Decode) -> str:
        return self.decode(req.audio, req.hotwords)

    def decode_requests(self, reqs: List[Decode]) -> List[Any]:
        """Utterances with the same hotwords in one padded Paraformer forward (the model is
        non-autoregressive); if the batch fails, each alone, so a failure stays its own."""
        if len(reqs) > 1:
            try:
                return list(self._guarded("recognition", self._decode_batch, [r.audio for r in reqs],
                                          reqs[0].hotwords))
            except Exception:  # noqa: BLE001 - logged by _guarded; retried one by one below
                pass
        return super().decode_requests(reqs)

    def _decode_batch(self, audios: List[np.ndarray], hotwords: Tuple[str, ...]) -> List[str]:
        kw: Dict[str, Any] = {"disable_pbar": True, "batch_size": len(audios)}
        if hotwords:
            kw["hotword"] = " ".join(hotwords)
        # One decode at a time: funasr's generate writes its call's options into the model's kwargs.
        with self._decode_lock, _threads(self.config.ncpu_large if self.large else 0, self.config.ncpu):
            res = self._asr.generate(input=audios if len(audios) > 1 else audios[0], **kw)
            if len(res or []) != len(audios):
                raise EngineError(f"recognition returned {len(res or [])} results for {len(audios)} utterances")
            out = []
            for r in res:
                text = str(r.get("text", ""))
                if text.strip() and self._punc is not None:
                    # CT-Transformer punctuation takes one text per call (funasr asserts it).
                    pres = self._punc.generate(input=text, disable_pbar=True)
                    text = str(pres[0].get("text", text)) if pres else text
                out.append(join_cjk(text))
        return out

    def stream_chunk(self, audio: np.ndarray, cache: Dict[str, Any]) -> str:
        """One 600 ms chunk through the streaming Paraformer; the text it adds."""
        answer = self._guarded("streaming recognition", self._stream_batch, [audio], [cache])[0]
        if isinstance(answer, Exception):
            raise _stream_error(answer)
        return str(answer)

    def stream_requests(self, reqs: List[StreamChunk]) -> List[Any]:
        """Every session's due chunk in one encoder and one decoder forward
        (`daemon/asr/paraformer_stream.py`); a session's own bad chunk is its own error. If the
        batch itself fails its caches are spent: each session starts its partials afresh
        alone, so a failure stays its own."""
        try:
            answers = self._guarded("streaming recognition", self._stream_batch,
                                    [r.audio for r in reqs], [r.cache for r in reqs])
            return [_stream_error(a) if isinstance(a, Exception) else a for a in answers]
        except Exception:  # noqa: BLE001 - logged by _guarded; retried one by one below
            for r in reqs:
                r.cache.clear()
        # Each alone from a fresh cache; what still fails is that session's answer, never a
        # raise (that would fail every other request of the round too).
        return super().stream_requests(reqs)

    def sentence_end_request(self, req: SentenceEnd) -> bool:
        if self._punc is None:
            return super().sentence_end_request(req)
        return bool(self._guarded("punctuation", self._ends_sentence, req.text))

    def _ends_sentence(self, text: str) -> bool:
        """The CT-Transformer's own label after the text's last word: funasr closes every final
        with 。 (it turns a trailing ， into one), so the finished text cannot say whether the
        speaker stopped mid-phrase; the label before that rewrite can."""
        import torch
        from funasr.models.ct_transformer.utils import split_words

        model = self._punc.model
        raw = "".join(ch for ch in text if ch not in PUNCTUATION_MARKS)
        tokens = split_words(raw, jieba_usr_dict=getattr(model, "jieba_usr_dict", None))
        if not tokens:
            return False
        ids = self._punc.kwargs["tokenizer"].encode(tokens)
        with torch.no_grad():
            y, _ = model.punc_forward(text=torch.tensor([ids], dtype=torch.int64),
                                      text_lengths=torch.tensor([len(ids)], dtype=torch.int32))
        return str(model.punc_list[int(y[0, -1].argmax())]) in SENTENCE_END_LABELS

    def stream_request(self, req: StreamChunk) -> str:
        return self.stream_chunk(req.audio, req.cache)

    def _stream_batch(self, audios: List[np.ndarray], caches: List[Dict[str, Any]]) -> List[Any]:
        if self._stream_batcher is None or self._stream_batcher.model is not self._stream.model:
            self._stream_batcher = BatchedStreaming(self._stream)
        return self._stream_batcher.run(audios, caches, STREAM_KW)

    # -- sessions and reporting -------------------------------------------------------

    @property
    def has_partials(self) -> bool:
        return self._stream is not None

    def capabilities(self) -> Capabilities:
        return Capabilities(partials=self.has_partials, hotwords=self.asr_class in HOTWORD_MODELS,
                            punctuation=self._punc is not None, languages=LANGUAGES)

    def model_label(self) -> str:
        return f"{Path(self.config.paraformer_dir).name}: {self.asr_class or 'not loaded'}"

    def _new_engine(self, session_id: str, language: Optional[str], hotwords: Optional[Sequence[str]],
                    partials: bool, partial_interval: Optional[float] = None,
                    max_utterance_seconds: Optional[float] = None) -> "FunASREngine":
        return FunASREngine(self, session_id, language=language, hotwords=hotwords, partials=partials,
                            partial_interval=partial_interval, max_utterance_seconds=max_utterance_seconds)

    def info(self) -> EngineInfo:
        c = self.config
        models = {"paraformer": str(c.paraformer_dir), "vad": str(c.vad_dir)}
        if c.punc_dir:
            models["punc"] = str(c.punc_dir)
        if c.streaming_dir:
            models["streaming"] = str(c.streaming_dir)
        return EngineInfo(
            kind="asr", engine=self.name, device=self.device, requested_device=c.device, dtype=self.dtype,
            sample_rate=SAMPLE_RATE, capabilities=self.capabilities(), loaded=self._loaded, models=models,
            fallbacks=tuple(self.fallbacks),
            notes=tuple(self.notes),
            details={"model_class": self.asr_class, "streaming_class": self.streaming_class or None})


class FunASREngine(StreamingEngine):
    """One FunASR session. Build it with `pool.open(...)`, or standalone from a FunASRConfig
    (which loads a private pool: fine for scripts, wasteful for a server)."""

    supports_partials = True

    pool: FunASRPool

    def __init__(self, pool: Union[FunASRPool, FunASRConfig], session_id: str = "default",
                 language: Optional[str] = None, hotwords: Optional[Sequence[str]] = None,
                 partials: Optional[bool] = None, partial_interval: Optional[float] = None,
                 max_utterance_seconds: Optional[float] = None):
        if isinstance(pool, FunASRConfig):
            standalone = FunASRPool(pool)
            standalone.load()
            pool = standalone
        c = pool.config
        # Per session, from the caller (the daemon passes the live, reloadable value).
        interval = c.partial_interval if partial_interval is None else partial_interval
        self._interval = max(int(round(interval * SAMPLE_RATE)), 1)
        self._stream_cache: Dict[str, Any] = {}
        self._stream_pos = 0
        self._stream_text = ""
        self._since_partial = 0
        self._generation = pool.generation
        super().__init__(pool, session_id, language or c.language,
                         hotwords or (),  # the daemon decides a session's hotwords (asr/sessions.py)
                         c.partials if partials is None else partials,
                         c.max_utterance_seconds if max_utterance_seconds is None else max_utterance_seconds)
        self.partials = self.partials and pool.has_partials

    def _partial_reset(self) -> None:
        self._stream_cache = {}
        self._stream_text = ""
        self._since_partial = 0
        self._stream_pos = 0

    def _partial_steps(self) -> Steps:
        start = self._seg.utterance_start
        if start is None:
            return []
        if self._generation != self.pool.generation:
            # Models were reloaded (CPU fallback): the old cache belongs to the old model.
            self._generation = self.pool.generation
            self._stream_cache = {}
        events: List[ASREvent] = []
        pos = max(self._stream_pos, start)
        if self._seg.total - pos < STREAM_SAMPLES or not self.pool.chunk_due(
                self.session_id, (self._seg.total - pos - STREAM_SAMPLES) / SAMPLE_RATE):
            return []
        while self._seg.total - pos >= STREAM_SAMPLES:
            chunk = self._seg.audio(pos, pos + STREAM_SAMPLES)
            self._stream_text += str((yield StreamChunk(chunk, self._stream_cache)))
            pos += STREAM_SAMPLES
            self._since_partial += STREAM_SAMPLES
            text = join_cjk(self._stream_text)
            if self._since_partial >= self._interval - STREAM_SAMPLES // 2 and text:
                self._since_partial = 0
                events.append(PartialEvent(type="partial", text=text, start=self._t(start), end=self._t(pos),
                                           utterance=self._utt))
        self._stream_pos = pos
        return events


def _large(model_dir: Any) -> bool:
    """A full-size model directory (LARGE_MODEL_BYTES of files)."""
    return sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.is_file()) >= LARGE_MODEL_BYTES


def _int8(model: Any) -> None:
    """A full-size model's Linear layers to dynamic int8 (torch's quantize_dynamic, in place):
    the streaming Paraformer's 600 ms chunks are small matrices against 880 MB of float32
    weights, bound by reading them; int8 reads a quarter (measured 284 -> 114 ms CPU a chunk).
    A final's decode costs 1.5x less (BENCHMARKS.md "Int8 finals").
    Weights scaled per output channel, and the decoder's output layer (the token scores) kept
    float, as FunASR's own int8 export does: on the tiny model 87 -> 93 % of a final's tokens
    as in float32, at no measured cost."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig

    spec = {name: per_channel_dynamic_qconfig for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name not in KEEP_FLOAT}
    torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


@contextlib.contextmanager
def _threads(n: int, restore: int) -> Any:
    """torch's intra-op threads at n for one call (0: as they are), then back to `restore`.
    Per calling thread under OpenMP (each thread's own setting): the decode thread's count is not
    the worker's; decodes hold the pool's decode lock."""
    if n <= 0 or n == restore:
        yield
        return
    import torch

    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(restore)


def _stream_error(e: Exception) -> S2SError:
    """A session's own streaming failure, as the error its client gets."""
    return e if isinstance(e, S2SError) else EngineError(f"streaming recognition failed: {e}")

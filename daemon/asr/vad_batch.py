"""fsmn-vad for many sessions at once: one encoder forward for every session's pending block.

Each session keeps its own fsmn-vad cache (frontend state, encoder FSMN memories, the frame
state machine). funasr runs one session per call (`batch_size must be set 1`), and on the
daemon's 200 ms steps that call is mostly per-call overhead: at 16 real-time streams the VAD
was most of the ASR worker's time. Here the steps of funasr's streaming `inference` for a
non-final block are taken apart:

1. per session: its frontend (LFR + CMVN, with its frontend cache), as funasr does, with the
   kaldi fbank of all sessions' blocks computed in one pass (`daemon/asr/fbank_batch.py`);
2. sessions whose blocks gave the same number of frames: their encoder memories stacked on
   the batch axis, ONE encoder forward, the memories split back;
3. per session: funasr's own `forward` (decibels, the frame state machine, segments), whose
   encoder call is answered with that session's rows of the batched scores.

Step 3 is funasr's code unchanged; step 2 is the FSMN run on a batch, which it supports (its
memories are [batch, dim, lorder, 1]). `tests/test_vad.py` checks the segments equal the
one-session path's on real speech. A failure in the batched forward falls back to one forward
per session; a failure in one session's steps is that session's alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from daemon.asr.fbank_batch import FbankBatch

logger = logging.getLogger(__name__)


@dataclass
class VADBlock:
    """A request for the model: one session's next non-final block and its fsmn-vad cache; the
    answer is `FsmnVAD.run`'s [start_ms, end_ms] pairs."""

    audio: np.ndarray
    cache: Dict[str, Any]


class BatchedFsmn:
    """Batched non-final steps over a loaded fsmn-vad AutoModel (final flushes stay per session)."""

    def __init__(self, automodel: Any, max_end_silence_ms: int):
        import torch

        self._torch = torch
        self.model = automodel.model
        self.frontend = automodel.kwargs["frontend"]
        self.max_end_silence_ms = max_end_silence_ms
        self.forwards = 0  # batched encoder forwards run (for tests and describe)
        self._ready: Dict[int, Any] = {}
        inner = self.model.encoder
        ready = self._ready

        class _Precomputed(torch.nn.Module):
            """The model's encoder, answering from batched scores when they are ready for
            this cache (keyed by the identity of the session's encoder-memory dict)."""

            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, feats: Any, cache: Any = None) -> Any:
                scores = ready.pop(id(cache), None) if cache is not None else None
                if scores is not None and scores.shape[1] == feats.shape[1]:
                    return scores
                return self.inner(feats, cache=cache)

        self.inner = inner
        self.model.encoder = _Precomputed()
        self.fbank = FbankBatch(self.frontend)

    def run(self, blocks: Sequence[VADBlock]) -> List[Any]:
        """Each block's [start_ms, end_ms] pairs, or the exception its session raised."""
        torch = self._torch
        results: List[Any] = [None] * len(blocks)
        prepared: List[Tuple[int, Any, Any]] = []
        with torch.no_grad():
            samples: List[Any] = [None] * len(blocks)
            for i, b in enumerate(blocks):
                try:
                    samples[i] = self._samples(b.audio, b.cache)
                except Exception as e:  # noqa: BLE001 - this session's own failure
                    results[i] = e
            live = [i for i, x in enumerate(samples) if x is not None]
            self.fbank.prepare([(blocks[i].cache["frontend"], samples[i]) for i in live])
            for i in live:
                try:
                    speech, waveform = self._features(samples[i], blocks[i].cache)
                    prepared.append((i, speech, waveform))
                except Exception as e:  # noqa: BLE001 - this session's own failure
                    results[i] = e
            self.fbank.discard([blocks[i].cache["frontend"] for i in live])
            self._encode_groups(blocks, prepared)
            for i, speech, waveform in prepared:
                cache = blocks[i].cache
                try:
                    results[i] = self._detect(speech, waveform, cache)
                except Exception as e:  # noqa: BLE001
                    results[i] = e
                finally:
                    self._ready.pop(id(cache.get("encoder")), None)
        return results

    # -- the steps --------------------------------------------------------------------

    def _samples(self, audio: np.ndarray, cache: Dict[str, Any]) -> Any:
        """What funasr's streaming inference feeds the frontend for this block."""
        torch = self._torch
        if not cache:
            self.model.init_cache(cache, max_end_silence_time=self.max_end_silence_ms)
        return torch.cat((cache["prev_samples"], torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))))

    def _features(self, sample: Any, cache: Dict[str, Any]) -> Tuple[Any, Any]:
        """funasr's streaming inference up to the encoder, for one block in one chunk."""
        from funasr.utils.load_utils import extract_fbank

        kw = {"return_waveform": True} if getattr(self.frontend, "supports_aligned_waveforms", False) else {}
        speech, _ = extract_fbank([sample], data_type="sound", frontend=self.frontend, cache=cache["frontend"],
                                  is_final=False, **kw)
        waveform = cache["frontend"].get("aligned_waveforms")
        if waveform is None or waveform.numel() == 0:
            waveform = cache["frontend"].get("waveforms")
        return speech, waveform

    def _encode_groups(self, blocks: Sequence[VADBlock], prepared: List[Tuple[int, Any, Any]]) -> None:
        groups: Dict[Tuple[int, Tuple[str, ...]], List[Tuple[int, Any]]] = {}
        for i, speech, _ in prepared:
            if speech.numel():
                enc = blocks[i].cache["encoder"]
                groups.setdefault((int(speech.shape[1]), tuple(sorted(enc))), []).append((i, speech))
        for (_, keys), items in groups.items():
            if len(items) < 2:
                continue  # one session: funasr's own forward, no stacking
            caches = [blocks[i].cache["encoder"] for i, _ in items]
            try:
                self._encode(items, caches, keys)
            except Exception:  # noqa: BLE001 - each session then runs its own forward
                logger.exception("vad: batched encoder forward failed for %d sessions; one by one", len(items))

    def _encode(self, items: List[Tuple[int, Any]], caches: List[Dict[str, Any]], keys: Tuple[str, ...]) -> None:
        torch = self._torch
        feats = torch.cat([s for _, s in items], dim=0)
        stacked: Dict[str, Any] = {k: torch.cat([c[k] for c in caches], dim=0) for k in keys}
        scores = self.inner(feats, cache=stacked)
        self.forwards += 1
        for j, c in enumerate(caches):
            for k, v in stacked.items():
                c[k] = v[j:j + 1]
            self._ready[id(c)] = scores[j:j + 1]

    def _detect(self, speech: Any, waveform: Any, cache: Dict[str, Any]) -> List[List[int]]:
        """funasr's forward after the features: decibels, scores, the frame state machine."""
        out: List[List[int]] = []
        if speech.numel():
            segs = self.model.forward(feats=speech, waveform=waveform, cache=cache, is_final=False,
                                      is_streaming_input=True)
            for batch in segs or []:
                out.extend(list(p) for p in batch)
        cache["prev_samples"] = self._torch.empty(0)
        return out


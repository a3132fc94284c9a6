"""Kaldi filterbanks for many sessions in one pass, for funasr's online frontend.

funasr's `WavFrontendOnline` computes each session's fbank with its own torchaudio
`kaldi.fbank` call, and that call is mostly fixed cost (the window function and the mel
banks are rebuilt every time): at 32 real-time streams the fbank of the VAD's and the
streaming Paraformer's frontends was a fifth of the ASR worker. Every step after the
framing works on frames independently, so here all sessions' frames are stacked and go
through it once; each session's `forward_fbank` then takes its rows (`FbankBatch.prepare`
before the sessions' own frontend calls, which are funasr's code otherwise unchanged).

The override of `forward_fbank` keeps funasr's bookkeeping (the samples carried to the next
block, the waveforms the frontend returns) and falls back to funasr's own method whenever a
session's rows were not prepared or do not fit. `tests/test_fbank_batch.py` checks the
features equal torchaudio's per session.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence, Tuple

logger = logging.getLogger(__name__)

# Windows whose function this module builds the way torchaudio's kaldi does.
WINDOWS = ("hamming", "hanning", "povey")
PREEMPHASIS = 0.97


class FbankBatch:
    """Batched fbank for one funasr `WavFrontendOnline` (installed on that instance only)."""

    def __init__(self, frontend: Any):
        import torch
        from torchaudio.compliance import kaldi

        self._torch = torch
        self.frontend = frontend
        self._own = type(frontend).forward_fbank.__get__(frontend)
        self._ready: Dict[int, Any] = {}
        self.batches = 0  # batched passes run (tests)
        f = frontend
        self.win = int(f.frame_sample_length)
        self.shift = int(f.frame_shift_sample_length)
        self.usable = float(getattr(f, "dither", 0.0)) == 0.0 and f.window in WINDOWS and int(f.fs) == 16000
        if not self.usable:
            logger.info("fbank: frontend (window %s, dither %s) left to funasr's own fbank", f.window,
                        getattr(f, "dither", None))
            return
        padded = 1 << (self.win - 1).bit_length()
        mel, _ = kaldi.get_mel_banks(int(f.n_mels), padded, float(f.fs), 20.0, 0.0, 100.0, -500.0, 1.0)
        self.mel_t = torch.nn.functional.pad(mel.float(), (0, 1), mode="constant", value=0).T.contiguous()
        self.padded = padded
        self.window = _window(torch, f.window, self.win)
        self.eps = torch.tensor(torch.finfo(torch.float32).eps)
        frontend.forward_fbank = self._forward_fbank

    # -- before the sessions' frontend calls ----------------------------------------------

    def prepare(self, items: Sequence[Tuple[Dict[str, Any], Any]]) -> None:
        """items: (a session's frontend cache, the 1-D float samples its next call gets). Only
        ever a speed-up: if the batched pass fails, each session's call computes its own."""
        if not self.usable or len(items) < 2:
            return
        try:
            self._prepare(items)
        except Exception:  # noqa: BLE001 - logged; funasr's own fbank per session instead
            logger.exception("fbank: batched pass for %d sessions failed; each computes its own", len(items))

    def _prepare(self, items: Sequence[Tuple[Dict[str, Any], Any]]) -> None:
        torch = self._torch
        waves: List[Tuple[int, Any]] = []
        for cache, samples in items:
            prev = cache.get("input_cache")
            x = samples if prev is None or prev.numel() == 0 else torch.cat((prev.reshape(-1), samples))
            if self._frames(x.shape[0]):
                waves.append((id(cache), x * (1 << 15)))
        if len(waves) < 2:
            return
        frames = torch.cat([w.unfold(0, self.win, self.shift) for _, w in waves])
        mats = self._fbank(frames).split([self._frames(w.shape[0]) for _, w in waves])
        self.batches += 1
        for (key, _), mat in zip(waves, mats):
            self._ready[key] = mat

    def discard(self, caches: Sequence[Dict[str, Any]]) -> None:
        for c in caches:
            self._ready.pop(id(c), None)

    # -- kaldi's steps after framing, on all rows ----------------------------------------

    def _fbank(self, frames: Any) -> Any:
        torch = self._torch
        frames = frames - torch.mean(frames, dim=1).unsqueeze(1)
        offset = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
        frames = frames - PREEMPHASIS * offset[:, :-1]
        frames = frames * self.window
        if self.padded != self.win:
            frames = torch.nn.functional.pad(frames.unsqueeze(0), (0, self.padded - self.win),
                                             mode="constant", value=0).squeeze(0)
        spectrum = torch.fft.rfft(frames).abs().pow(2.0)
        return torch.max(torch.mm(spectrum, self.mel_t), self.eps).log()

    def _frames(self, n: int) -> int:
        return int((n - self.win) / self.shift + 1) if n >= self.win else 0

    # -- the session's own call -----------------------------------------------------------

    def _forward_fbank(self, input: Any, input_lengths: Any, cache: Any = None, **kwargs: Any) -> Any:
        """funasr's `WavFrontendOnline.forward_fbank`, with this session's prepared rows."""
        torch = self._torch
        mat = self._ready.pop(id(cache), None) if cache is not None else None
        if mat is None or input.size(0) != 1:
            return self._own(input, input_lengths, cache=cache, **kwargs)
        joined = torch.cat((cache["input_cache"], input), dim=1)
        frame_num = self._frames(joined.shape[-1])
        if frame_num != mat.shape[0]:
            return self._own(input, input_lengths, cache=cache, **kwargs)
        cache["input_cache"] = joined[:, -(joined.shape[-1] - frame_num * self.shift):]
        waveforms = joined[:, :(frame_num - 1) * self.shift + self.win]
        feats = mat.unsqueeze(0)
        lens = torch.as_tensor([frame_num])
        cache["fbanks"] = feats
        cache["fbanks_lens"] = lens.clone()  # funasr deep-copies it; for a tensor that is a clone
        return waveforms, feats, lens


def _window(torch: Any, kind: str, size: int) -> Any:
    """torchaudio kaldi's `_feature_window_function` for the windows in WINDOWS."""
    if kind == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46)
    hann = torch.hann_window(size, periodic=False)
    return hann.pow(0.85) if kind == "povey" else hann

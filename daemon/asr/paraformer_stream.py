"""The streaming Paraformer for many sessions at once: one encoder and one decoder forward for
every session due a 600 ms chunk.

funasr runs the streaming model one session per call (`batch_size must be set 1`), and with
the daemon's sessions each on their own chunk clock that call is mostly per-call overhead: at
32 real-time streams it was ~45 % of the ASR worker. Here funasr's `inference` for a
non-final chunk is taken apart, its modules and caches used as they are:

1. per session: its frontend (LFR, with its frontend cache; the kaldi fbank of all sessions'
   chunks in one pass, `daemon/asr/fbank_batch.py`), the encoder's position embedding (its
   `start_idx`) and the overlap with the previous chunk's frames;
2. sessions with the same frame count and the same encoder look-back length: their rows
   stacked, each encoder layer's `forward_chunk` run ONCE on the batch with the sessions'
   key/value caches stacked, the caches split back;
3. CIF per session (the predictor's convolution runs on the batch; the integrate-and-fire
   over ~15 frames is a numpy loop, the same arithmetic as funasr's torch-scalar loop);
4. sessions that fired tokens, grouped by whether their decoder has a cache yet: acoustic
   embeddings padded to the longest, the decoder's `forward_chunk` ONCE on the batch. The
   decoder's FSMN is causal and everything else in it is per position, so a row's padding
   changes none of its real outputs; only the FSMN caches it keeps are cut back to each
   row's real length.

`tests/test_paraformer_stream.py` checks the text of every session equals funasr's own
one-session path on real speech, chunk by chunk.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from daemon.asr.fbank_batch import FbankBatch

logger = logging.getLogger(__name__)


class BatchedStreaming:
    """Non-final chunks of a loaded streaming-Paraformer AutoModel, many sessions per call.

    `run(chunks, caches, options)` answers each session's text for its chunk, as
    `AutoModel.generate(input=chunk, cache=cache, is_final=False, **kwargs)` would, and
    leaves each cache as that call would have."""

    def __init__(self, automodel: Any):
        import torch

        self._torch = torch
        self.model = automodel.model
        self.kwargs = automodel.kwargs
        self.frontend = automodel.kwargs["frontend"]
        self.tokenizer = automodel.kwargs["tokenizer"]
        self.forwards = 0  # batched encoder forwards run (tests, describe)
        self.fbank = FbankBatch(self.frontend)
        decoder = self.model.decoder
        # The decoder layers with FSMN caches, in funasr's cache order; how much of each cache
        # the next chunk reads (funasr drops its first entry and keeps kernel_size - 1, so
        # kernel_size entries carry all of it); and whether trailing padding can reach a real
        # token (only through an FSMN that looks ahead).
        fsmn = [getattr(layer, "self_attn", None)
                for layer in list(decoder.decoders) + list(getattr(decoder, "decoders2", None) or [])]
        self._fsmn_keep = [int(a.kernel_size) if a is not None else 0 for a in fsmn]
        self._causal = all(int(a.pad_fn.padding[1]) == 0 for a in fsmn if a is not None)

    # -- one call -----------------------------------------------------------------------

    def run(self, chunks: Sequence[np.ndarray], caches: Sequence[Dict[str, Any]],
            options: Dict[str, Any]) -> List[Any]:
        """Each session's text, or the exception its own chunk raised (its cache untouched)."""
        torch = self._torch
        device = next(self.model.parameters()).device
        kw = {k: v for k, v in dict(self.kwargs, **options).items() if k != "cache"}
        with torch.no_grad():
            return self._run(chunks, caches, kw, device)

    def _run(self, chunks: Sequence[np.ndarray], caches: Sequence[Dict[str, Any]], kw: Dict[str, Any],
             device: Any) -> List[Any]:
        torch = self._torch
        texts: List[Any] = [""] * len(chunks)
        inputs: Dict[int, Any] = {}
        for i, (audio, cache) in enumerate(zip(chunks, caches, strict=True)):
            try:
                inputs[i] = self._samples(audio, cache, kw)
            except Exception as e:  # noqa: BLE001 - this session's own bad chunk, its cache untouched
                texts[i] = e
        rows: List[Tuple[int, Any]] = []
        try:
            self.fbank.prepare([(caches[i]["frontend"], x) for i, x in inputs.items()])
            for i, samples in inputs.items():
                cache = caches[i]
                cache["prev_samples"] = torch.empty(0)
                speech, _ = self._fbank(samples, cache)
                rows.append((i, self._embed(speech.to(device), cache["encoder"])))
        finally:
            self.fbank.discard([caches[i]["frontend"] for i in inputs])
        for group in _groups(rows, lambda r: r[1].shape[1]):
            idx = [i for i, _ in group]
            enc = self._encode(torch.cat([x for _, x in group]), [caches[i]["encoder"] for i in idx])
            fired = self._predict(enc, [caches[i]["encoder"] for i in idx])
            tokens = self._decode_rows(enc, fired, [caches[i]["decoder"] for i in idx])
            for k, toks in enumerate(tokens):
                if toks is not None:
                    texts[idx[k]] = self._text(toks)
        return texts

    # -- the steps ----------------------------------------------------------------------

    def _samples(self, audio: np.ndarray, cache: Dict[str, Any], kw: Dict[str, Any]) -> Any:
        """What funasr's inference would feed the frontend: exactly one chunk (with what the
        cache carried), checked before the session's cache is touched."""
        torch = self._torch
        stride = int(kw["chunk_size"][1] * 960)
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        if x.ndim != 1:
            raise ValueError(f"a streaming chunk is 1-D audio, not shape {tuple(x.shape)}")
        carried = cache.get("prev_samples")
        n = x.numel() + (0 if carried is None else carried.numel())
        if n != stride:
            raise ValueError(f"a streaming chunk is {stride} samples, not {n}")
        if not cache:
            self.model.init_cache(cache, **kw)
        return torch.cat((cache["prev_samples"], x))

    def _decode_rows(self, memory: Any, fired: List[Optional[Any]],
                     caches: List[Dict[str, Any]]) -> List[Optional[List[int]]]:
        """Each row's token ids (None where CIF fired nothing: funasr skips the decoder then).
        Rows go together when they all have a decoder cache or none has yet; and, unless every
        decoder FSMN is causal (so trailing padding changes no real output), the same length."""
        out: List[Optional[List[int]]] = [None] * len(fired)
        due = [(k, emb) for k, emb in enumerate(fired) if emb is not None]
        key = lambda d: (caches[d[0]]["decode_fsmn"] is None, 0 if self._causal else int(d[1].shape[0]))  # noqa: E731
        for group in _groups(due, key):
            ks = [k for k, _ in group]
            for k, ids in zip(ks, self._decode(memory[ks], [emb for _, emb in group], [caches[k] for k in ks])):
                out[k] = ids
        return out

    def _fbank(self, samples: Any, cache: Dict[str, Any]) -> Tuple[Any, Any]:
        from funasr.utils.load_utils import extract_fbank

        return extract_fbank([samples], data_type="sound", frontend=self.frontend,
                             cache=cache["frontend"], is_final=False)

    def _embed(self, speech: Any, enc_cache: Dict[str, Any]) -> Any:
        """funasr's encoder prologue for one session: scale, position (its start_idx), overlap."""
        encoder = self.model.encoder
        speech = speech * encoder.output_size() ** 0.5
        x = encoder.embed(speech, enc_cache) if encoder.embed is not None else speech
        return encoder._add_overlap_chunk(x, enc_cache)

    def _encode(self, x: Any, caches: List[Dict[str, Any]]) -> Any:
        """Every encoder layer once for the batch. Rows whose look-back caches are shorter
        (the first 2.4 s of an utterance) are padded on the left and those keys masked, so
        sessions at any point of their utterances share the forward."""
        torch = self._torch
        encoder = self.model.encoder
        self.forwards += 1
        layers = list(encoder.encoders0) + list(encoder.encoders)
        chunk_size, look_back = caches[0]["chunk_size"], caches[0]["encoder_chunk_look_back"]
        keep = look_back > 0 or look_back == -1
        lens = [0 if c["opt"] is None else int(c["opt"][0]["k"].shape[2]) for c in caches]
        width = max(lens)
        mask = None
        if min(lens) != width:
            mask = torch.ones((len(caches), 1, width + x.shape[1]), device=x.device)
            for b, n in enumerate(lens):
                mask[b, 0, :width - n] = 0.0
        new: List[List[Any]] = [[None] * len(layers) for _ in caches]
        for n, layer in enumerate(layers):
            past = None
            if width and keep:
                past = [torch.cat([_left_pad(c["opt"][n][key] if c["opt"] is not None else None, width, x, layer)
                                   for c in caches]) for key in ("k", "v")]
            x, stride = _layer_chunk(layer, x, past, mask, chunk_size)
            if keep:
                for b, c in enumerate(caches):
                    old = c["opt"][n] if c["opt"] is not None else None
                    new[b][n] = {key: _keep(old, key, stride[j][b:b + 1], look_back, chunk_size)
                                 for j, key in enumerate(("k", "v"))}
        if encoder.normalize_before:
            x = encoder.after_norm(x)
        if keep:
            for c, layers_cache in zip(caches, new):
                c["opt"] = layers_cache
        return x

    def _predict(self, hidden: Any, caches: List[Dict[str, Any]]) -> List[Optional[Any]]:
        """Each row's acoustic embeddings (tokens x dim) from CIF, or None if none fired."""
        torch = self._torch
        p = self.model.predictor
        out = torch.relu(p.cif_conv1d(p.pad(hidden.transpose(1, 2)))).transpose(1, 2)
        alphas = torch.sigmoid(p.cif_output(out))
        alphas = torch.nn.functional.relu(alphas * p.smooth_factor - p.noise_threshold).squeeze(-1)
        chunk = caches[0]["chunk_size"]
        alphas[:, :chunk[0]] = 0.0
        alphas[:, sum(chunk[:2]):] = 0.0
        hid = hidden.detach().float().cpu().numpy()
        alp = alphas.detach().float().cpu().numpy()
        fired: List[Optional[Any]] = []
        for b, c in enumerate(caches):
            h = np.concatenate((c["cif_hidden"].float().cpu().numpy().reshape(1, -1), hid[b]))
            a = np.concatenate((c["cif_alphas"].float().cpu().numpy().reshape(1), alp[b]))
            frames, integrate, rest = _cif(h, a, np.float32(p.threshold))
            c["cif_alphas"] = torch.tensor([[integrate]], dtype=torch.float32)
            c["cif_hidden"] = torch.from_numpy(rest.reshape(1, 1, -1))
            fired.append(torch.from_numpy(np.stack(frames)).to(hidden.device) if frames else None)
        return fired

    def _decode(self, memory: Any, embeds: List[Any], caches: List[Dict[str, Any]]) -> List[List[int]]:
        torch = self._torch
        decoder = self.model.decoder
        lengths = [int(e.shape[0]) for e in embeds]
        tgt = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)
        first = caches[0]["decode_fsmn"] is None
        stacked: Dict[str, Any] = {"decode_fsmn": None, "opt": None,
                                   "chunk_size": caches[0]["chunk_size"],
                                   "decoder_chunk_look_back": caches[0]["decoder_chunk_look_back"]}
        if not first:
            # A row's FSMN cache grows with its last chunk's tokens; only its last
            # kernel_size entries are read, so all rows are cut to that to stack them.
            stacked["decode_fsmn"] = [None if caches[0]["decode_fsmn"][n] is None else
                                      torch.cat([c["decode_fsmn"][n][:, :, -self._fsmn_keep[n]:]
                                                 for c in caches])
                                      for n in range(len(caches[0]["decode_fsmn"]))]
            if caches[0]["opt"] is not None:
                stacked["opt"] = [None if caches[0]["opt"][n] is None else
                                  {key: torch.cat([c["opt"][n][key] for c in caches]) for key in ("k", "v")}
                                  for n in range(len(caches[0]["opt"]))]
        scores = torch.log_softmax(decoder.forward_chunk(memory, tgt, stacked), dim=-1)
        width = tgt.shape[1]
        for b, c in enumerate(caches):
            # The FSMN cache's real part ends where the row's tokens end (padding is last).
            c["decode_fsmn"] = [None if f is None else f[b:b + 1, :, :f.shape[2] - (width - lengths[b])]
                                for f in stacked["decode_fsmn"]]
            if stacked["opt"] is not None:
                c["opt"] = [None if o is None else {key: o[key][b:b + 1] for key in ("k", "v")}
                            for o in stacked["opt"]]
        m = self.model
        out = []
        for b, n in enumerate(lengths):
            ids = scores[b, :n].argmax(dim=-1).tolist()
            out.append([t for t in ids if t not in (m.eos, m.sos, m.blank_id)])
        return out

    def _text(self, ids: List[int]) -> str:
        from funasr.utils import postprocess_utils

        text, _ = postprocess_utils.sentence_postprocess(self.tokenizer.ids2tokens(ids))
        return str(text)


def _cif(hidden: np.ndarray, alphas: np.ndarray, threshold: np.float32) -> Tuple[List[np.ndarray], np.float32, np.ndarray]:
    """funasr's `CifPredictorV2.forward_chunk` integrate-and-fire for one row, in float32 numpy:
    the fired frames, what is left integrated, and the partial frame it carries."""
    integrate = np.float32(0.0)
    frame = np.zeros(hidden.shape[1], np.float32)
    fired: List[np.ndarray] = []
    for t in range(alphas.shape[0]):
        alpha = alphas[t]
        if alpha + integrate < threshold:
            integrate = integrate + alpha
            frame = frame + alpha * hidden[t]
        else:
            frame = frame + (threshold - integrate) * hidden[t]
            fired.append(frame)
            integrate = integrate + alpha - threshold
            frame = integrate * hidden[t]
    rest = frame / integrate if integrate > 0.0 else frame
    return fired, np.float32(integrate), rest.astype(np.float32)


def _layer_chunk(layer: Any, x: Any, past: Optional[List[Any]], mask: Any, chunk_size: List[int]) -> Tuple[Any, Tuple[Any, Any]]:
    """funasr's `EncoderLayerSANM.forward_chunk` with its `MultiHeadedAttentionSANM.forward_chunk`,
    for a batch whose past keys/values are stacked (`past`, left-padded where `mask` says):
    the layer's output and this chunk's keys/values to keep (the look-ahead frames dropped)."""
    import torch

    attn = layer.self_attn
    residual = x
    if layer.normalize_before:
        x = layer.norm1(x)
    q_h, k_h, v_h, v = attn.forward_qkv(x)
    stride = (k_h[:, :, :-chunk_size[2], :], v_h[:, :, :-chunk_size[2], :])
    if past is not None:
        k_h = torch.cat((past[0], k_h), dim=2)
        v_h = torch.cat((past[1], v_h), dim=2)
    fsmn_memory = attn.forward_fsmn(v, None)
    scores = torch.matmul(q_h * attn.d_k ** (-0.5), k_h.transpose(-2, -1))
    out = attn.forward_attention(v_h, scores, mask) + fsmn_memory
    x = residual + out if layer.in_size == layer.size else out
    if not layer.normalize_before:
        x = layer.norm1(x)
    residual = x
    if layer.normalize_before:
        x = layer.norm2(x)
    x = residual + layer.feed_forward(x)
    if not layer.normalize_before:
        x = layer.norm2(x)
    return x, stride


def _left_pad(t: Any, width: int, x: Any, layer: Any) -> Any:
    """One row's past keys or values, zeros on the left up to `width` frames (masked)."""
    import torch

    h, dk = layer.self_attn.h, layer.self_attn.d_k
    if t is None:
        return torch.zeros((1, h, width, dk), dtype=x.dtype, device=x.device)
    if t.shape[2] == width:
        return t
    pad = torch.zeros((1, h, width - t.shape[2], dk), dtype=t.dtype, device=t.device)
    return torch.cat((pad, t), dim=2)


def _keep(old: Optional[Dict[str, Any]], key: str, stride: Any, look_back: int, chunk_size: List[int]) -> Any:
    """What funasr keeps of a row's keys/values for the next chunk: the last look_back chunks."""
    import torch

    kept = stride if old is None else torch.cat((old[key], stride), dim=2)
    return kept if look_back == -1 else kept[:, :, -(look_back * chunk_size[1]):, :]


def _groups(items: Sequence[Any], key: Any) -> List[List[Any]]:
    out: Dict[Any, List[Any]] = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return list(out.values())

"""Whisper's own sense of a finished sentence: P(end mark | the words so far, the audio) (issue 24).

At a pause the turn judge needs the engine's text signal: does the sentence end here? Whisper
base's plain decode rarely writes a final 。 on Mandarin (3 of 33 finished sentences at the
pause), so "the text ends in a mark" hardly separates anything. But the decoder is a language
model conditioned on the audio: put the plain decode's words (their trailing marks removed)
after a Mandarin prompt that makes Whisper punctuate (PROMPT), teacher-forced, and read the
probability it gives the next token being a sentence-end mark (。？！?!.). One decoder pass
over the words, no search, on the encoder output the decode already has.

Measured with `s2s-bench turns` (BENCHMARKS.md, "The turn judge"): at P >= 0.55 it calls 76 % of
finished sentences finished and 88 % of sentences cut mid-way not finished (Smart Turn's audio
alone: 61 % / 48 % at its best point); with P < 0.1 nearly only cut sentences (31 % of them, no
finished one). The prompted *decode* itself is not used: its text is worse (fixtures' CER 14.7 %
against 5.9 % without the prompt), so the words stay the plain decode's.

Only where a prompt is known for the language (Mandarin); elsewhere None (no signal).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

# The prompt under which Whisper writes Mandarin with punctuation ("what follows are Mandarin
# sentences."): the usual way to get simplified characters and marks from Whisper.
PROMPTS: Dict[str, str] = {"zh": "以下是普通话的句子。"}
END_MARKS = ("。", "？", "！", "?", "!", ".")
# Marks stripped from the end of the words before asking what comes next.
TRAILING = "。？！?!.，,、；;：: "


class EndMarkScorer:
    """P(sentence-end mark next) for texts on encoded audio; `model` is faster-whisper's
    WhisperModel (its `.model` the ctranslate2 Whisper), `tokenizers` builds its Tokenizer for a
    language (faster_whisper.tokenizer.Tokenizer(model.hf_tokenizer, True, task, language))."""

    def __init__(self, model: Any, tokenizer_for: Any):
        self.model = model
        self._tokenizer_for = tokenizer_for
        self._cache: Dict[str, Any] = {}  # language -> (tokenizer, prompt ids, end-mark ids)

    @staticmethod
    def supports_language(language: str) -> bool:
        return language in PROMPTS

    def _setup(self, language: str) -> Any:
        if language not in self._cache:
            tok = self._tokenizer_for(language)
            prompt = self.model.get_prompt(tok, tok.encode(PROMPTS[language]), without_timestamps=True)
            ends = [i for i in range(tok.eot) if tok.decode([i]).strip() in END_MARKS]
            self._cache[language] = (tok, prompt, np.asarray(ends, dtype=np.int64))
        return self._cache[language]

    def score(self, encoded: Any, texts: Sequence[str], language: str) -> List[Optional[float]]:
        """One probability per text (the encoder output's items in order); None where the
        language has no prompt or the text has no words."""
        if not self.supports_language(language):
            return [None] * len(texts)
        tok, prompt, ends = self._setup(language)
        bodies = [tok.encode(t.strip().rstrip(TRAILING)) if t.strip().rstrip(TRAILING) else [] for t in texts]
        prompts = [list(prompt) + b for b in bodies]
        # max_length: the prompt, the forced words and a step or two past them (ctranslate2 counts
        # the prompt in it; the logits of the step after the words are the ones read).
        results = self.model.model.generate(encoded, prompts, beam_size=1,
                                            max_length=max(len(p) for p in prompts) + 2,
                                            return_logits_vocab=True, suppress_blank=False, suppress_tokens=[])
        out: List[Optional[float]] = []
        for body, res in zip(bodies, results, strict=True):
            steps = res.logits[0] if res.logits else []
            if not body or len(steps) <= len(body):
                out.append(None)
                continue
            logits = np.asarray(steps[len(body)], dtype=np.float64).reshape(-1)
            p = np.exp(logits - logits.max())
            out.append(float(p[ends].sum() / p.sum()))
        return out

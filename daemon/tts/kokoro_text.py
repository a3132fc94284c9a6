"""Kokoro's text frontend: mixed Chinese/English text -> Kokoro phonemes, all on this machine.

- Chinese runs go through misaki's zh G2P in the form Kokoro v1.0 was trained on (`ZHG2P()`,
  jieba + pypinyin -> IPA with tone arrows);
- English words inside a Chinese reply are looked up in misaki's US English lexicons (gold, then
  silver; the phoneme set Kokoro was trained on), spelt letter by letter when they are short
  all-capital acronyms, and otherwise phonemised by espeak-ng (the copy piper-tts ships) and
  mapped onto misaki's symbols. misaki's own English G2P needs spaCy and a model download.
- `KokoroG2P.segments` keeps the runs apart, so the engine can speak the English ones with an
  English voice (daemon/tts/kokoro_engine.py).
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any, List, Optional, Tuple

CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN_RE = re.compile(r"[A-Za-z]")
# A run of English words (with inner apostrophes/hyphens) or a run of anything else.
_SEGMENT_RE = re.compile(r"([A-Za-z][A-Za-z'\-]*(?:\s+[A-Za-z][A-Za-z'\-]*)*)|([^A-Za-z]+)")
_CAMEL_RE = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")

# espeak-ng IPA -> misaki's symbols (the mapping misaki.espeak.EspeakFallback applies, for
# espeak output without tie bars; longer keys first).
_ESPEAK_TO_MISAKI = (
    ("aɪ", "I"), ("aʊ", "W"), ("eɪ", "A"), ("oʊ", "O"), ("ɔɪ", "Y"), ("dʒ", "ʤ"), ("tʃ", "ʧ"),
    ("ɜː", "ɜɹ"), ("ɚ", "əɹ"), ("ɐ", "ə"), ("r", "ɹ"), ("x", "k"), ("ç", "k"), ("ɬ", "l"),
    ("ː", ""), ("ɾ", "T"), ("ʔ", "t"), ("o", "ɔ"),
)

# espeak-ng keeps global state (the voice): one caller at a time in this process.
_ESPEAK_LOCK = threading.Lock()


def language_of(text: str, language: str = "zh") -> str:
    """Which voice a text needs: "zh" when it holds any CJK character (Chinese or mixed),
    "en" when it holds Latin letters and no CJK, otherwise (digits, symbols) the request's
    language. A pure function: the routing decision, tested without loading anything."""
    if CJK_RE.search(text):
        return "zh"
    if LATIN_RE.search(text):
        return "en"
    return "en" if (language or "zh").lower().startswith("en") else "zh"


# --- text frontend -------------------------------------------------------------------------


class EnglishG2P:
    """English word -> misaki phonemes: lexicon, acronym spelling, espeak-ng for the rest."""

    def __init__(self) -> None:
        import importlib.resources as resources

        data = resources.files("misaki.data")
        self.gold = json.loads((data / "us_gold.json").read_text(encoding="utf-8"))
        self.silver = json.loads((data / "us_silver.json").read_text(encoding="utf-8"))
        self._espeak: Any = None
        self.espeak_words = 0

    def lookup(self, word: str) -> Optional[str]:
        for lexicon in (self.gold, self.silver):
            for key in (word, word.lower(), word.capitalize()):
                v = lexicon.get(key)
                if isinstance(v, dict):
                    v = v.get("DEFAULT")
                if v:
                    return v
        return None

    def espeak(self, word: str) -> str:
        with _ESPEAK_LOCK:
            if self._espeak is None:
                from piper.phonemize_espeak import EspeakPhonemizer

                self._espeak = EspeakPhonemizer()
            ps = "".join("".join(clause) for clause in self._espeak.phonemize("en-us", word))
        for old, new in _ESPEAK_TO_MISAKI:
            ps = ps.replace(old, new)
        self.espeak_words += 1
        return ps

    def word(self, word: str) -> str:
        ps = self.lookup(word)
        if ps:
            return ps
        if word.isupper() and len(word) <= 5:  # GPU, PPT: spelt out
            letters = [p for p in map(self.lookup, word) if p]
            if len(letters) == len(word):
                return "".join(p.replace("ˈ", "ˌ") for p in letters[:-1]) + letters[-1]
        parts = _CAMEL_RE.findall(word)  # WiFi, iPhone: each part when all are known
        if len(parts) > 1:
            looked = [p for p in map(self.lookup, parts) if p]
            if len(looked) == len(parts):
                return "".join(looked)
        return self.espeak(word)

    def __call__(self, text: str) -> str:
        words = [w for w in re.split(r"[\s\-]+", text) if w.strip("'")]
        return " ".join(self.word(w.strip("'")) for w in words)


class KokoroG2P:
    """Mixed Chinese/English text -> a Kokoro phoneme string."""

    def __init__(self) -> None:
        from misaki import zh

        self.zh = zh.ZHG2P()  # version None: the frontend Kokoro v1.0 was trained with
        self.en = EnglishG2P()

    def __call__(self, text: str, language: str = "zh") -> str:
        if language == "en" and not CJK_RE.search(text):
            return self._english(text)
        return re.sub(r"\s+", " ", "".join(f" {ph} " if en else ph for ph, en in self.segments(text))).strip()

    def segments(self, text: str) -> List[Tuple[str, bool]]:
        """Mixed text as (phonemes, is English) runs, in order."""
        out: List[Tuple[str, bool]] = []
        for m in _SEGMENT_RE.finditer(text):
            if m.group(1):
                out.append((self.en(m.group(1)), True))
            elif m.group(2).strip():
                out.append((self.zh(m.group(2))[0], False))
        return out

    def _english(self, text: str) -> str:
        out: List[str] = []
        for m in _SEGMENT_RE.finditer(text):
            if m.group(1):
                out.append(self.en(m.group(1)))
            else:
                out.append(re.sub(r"[^,.!?;:]", " ", m.group(2)))
        return re.sub(r"\s+", " ", " ".join(out)).strip()

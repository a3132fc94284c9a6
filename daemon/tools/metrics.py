"""Character and word error rates for ASR tests and benchmarks.

Normalisation, applied to reference and hypothesis alike (`normalize`):
1. Unicode NFKC: full-width letters, digits and punctuation become their half-width forms
   (`Ｇｏｏｇｌｅ` -> `Google`, `，` -> `,`).
2. Traditional -> simplified Chinese with OpenCC "t2s" (on by default: Whisper writes
   traditional characters for Mandarin), when opencc is installed.
3. Lower case.
4. Punctuation and symbols (Unicode categories P* and S*) become spaces.
5. Runs of whitespace collapse to one space; the ends are stripped.
6. For CER only (`zh_numbers=True`): Arabic numbers are written the way the fixtures' references
   speak them, in Chinese numerals: up to four digits as a quantity (8 -> 八, 22 -> 二十二,
   349 -> 三百四十九, 180 -> 一百八十), longer runs or runs with a leading zero digit by digit
   (phone numbers: 159268 -> 一五九二六八; 1 is read 一, not 幺). Whether a recogniser writes
   八点 or 8点 is formatting (inverse text normalisation), not recognition.

CER compares characters with all whitespace removed (the natural unit for Chinese; an English
word inside Chinese text counts letter by letter). WER compares whitespace-separated words.
WER leaves numbers alone (English "15" vs "fifteen" counts as an error).
Corpus rates (`corpus_cer` / `corpus_wer`) are total edits over total reference length.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Iterable, List, Sequence, Tuple

_T2S: Any = None


def _t2s(text: str) -> str:
    global _T2S
    if _T2S is None:
        try:
            import opencc

            _T2S = opencc.OpenCC("t2s")
        except ImportError:  # pragma: no cover - opencc is a test dependency
            _T2S = False
    return _T2S.convert(text) if _T2S else text


_DIGITS = "零一二三四五六七八九"
_NUMBER = re.compile(r"[0-9]+")


def _read_number(digits: str) -> str:
    """Arabic digits -> Chinese numerals (see rule 6 in the module docstring)."""
    if len(digits) > 4 or (len(digits) > 1 and digits[0] == "0"):
        return "".join(_DIGITS[int(d)] for d in digits)
    n = int(digits)
    if n == 0:
        return "零"
    out, zero = "", False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        d = n // value % 10
        if d == 0:
            zero = bool(out)
            continue
        if zero:
            out += "零"
            zero = False
        out += ("" if (unit == "十" and d == 1 and not out) else _DIGITS[d]) + unit
    return out


def zh_numbers(text: str) -> str:
    return _NUMBER.sub(lambda m: _read_number(m.group(0)), text)


def normalize(text: str, t2s: bool = True, numbers: bool = False) -> str:
    """The normalisation described in the module docstring (`numbers`: rule 6)."""
    text = unicodedata.normalize("NFKC", text)
    if numbers:
        text = zh_numbers(text)
    if t2s:
        text = _t2s(text)
    text = text.lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def edit_distance(ref: Sequence[Any], hyp: Sequence[Any]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    if not ref:
        return len(hyp)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def _chars(text: str, t2s: bool) -> List[str]:
    return list(normalize(text, t2s, numbers=True).replace(" ", ""))


def _words(text: str, t2s: bool) -> List[str]:
    return normalize(text, t2s).split()


def cer_counts(ref: str, hyp: str, t2s: bool = True) -> Tuple[int, int]:
    """(edits, reference characters)."""
    r, h = _chars(ref, t2s), _chars(hyp, t2s)
    return edit_distance(r, h), len(r)


def wer_counts(ref: str, hyp: str, t2s: bool = True) -> Tuple[int, int]:
    """(edits, reference words)."""
    r, h = _words(ref, t2s), _words(hyp, t2s)
    return edit_distance(r, h), len(r)


def cer(ref: str, hyp: str, t2s: bool = True) -> float:
    e, n = cer_counts(ref, hyp, t2s)
    return e / n if n else float(e > 0)


def wer(ref: str, hyp: str, t2s: bool = True) -> float:
    e, n = wer_counts(ref, hyp, t2s)
    return e / n if n else float(e > 0)


def corpus_cer(pairs: Iterable[Tuple[str, str]], t2s: bool = True) -> float:
    """Total character edits over total reference characters for (ref, hyp) pairs."""
    edits = total = 0
    for ref, hyp in pairs:
        e, n = cer_counts(ref, hyp, t2s)
        edits, total = edits + e, total + n
    return edits / total if total else 0.0


def corpus_wer(pairs: Iterable[Tuple[str, str]], t2s: bool = True) -> float:
    edits = total = 0
    for ref, hyp in pairs:
        e, n = wer_counts(ref, hyp, t2s)
        edits, total = edits + e, total + n
    return edits / total if total else 0.0

"""Sentence splitting and text normalisation for TTS: pure functions, no models.

`split_sentences()` cuts a whole text; `SentenceBuffer` cuts a stream of LLM token deltas
into the same sentences as they arrive, so the bridge can send each sentence to TTS the
moment it is complete (the first one is never held back to reach a minimum length).

Boundaries: Chinese 。！？；… always; English . ! ? ; when followed by whitespace or the
end (not decimals like 3.14, not abbreviations like "Mr."); newlines. A clause longer than
`max_chars` is cut at the last comma (，,、：) before the limit, and with no comma at a
space or between CJK characters, never inside an English word.

The first piece: a streamed reply's first sentence is cut at its first clause mark (，、：)
once the clause before it holds FIRST_CLAUSE_MIN_CJK Chinese characters (`first_clause`), so
the first audio leaves after one clause (你好，/ 好的，are pieces of their own). A first clause
longer than FIRST_PIECE_MAX_CJK with no such mark (最近的加油站在前方两公里处。) is cut at a word
boundary (jieba's dictionary) after at most FIRST_WORD_CUT_CJK characters: 最近的加油站 | 在前方...
The synthesis cost of Kokoro grows with the audio, so a shorter first piece is a sooner first
audio. English is never cut there (the daemon's TTS jobs ask for it; see daemon/tts/jobs.py).

`normalize_text()` turns numbers, dates, percentages, times and phone numbers into words
(cn2an for Chinese) before MeloTTS sees them; melo's own ZH normaliser only converts bare
digits (it reads 10:30 as 十三十 and 2024年 as 两千零二十四年), and after ours it finds no
digits left, so nothing is normalised twice.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from typing import List, Optional, Tuple

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHARS = 60
# A comma cut never leaves a piece shorter than this (a 2-character clause sounds clipped).
MIN_CLAUSE_CHARS = 4

# The first clause of a reply is cut off at a clause mark once it holds this many CJK
# characters. 6 kept Kokoro's pace exactly, but its first audio was 0.85-1.2 s on a quiet 2-core
# machine; an opener of 2 (你好，/ 好的，, heard back unchanged by Whisper, spoken ~1.7x slower
# than inside its sentence) leaves in ~0.3 s (BENCHMARKS.md "Streamed synthesis").
FIRST_CLAUSE_MIN_CJK = 2
# A first clause with more CJK characters than this and no clause mark is cut at a word boundary
# after at most FIRST_WORD_CUT_CJK of them (at least FIRST_WORD_MIN_CJK before and after the cut).
FIRST_PIECE_MAX_CJK = 8
FIRST_WORD_CUT_CJK = 6
FIRST_WORD_MIN_CJK = 3
_CLAUSE_MARKS = "，、："

_CJK_TERMINATORS = "。！？；…"
_ASCII_TERMINATORS = "!?;"
_CLOSERS = "\"'”’」』）)]】》"
_COMMAS = "，,、：:"
_ABBREVIATIONS = frozenset("""mr mrs ms dr prof sr jr st vs mt no inc ltd co jan feb mar apr jun jul aug
sep sept oct nov dec e.g i.e a.m p.m u.s fig approx dept est""".split())


def is_speakable(text: str) -> bool:
    """True when text holds at least one letter, digit or CJK character (not only
    punctuation, symbols or emoji)."""
    return any(ch.isalnum() for ch in text)


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def _is_word_char(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def _period_ends_sentence(text: str, i: int, final: bool) -> Optional[bool]:
    """Is the '.' at text[i] a sentence end? None = cannot tell yet (streaming, at the end)."""
    nxt = text[i + 1] if i + 1 < len(text) else ""
    if not nxt:
        if not final:
            return None  # "3." may become "3.14"
    elif nxt == ".":
        return False  # part of "..." : decided at its last dot
    elif not (nxt.isspace() or nxt in _CLOSERS or _is_cjk(nxt)):
        return False  # 3.14, e.g., example.com
    # The word before the dot: abbreviation or single-letter initial?
    j = i
    while j > 0 and (text[j - 1].isalpha() or text[j - 1] == "."):
        j -= 1
    word = text[j:i].lower()
    if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha() and text[j:i].isupper()):
        return False
    return True


def _boundary(text: str, final: bool) -> Tuple[Optional[int], bool]:
    """End index (exclusive) of the first complete sentence in text, or None.

    The flag is True when the answer depends on text not seen yet (streaming must wait).
    """
    n = len(text)
    i = 0
    while i < n:
        ch = text[i]
        end = None
        if ch in _CJK_TERMINATORS or ch == "\n":
            end = i + 1
        elif ch in _ASCII_TERMINATORS:
            nxt = text[i + 1] if i + 1 < n else ""
            if not nxt and not final:
                return None, True  # "?!" or "?)" may follow
            if not nxt or nxt.isspace() or nxt in _CLOSERS or nxt in _ASCII_TERMINATORS or _is_cjk(nxt) \
                    or nxt in _CJK_TERMINATORS:
                end = i + 1
        elif ch == ".":
            decided = _period_ends_sentence(text, i, final)
            if decided is None:
                return None, True
            if decided:
                end = i + 1
        if end is not None:
            # Take following terminators and closing quotes/brackets along.
            while end < n and (text[end] in _CLOSERS or text[end] in _CJK_TERMINATORS
                               or text[end] in _ASCII_TERMINATORS or text[end] == "."):
                end += 1
            return end, False
        i += 1
    return None, False


def _clause_cut(text: str, max_chars: int) -> int:
    """Where to cut a clause longer than max_chars: after the last comma that leaves at
    least MIN_CLAUSE_CHARS on the left; else at a space; else between CJK characters;
    else (one huge English word) at max_chars."""
    limit = min(len(text), max_chars)
    for i in range(limit - 1, MIN_CLAUSE_CHARS - 1, -1):
        ch = text[i]
        if ch in _COMMAS:
            if ch in ":," and i + 1 < len(text) and text[i + 1].isdigit() and text[i - 1].isdigit():
                continue  # 10:30, 1,000
            return i + 1
    for i in range(limit - 1, MIN_CLAUSE_CHARS - 1, -1):
        if text[i].isspace():
            return i + 1
    for i in range(limit, MIN_CLAUSE_CHARS - 1, -1):
        if i < len(text) and not (_is_word_char(text[i - 1]) and _is_word_char(text[i])):
            return i
    return limit


def _first_clause_end(text: str, min_cjk: int, limit: int) -> Optional[int]:
    """End (exclusive) of the first clause in text[:limit] that holds at least min_cjk CJK
    characters and ends at a clause mark (，、：), or None."""
    cjk = 0
    for i in range(min(limit, len(text))):
        ch = text[i]
        if _is_cjk(ch):
            cjk += 1
        elif ch in _CLAUSE_MARKS and cjk >= min_cjk:
            end = i + 1
            while end < len(text) and text[end] in _CLOSERS:
                end += 1
            return end
    return None


def _units(text: str) -> int:
    """A piece's length as Chinese characters: each CJK character 1, each Latin word 2."""
    return sum(map(_is_cjk, text)) + 2 * len(re.findall(r"[A-Za-z]+", text))


# Words that open what follows them: a first piece never ends with one (打开WiFi | 然后播放...).
_OPENING_WORDS = frozenset("然后 而且 但是 所以 因为 如果 或者 还是 以及 并且 虽然 可是 不过 于是 就是 只是 "
                           "可以 需要 应该 已经 正在 没有".split())


def _may_end_piece(word: str) -> bool:
    """A word a first piece may end with: a Latin word, or 2+ CJK characters that do not open
    what follows (a single character is mostly a particle or a numeral: 的, 在, 一)."""
    if re.fullmatch(r"[A-Za-z]+", word):
        return True
    return sum(map(_is_cjk, word)) >= 2 and len(word) == sum(map(_is_cjk, word)) and word not in _OPENING_WORDS


# Single characters a piece may open with: prepositions and adverbs that start a phrase
# (最近的加油站 | 在前方两公里处). Others mostly attach to the word before (的, 里, 我 after 提醒).
_OPENING_CHARS = frozenset("在从给和跟把向往对就也都还再又才要会去")


def _may_open_piece(word: str) -> bool:
    """A word the rest may start with: a Latin word, 2+ CJK characters not starting with a
    particle, or one of _OPENING_CHARS."""
    if re.fullmatch(r"[A-Za-z]+", word):
        return True
    if len(word) == 1:
        return word in _OPENING_CHARS
    return _is_cjk(word[0]) and word[0] not in "的了着过们里上中地得吗呢吧啊"


def _first_word_cut(text: str, end: int) -> Optional[int]:
    """Where the first sentence text[:end] (mostly Chinese, no clause mark early enough) is cut at
    a word boundary: the last boundary after at most FIRST_WORD_CUT_CJK units with at least
    FIRST_WORD_MIN_CJK units before and FIRST_WORD_MIN_CJK CJK characters after, or None."""
    sentence = text[:end]
    marks = [i for i, ch in enumerate(sentence) if ch in _CLAUSE_MARKS]
    span = sentence[:marks[0]] if marks else sentence  # only the first clause is cut
    if sum(map(_is_cjk, span)) <= FIRST_PIECE_MAX_CJK:
        return None
    import jieba  # dictionary segmentation (the Kokoro G2P's own; loaded once per process)

    best, at = None, 0
    words = jieba.lcut(span, HMM=False)
    for word, nxt in zip(words, words[1:]):
        at += len(word)
        before = _units(span[:at])
        if before > FIRST_WORD_CUT_CJK:
            break
        if before >= FIRST_WORD_MIN_CJK and sum(map(_is_cjk, sentence[at:])) >= FIRST_WORD_MIN_CJK \
                and _may_end_piece(word) and _may_open_piece(nxt):
            best = at
    return best


def first_clause(text: str, min_cjk: int = FIRST_CLAUSE_MIN_CJK,
                 max_chars: int = DEFAULT_MAX_CHARS) -> Tuple[str, str]:
    """A whole text's first clause and the rest, (clause, rest), when its first sentence has a
    clause mark after at least min_cjk CJK characters; else ("", text)."""
    stripped = _drop_leading_strays(text)
    end, _ = _boundary(stripped, True)
    cut = _first_piece_end(stripped, min_cjk, end if end is not None else len(stripped), max_chars)
    if cut is None or not is_speakable(stripped[cut:]):
        return "", text
    return stripped[:cut], stripped[cut:]


def _first_piece_end(text: str, min_cjk: int, end: Optional[int], max_chars: int) -> Optional[int]:
    """End of the first piece: its first clause (`_first_clause_end`), else a word cut in its
    first sentence (`_first_word_cut`) once that sentence's end is known (end not None)."""
    cut = _first_clause_end(text, min_cjk, min(end if end is not None else len(text), max_chars))
    if cut is None and end is not None and end <= max_chars:
        cut = _first_word_cut(text, end)
    return cut


def _take(text: str, max_chars: int, final: bool, clause: int = 0) -> Tuple[Optional[str], str]:
    """Split one sentence off the front of text: (sentence or None, rest). clause > 0: a first
    clause of at least that many CJK characters, or a word cut in a long first clause, ends the
    piece (`first_clause`)."""
    end, waiting = _boundary(text, final)
    if clause:
        cut = _first_piece_end(text, clause, end if end is not None or not final else len(text), max_chars)
        if cut is not None and (final is False or is_speakable(text[cut:])):
            return text[:cut], text[cut:]
    if end is not None and end <= max_chars:
        return text[:end], text[end:]
    if len(text) > max_chars:
        # Long clause: cut at a comma before the limit, sentence end or not.
        cut = _clause_cut(text, max_chars)
        return text[:cut], text[cut:]
    if end is not None:
        return text[:end], text[end:]
    if final and text:
        return text, ""
    return None, text


def _drop_leading_strays(text: str) -> str:
    """Text without the closers/terminators/commas at its front: nothing before them to attach to."""
    stripped = text.lstrip()
    while stripped and not stripped[0].isalnum() and stripped[0] in (
            _CLOSERS + _CJK_TERMINATORS + _ASCII_TERMINATORS + "." + _COMMAS):
        stripped = stripped[1:].lstrip()
    return stripped


def _clean(piece: str) -> str:
    return re.sub(r"\s+", " ", piece).strip()


def split_sentences(text: str, max_chars: int = DEFAULT_MAX_CHARS, first_clause_cjk: int = 0) -> List[str]:
    """Split text into sentences for synthesis (see module docstring).

    Pieces with nothing speakable (only punctuation or emoji) are attached to the sentence
    before them, or dropped when they come first. Whitespace is collapsed. first_clause_cjk > 0:
    the first sentence's first clause of at least that many CJK characters is a piece of its own.
    """
    if max_chars < MIN_CLAUSE_CHARS * 2:
        raise ValueError(f"max_chars must be at least {MIN_CLAUSE_CHARS * 2}")
    out: List[str] = []
    # As SentenceBuffer does: a stray closer or terminator at the very front is dropped before
    # cutting, so a long first clause is cut at the same place whether it streams in or not.
    rest = _drop_leading_strays(text)
    while rest:
        piece, rest = _take(rest, max_chars, final=True, clause=0 if out else first_clause_cjk)
        if piece is None:  # pragma: no cover - final=True always takes something
            break
        # Strays right after a sentence belong to it (SentenceBuffer, having sent the sentence,
        # drops them): either way they do not count towards the next clause's length.
        stripped = _drop_leading_strays(rest)
        piece, rest = piece + rest[:len(rest) - len(stripped)], stripped
        _append(out, piece)
    return out


def _append(out: List[str], piece: str) -> None:
    piece = _clean(piece)
    if not piece:
        return
    if is_speakable(piece):
        out.append(piece)
    elif out:
        out[-1] = out[-1] + piece


class SentenceBuffer:
    """Cut a stream of text deltas (LLM tokens) into sentences as soon as each is complete.

    >>> b = SentenceBuffer()
    >>> b.push("你好。今天")
    ['你好。']
    >>> b.push("天气不错！")
    ['今天天气不错！']
    >>> b.flush()
    []
    """

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS, first_clause_cjk: int = 0):
        if max_chars < MIN_CLAUSE_CHARS * 2:
            raise ValueError(f"max_chars must be at least {MIN_CLAUSE_CHARS * 2}")
        self.max_chars = max_chars
        # > 0: the first piece may be the first sentence's first clause (`first_clause`).
        self.first_clause_cjk = first_clause_cjk
        self._buf = ""
        self.emitted = 0

    def drop_partial(self) -> str:
        """Drop the text after the last complete sentence (a reply that broke off); returns it."""
        dropped, self._buf = self._buf, ""
        return dropped

    @property
    def pending(self) -> str:
        """Text received but not yet returned as a sentence."""
        return self._buf

    def push(self, delta: str) -> List[str]:
        """Add a delta; return the sentences it completed (possibly none)."""
        self._buf += delta
        out: List[str] = []
        while True:
            # A leading piece with nothing speakable (a stray closing quote or "！" that
            # arrived after its sentence was sent) cannot be spoken on its own: drop it.
            self._buf = _drop_leading_strays(self._buf)
            first = not out and not self.emitted
            piece, rest = _take(self._buf, self.max_chars, final=False,
                                clause=self.first_clause_cjk if first else 0)
            if piece is None:
                break
            self._buf = rest
            _append(out, piece)
        self.emitted += len(out)
        return out

    def flush(self) -> List[str]:
        """End of stream: return whatever is left, split into sentences."""
        rest, self._buf = self._buf, ""
        out = split_sentences(rest, self.max_chars, 0 if self.emitted else self.first_clause_cjk)
        self.emitted += len(out)
        return out


# --- normalisation ------------------------------------------------------------------

_FULLWIDTH = {c: c - 0xFEE0 for c in list(range(0xFF10, 0xFF1A)) + list(range(0xFF21, 0xFF3B))
              + list(range(0xFF41, 0xFF5B))}
_TIME_RE = re.compile(r"(?<![\d.])([01]?\d|2[0-3])[:：]([0-5]\d)(?:[:：]([0-5]\d))?(?![\d])")
_LONG_DIGITS_RE = re.compile(r"(?<![\d.])\d{7,}(?![\d.])")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_ZH_DIGITS = "零一二三四五六七八九"
_MELO_SPEAKABLE_RE = re.compile(r"[\u4e00-\u9fa5A-Za-z]")


def _zh_int(s: str) -> str:
    import cn2an

    return cn2an.an2cn(str(int(s)))


def _zh_time(m: "re.Match[str]") -> str:
    h, mi, se = m.group(1), m.group(2), m.group(3)
    out = _zh_int(h) + "点"
    if int(mi):
        out += ("零" if int(mi) < 10 else "") + _zh_int(mi) + "分"
    if se is not None and int(se):
        out += _zh_int(se) + "秒"
    return out


def _en_time(m: "re.Match[str]") -> str:
    from num2words import num2words

    h, mi = int(m.group(1)), int(m.group(2))
    if mi == 0:
        return f"{num2words(h)} o'clock"
    return f"{num2words(h)} {'oh ' if mi < 10 else ''}{num2words(mi)}"


def normalize_text(text: str, language: str = "zh") -> str:
    """Numbers, dates, percentages, times and phone numbers to words.

    zh: 10:30 -> 十点三十分, 2024年5月1日 -> 二零二四年五月一日, 50% -> 百分之五十,
    13812345678 -> 一三八一二三四五六七八 (7+ digits are read digit by digit), 3.14 -> 三点一四.
    en: the same with num2words (10:30 -> ten thirty, 50% -> fifty percent).
    Full-width digits and letters are folded to ASCII first.
    """
    text = unicodedata.normalize("NFC", text).translate(_FULLWIDTH)
    text = _THOUSANDS_RE.sub("", text)
    if language.lower().startswith("en"):
        return _normalize_en(text)
    text = _TIME_RE.sub(_zh_time, text)
    text = _LONG_DIGITS_RE.sub(lambda m: "".join(_ZH_DIGITS[int(d)] for d in m.group(0)), text)
    try:
        import cn2an

        text = cn2an.transform(text, "an2cn")
    except Exception as e:  # cn2an raises on odd inputs; melo still converts bare digits
        logger.debug("cn2an.transform failed on %r: %s", text[:40], e)
    return text


def _normalize_en(text: str) -> str:
    from num2words import num2words

    text = _TIME_RE.sub(_en_time, text)
    text = re.sub(r"(\d+(?:\.\d+)?)\s*%", lambda m: f"{m.group(1)} percent", text)
    text = _LONG_DIGITS_RE.sub(lambda m: " ".join(num2words(int(d)) for d in m.group(0)), text)

    def number(m: "re.Match[str]") -> str:
        s = m.group(0)
        try:
            return num2words(float(s)) if "." in s else num2words(int(s))
        except (ValueError, OverflowError, NotImplementedError):
            return s

    return re.sub(r"\d+(?:\.\d+)?", number, text)


def melo_speakable(text: str) -> bool:
    """True when MeloTTS's ZH frontend keeps something of text: it drops everything but
    CJK characters (U+4E00..U+9FA5), ASCII letters and a little punctuation."""
    return bool(_MELO_SPEAKABLE_RE.search(text))

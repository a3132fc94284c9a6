"""Make the PyPI Kokoro-82M int8 ONNX export speak reliably: its convolutions back to float32.

The export (kokoro-onnx's `kokoro-v1.0.int8.onnx`) quantises every weight to int8 and every
activation dynamically: a convolution is DynamicQuantizeLinear -> ConvInteger -> (+ bias quantised
at run time) -> Cast -> Mul(scale). On this machine's CPU onnxruntime 1.23's ConvInteger returns
wrong sums for some inputs: the prosody predictor's first F0 convolution came out ~200x too large,
the decoder's F0/N inputs exploded, and about half of all Mandarin sentences were near-silence with
non-finite spikes at the ends (Whisper heard nothing). With the 87 convolutions computed in float32
from the same dequantised weights ((w - zero_point) * scale) every test sentence is clean. The
linear layers (MatMulInteger) and LSTMs stay int8. The file grows from 92 MB to 256 MB.

`split` then cuts that file in two for the CPU (BENCHMARKS.md "Kokoro's decoder in bfloat16"): the
decoder's convolutions, 3/4 of a sentence's time, run 2x faster in bfloat16 through OpenVINO where
the CPU has bf16 instructions, but the harmonic source feeding them (a running phase sum, then sin)
must stay float32 or every tone goes wrong. The encoder file holds everything up to and including
that source's spectrum (onnxruntime, float32 as before); the decoder file, OpenVINO IR with float16
weights, the rest. daemon/tts/kokoro_runtime.py runs them.

Used by `s2s-models bundled`; needs the `onnx` and `openvino` packages, the daemon only `openvino`.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

# The whole model as `convert` writes it (its convolutions float): the file name s2s-models installs
# (daemon/models/store.py) and the engine loads (daemon/tts/kokoro_engine.py).
MODEL_FILE = "kokoro-v1.0.int8-floatconv.onnx"
# The two halves `split` writes beside the model (the .xml's weights in a .bin beside it).
SPLIT_ENCODER = "kokoro-v1.0.encoder.onnx"
SPLIT_DECODER = "kokoro-v1.0.decoder.xml"
# Where the cut is: the harmonic source's spectrum, the input of the generator's noise convolutions.
_CUT_CONSUMER = "/generator/noise_convs.0/"
_DECODER = "/decoder/decoder/"


def float_convs(model: Any) -> int:
    """Rewrite, in place, each DynamicQuantizeLinear -> ConvInteger [-> Add(bias)] -> Cast -> Mul
    chain of an onnx ModelProto as one float Conv; returns how many were rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    consumers: Dict[str, List[Any]] = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}

    def only(name: str, op: str) -> Any:
        users = consumers[name]
        if len(users) != 1 or users[0].op_type != op:
            raise ValueError(f"unexpected graph after {name}: {[u.op_type for u in users]}, wanted {op}")
        return users[0]

    replace: Dict[int, Any] = {}
    drop: Set[int] = set()
    new_inits = []
    for conv in [n for n in g.node if n.op_type == "ConvInteger"]:
        quant = producer[conv.input[0]]
        if quant.op_type != "DynamicQuantizeLinear":
            raise ValueError(f"{conv.name}: input is not dynamically quantised")
        chain = [conv]
        nxt = consumers[conv.output[0]][0]
        bias = None
        if nxt.op_type == "Add":  # bias quantised at run time: Cast(Floor(Div(bias, scale))) reshaped
            reshape = producer[nxt.input[1] if nxt.input[0] == conv.output[0] else nxt.input[0]]
            div = producer[producer[producer[reshape.input[0]].input[0]].input[0]]
            if div.op_type != "Div" or div.input[0] not in inits:
                raise ValueError(f"{conv.name}: unexpected bias quantisation")
            bias = div.input[0]
            chain.append(nxt)
            nxt = only(nxt.output[0], "Cast")
        elif nxt.op_type != "Cast":
            raise ValueError(f"{conv.name}: unexpected {nxt.op_type} after ConvInteger")
        chain.append(nxt)
        mul = only(nxt.output[0], "Mul")
        chain.append(mul)
        scales = producer[mul.input[1]]
        w_scale = next(i for i in scales.input if i in inits)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[conv.input[3]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[w_scale]).astype(np.float32)
        if scale.size > 1:  # per output channel
            per_channel = (-1,) + (1,) * (w.ndim - 1)
            scale = scale.reshape(per_channel)
            zp = zp.reshape(per_channel) if zp.size > 1 else zp
        name = conv.input[1] + "_float"
        new_inits.append(numpy_helper.from_array(((w - zp) * scale).astype(np.float32), name))
        node = helper.make_node("Conv", [quant.input[0], name] + ([bias] if bias else []), [mul.output[0]],
                                name=conv.name + "_float")
        node.attribute.extend(conv.attribute)
        drop.update(id(n) for n in chain)
        replace[id(mul)] = node
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop or id(n) in replace]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    _prune(g)
    return len(replace)


def _prune(g: Any) -> None:
    """Drop nodes whose outputs nobody reads and initializers no node reads."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        keep = [n for n in g.node if any(o in used for o in n.output)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    keep_inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits)


def convert(src: Path, dst: Path) -> int:
    """src (the int8 export) -> dst with float convolutions; returns the number rewritten."""
    import onnx

    model = onnx.load(str(src))
    n = float_convs(model)
    onnx.save(model, str(dst))
    return n


def import_openvino() -> Any:
    """The openvino package, never with its telemetry: `import openvino` sends an event to Google
    Analytics through openvino-telemetry when that package is importable (requirements-nodeps.txt
    leaves it out); marked absent here, openvino takes its own no-op stub."""
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino

    return openvino


def _cut(g: Any) -> Tuple[List[Any], List[Any], List[str]]:
    """(encoder nodes, decoder nodes, the tensors the decoder reads from the encoder)."""
    conv = next(n for n in g.node if _CUT_CONSUMER in n.name and n.op_type == "Conv")
    producer = {o: n for n in g.node for o in n.output}
    consumers: Dict[str, List[Any]] = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    source: Set[int] = set()  # everything the harmonic source's spectrum is computed from
    stack = [conv.input[0]]
    while stack:
        n = producer.get(stack.pop())
        if n is not None and id(n) not in source:
            source.add(id(n))
            stack.extend(i for i in n.input if i)
    decoder = {id(n) for n in g.node if n.name.startswith(_DECODER) and id(n) not in source}
    todo = [n for n in g.node if id(n) in decoder]
    while todo:  # and whatever is computed from the decoder's own tensors (shape arithmetic)
        for o in todo.pop().output:
            for c in consumers[o]:
                if id(c) not in decoder:
                    decoder.add(id(c))
                    todo.append(c)
    inputs = {i.name for i in g.input}
    cut: List[str] = []
    for n in g.node:
        if id(n) not in decoder:
            continue
        for i in n.input:
            p = producer.get(i)
            if i and i not in cut and (i in inputs or (p is not None and id(p) not in decoder
                                                         and p.op_type != "Constant")):
                cut.append(i)
    enc = [n for n in g.node if id(n) not in decoder]
    constants = [n for n in enc if n.op_type == "Constant"]  # copied into the decoder where it reads them
    return enc, constants + [n for n in g.node if id(n) in decoder], cut


def _graph(model: Any, nodes: List[Any], inputs: List[Any], outputs: List[Any], name: str) -> Any:
    from onnx import helper

    g = helper.make_graph(list(nodes), name, inputs, outputs)
    used = {i for n in nodes for i in n.input}
    g.initializer.extend(t for t in model.graph.initializer if t.name in used)
    _prune(g)
    return helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _cut_types(encoder: bytes, cut: List[str]) -> List[Any]:
    """The cut tensors' types, from two runs of the encoder half (onnx's shape inference does not
    know onnxruntime's contrib ops): a dimension that differs between the runs is dynamic."""
    import numpy as np
    import onnxruntime as ort
    from onnx import helper

    sess = ort.InferenceSession(encoder, providers=["CPUExecutionProvider"])
    runs = [dict(zip(cut, sess.run(cut, {"tokens": np.array([[0] + [50, 83, 156] * k + [0]], dtype=np.int64),
                                         "style": np.full((1, 256), 0.1, np.float32),
                                         "speed": np.ones(1, np.float32)}))) for k in (2, 5)]
    return [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(runs[0][name].dtype),
                                          [a if a == b else None for a, b in zip(runs[0][name].shape,
                                                                                  runs[1][name].shape)])
            for name in cut]


def split(model_file: Path) -> Tuple[Path, Path]:
    """Write SPLIT_ENCODER (onnx) and SPLIT_DECODER (OpenVINO IR, float16 weights) beside
    model_file, each through a temporary name; returns their paths."""
    import onnx

    ov = import_openvino()
    model = onnx.load(str(model_file))
    g = model.graph
    enc_nodes, dec_nodes, cut = _cut(g)
    enc = _graph(model, enc_nodes, list(g.input), [onnx.ValueInfoProto(name=c) for c in cut], "kokoro-encoder")
    enc_bytes = enc.SerializeToString()
    dec = _graph(model, dec_nodes, _cut_types(enc_bytes, cut), list(g.output), "kokoro-decoder")
    d = model_file.parent
    enc_path, dec_path = d / SPLIT_ENCODER, d / SPLIT_DECODER
    tmp_onnx = d / (SPLIT_DECODER + ".onnx.part")
    tmp_enc = d / (SPLIT_ENCODER + ".part")
    tmp_xml = d / ("part." + SPLIT_DECODER)  # its .bin beside it
    try:
        tmp_enc.write_bytes(enc_bytes)
        onnx.save(dec, str(tmp_onnx))
        ov.save_model(ov.Core().read_model(str(tmp_onnx)), str(tmp_xml), compress_to_fp16=True)
        os.replace(tmp_xml.with_suffix(".bin"), dec_path.with_suffix(".bin"))
        os.replace(tmp_xml, dec_path)
        os.replace(tmp_enc, enc_path)
    finally:  # what a failed split left (after a success these are gone already)
        for tmp in (tmp_onnx, tmp_enc, tmp_xml, tmp_xml.with_suffix(".bin")):
            tmp.unlink(missing_ok=True)
    return enc_path, dec_path

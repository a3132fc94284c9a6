"""Make the PyPI Kokoro-82M int8 ONNX export speak reliably: its convolutions back to float32.

The export (kokoro-onnx's `kokoro-v1.0.int8.onnx`) quantises every weight to int8 and every
activation dynamically: a convolution is DynamicQuantizeLinear -> ConvInteger -> (+ bias quantised
at run time) -> Cast -> Mul(scale). On this machine's CPU onnxruntime 1.23's ConvInteger returns
wrong sums for some inputs: the prosody predictor's first F0 convolution came out ~200x too large,
the decoder's F0/N inputs exploded, and about half of all Mandarin sentences were near-silence with
non-finite spikes at the ends (Whisper heard nothing). With the 87 convolutions computed in float32
from the same dequantised weights ((w - zero_point) * scale) every test sentence is clean. The
linear layers (MatMulInteger) and LSTMs stay int8. The file grows from 92 MB to 256 MB.

Used once, by `s2s-models bundled`; needs the `onnx` package, the daemon does not.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Dict, List, Set


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

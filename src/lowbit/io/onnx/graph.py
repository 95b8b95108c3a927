"""Rewriting an exported float transformer graph so each quantized layer holds lowbit's codes.

The TorchScript exporter writes ``nn.Linear`` as ``MatMul(x, Transpose(W))`` (3-D inputs) or
``Gemm(x, W, b, transB=1)`` (2-D), ``nn.Embedding`` as ``Gather(table, ids)``, with ``W`` / ``table`` initializers
named after the parameters. :func:`rewrite` replaces those nodes in place (the graph stays in topological order)
and drops what no node reads any more (the float weights, their Transposes).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.io.onnx.matmulnbits import matmulnbits_tensors
from lowbit.kernels.int8_int8 import int8_weight

MS_DOMAIN = "com.microsoft"


class _Builder:
    """New nodes and initializers, with unique names under one layer's prefix."""

    def __init__(self, model: Any):
        self.graph = model.graph
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.names: set[str] = {i.name for i in model.graph.initializer}
        self.act_cache: dict[tuple, tuple[str, str]] = {}  # (input, act scheme, static scale) -> (codes, scale)

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self.names:
            self.names.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs))
        return output


def _matmulnbits(b: _Builder, name: str, m: nn.Module, x: str, out: str) -> None:
    t = matmulnbits_tensors(m.qweight)
    ins = [x, b.init(f"{name}.qweight.B", t.B), b.init(f"{name}.qweight.scales", t.scales)]
    if t.zero_points is not None:
        ins.append(b.init(f"{name}.qweight.zero_points", t.zero_points))
    b.node("MatMulNBits", ins, out, domain=MS_DOMAIN, **t.attrs)


def _act_codes(b: _Builder, x: str, m: nn.Module, opset: int) -> tuple[str, str]:
    """lowbit's int8 activation codes of ``x`` (:func:`lowbit.kernels.activations.quantize_activation`) as uint8
    ``code + 128``, and their scale (per token ``(..., 1)``, or the static scalar). Layers reading the same ``x``
    with the same scheme (q, k, v) share one quantization, as their codes are the same."""
    key = (x, m.act_scheme, None if m.act_scale is None else float(m.act_scale))
    if key in b.act_cache:
        return b.act_cache[key]
    p = f"{x}.int8_{len(b.act_cache)}"
    if m.act_scheme == "int8-dynamic":
        a = b.node("Abs", [x], f"{p}.abs")
        if opset >= 18:
            amax = b.node("ReduceMax", [a, b.init(f"{p}.axes", np.array([-1], np.int64))], f"{p}.amax", keepdims=1)
        else:
            amax = b.node("ReduceMax", [a], f"{p}.amax", axes=[-1], keepdims=1)
        amax = b.node("Max", [amax, b.init("act.eps", np.array(1e-8, np.float32))], f"{p}.amax_clamped")
        s = b.node("Div", [amax, b.init("act.qmax", np.array(127.0, np.float32))], f"{p}.scale")
    else:  # int8-static: the calibrated scale, as lowbit casts it to the activations' dtype
        s = b.init(f"{p}.scale", np.array(float(m.act_scale.to(torch.float32)), np.float32))
    # codes + 128 as uint8 with zero point 128: the same int32 sums, on onnxruntime's fast u8 x s8 GEMM (its
    # s8 x s8 MatMulInteger runs ~40x slower on x86)
    q = b.node("Round", [b.node("Div", [x, s], f"{p}.scaled")], f"{p}.rounded")
    q = b.node("Add", [q, b.init("act.offset", np.array(128.0, np.float32))], f"{p}.offset_codes")
    q = b.node("Clip", [q, b.init("act.lo", np.array(1.0, np.float32)), b.init("act.hi", np.array(255.0, np.float32))],
               f"{p}.clipped")  # [-127, 127] + 128
    q = b.node("Cast", [q], f"{p}.codes", to=2)  # UINT8
    b.act_cache[key] = (q, s)
    return q, s


def _int8_int8(b: _Builder, name: str, m: nn.Module, x: str, out: str, opset: int, bias: str | None) -> None:
    """lowbit's W8A8 arithmetic (:mod:`lowbit.kernels.int8_int8`): the int8 codes of ``x``, the exact int32
    product with the int8 weight, rescaled in float32 (``MatMulIntegerToFloat``: ``acc * s_w + bias``, then
    ``* s_x``; lowbit multiplies ``acc * s_x * s_w + bias``: the same up to float32 rounding)."""
    codes, w_scale = int8_weight(m)  # (out, in) int8, (out,) float32
    q, s = _act_codes(b, x, m, opset)
    # the weight as uint8 code + 128 with zero point 128 (lowbit's own stored form): u8 x u8. onnxruntime's u8 x s8
    # GEMM on AVX2 (no VNNI) sums pairs of u8*s8 products in saturating int16 (vpmaddubsw), which clipped W8A8
    # outputs by up to 11% of their range on an AVX2-only EPYC; u8 x u8 sums in int32 everywhere
    u8 = (codes.to(torch.int16) + 128).to(torch.uint8)
    w = b.init(f"{name}.qweight.uint8_t", u8.T.contiguous().numpy())  # (in, out)
    ins = [q, w, b.init("act.one", np.array(1.0, np.float32)),
           b.init(f"{name}.qweight.scale", w_scale.numpy().astype(np.float32)),
           b.init("act.zero_point", np.array(128, np.uint8)), b.init("act.zero_point", np.array(128, np.uint8))]
    y = b.node("MatMulIntegerToFloat", ins, f"{name}.int8_matmul", domain=MS_DOMAIN)
    if bias is None:
        b.node("Mul", [y, s], out)
    else:
        b.node("Add", [b.node("Mul", [y, s], f"{name}.times_act_scale"), bias], out)


def _dq_rows(b: _Builder, name: str, m: nn.Module, ids: str, out: str) -> None:
    """Rows ``ids`` of an int8 table, dequantized after the lookup (``(code - 128) * s`` = lowbit's decode): only
    the rows looked up are converted, as lowbit's QEmbedding does."""
    q = m.qweight  # per row: the table reads as a per-channel int8 weight
    rows, cols = q.shape
    codes = (q.codes_grouped().reshape(rows, -1)[:, :cols].to(torch.int16) - 128).to(torch.int8)
    table = b.init(f"{name}.qweight.int8", codes.numpy())
    scale = b.init(f"{name}.qweight.scale", q.qparams()[0].reshape(rows, 1).numpy().astype(np.float32))
    r = b.node("Cast", [b.node("Gather", [table, ids], f"{out}.codes", axis=0)], f"{out}.codes_float", to=1)
    b.node("Mul", [r, b.node("Gather", [scale, ids], f"{out}.scales", axis=0)], out)


def rewrite(model: Any, layers: dict[str, tuple[nn.Module, str]], opset: int) -> dict[str, int]:
    """Replace the float nodes of ``layers`` (``{exported module path: (lowbit layer, kind)}``) in ``model``;
    returns how many nodes each layer now serves."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    owner = {f"{n}.weight": n for n in layers}
    by_value: dict[str, str | None] = {}

    def linear_for(value: str) -> str | None:
        """The linear layer whose weight ``value`` is: by its name, through the exporter's Identity nodes (it
        writes a weight equal to another, a tied head, as ``Identity(other)``), else by value."""
        while True:
            name = owner.get(value)
            if name is not None and layers[name][1].startswith(("matmulnbits", "int8-int8")):
                return name
            src = producer.get(value)
            if src is None or src.op_type != "Identity":
                break
            value = src.input[0]
        if value not in inits:
            return None
        init_name = value
        if init_name not in by_value:  # merged by the exporter with an equal weight (a tied head): find it by value
            arr = torch.from_numpy(numpy_helper.to_array(inits[init_name]).copy())
            by_value[init_name] = next(
                (n for n, (m, k) in layers.items() if k.startswith(("matmulnbits", "int8-int8"))
                 and tuple(m.qweight.shape) == tuple(arr.shape)
                 and torch.equal(m.qweight.dequantize(torch.float32), arr)), None)
        return by_value[init_name]

    b = _Builder(model)
    counts: Counter[str] = Counter()
    for node in g.node:
        target = None  # (layer, x, out, bias)
        if node.op_type == "MatMul":
            src = producer.get(node.input[1])
            if src is not None and src.op_type == "Transpose":
                name = linear_for(src.input[0])
                if name is not None:
                    target = (name, node.input[0], node.output[0], None)
        elif node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0 \
                    and attrs.get("beta", 1.0) == 1.0:
                name = linear_for(node.input[1])
                if name is not None:
                    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
                    target = (name, node.input[0], node.output[0], bias)
        elif node.op_type == "Gather" and _through_identity(node.input[0], producer, owner) is not None:
            name = _through_identity(node.input[0], producer, owner)
            counts[name] += 1
            if layers[name][1] == "embedding-int8":
                _dq_rows(b, name.removeprefix("m."), layers[name][0], node.input[1], node.output[0])
                continue
            # otherwise a float table: the stand-in's dequantized values, kept as they are
        if target is None:
            b.nodes.append(node)
            continue
        name, x, out, bias = target
        m, kind = layers[name]
        short = name.removeprefix("m.")
        if kind == "int8-int8":
            _int8_int8(b, short, m, x, out, opset, bias)
        else:
            mm_out = out if bias is None else f"{short}.matmul"
            _matmulnbits(b, short, m, x, mm_out)
            if bias is not None:
                b.node("Add", [mm_out, bias], out)
        counts[name] += 1
    del g.node[:]
    g.node.extend(b.nodes)
    g.initializer.extend(b.inits)
    _prune(model)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return dict(counts)


def _through_identity(value: str, producer: dict[str, Any], owner: dict[str, str]) -> str | None:
    """The layer owning ``value`` or a value it is an Identity of (the exporter's form of merged equal weights)."""
    while value not in owner:
        src = producer.get(value)
        if src is None or src.op_type != "Identity":
            return None
        value = src.input[0]
    return owner[value]


def _prune(model: Any) -> None:
    """Drop nodes whose outputs nothing reads, then initializers no node reads (the float weights)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    used = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(used)
    names = defaultdict(int)
    for i in g.initializer:
        names[i.name] += 1
    assert all(v == 1 for v in names.values()), "duplicate initializer names"

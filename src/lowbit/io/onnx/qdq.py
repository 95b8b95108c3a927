"""A full-integer model (see :mod:`lowbit.model.static`) as an ONNX QDQ graph that onnxruntime runs on int8 kernels.

Every activation point becomes QuantizeLinear → DequantizeLinear with lowbit's own scale and zero-point; every
quantized conv / linear reads its weight as lowbit's stored codes (int8 + 128 as uint8, zero point 128; not
re-rounded) through a per-channel DequantizeLinear, and its bias as int32 codes on the input-scale × weight-scale
grid. onnxruntime fuses DQ → Conv → (ReLU/Clip) → Q into QLinearConv (uint8 activations on x86), adds into
QLinearAdd, and so on. The weights are uint8, not int8, because onnxruntime's u8 × s8 kernels on AVX2 without
VNNI add pairs of products in saturating int16 (``vpmaddubsw``): on an AVX2-only EPYC a tiny CNN's logits came
out 12 quantization steps off; u8 × u8 sums in int32 on every x86 CPU.

The graph is traced by torch's TorchScript exporter from a float stand-in (the same ops, dequantized weights,
``fake_quantize_per_tensor_affine`` at the points), whose initializers keep the parameter names; the weights
are then swapped for their codes. Whatever the stand-in computes is what lowbit's own model computes.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_file
from lowbit.model.qmodules import QConv2d, QLinear
from lowbit.model.static import ActQuant, bias_grid, input_act, is_full_integer

OPSET = 17


@dataclass
class QDQReport:
    path: str
    bytes: int
    quantized_layers: int
    activation_points: int
    float_layers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class _FakeQuant(nn.Module):
    """An ActQuant as the exporter sees it: ``fake_quantize_per_tensor_affine`` is QuantizeLinear + DequantizeLinear."""

    def __init__(self, aq: ActQuant):
        super().__init__()
        self.scale, self.zp, self.qmin, self.qmax = float(aq.scale), int(aq.zero_point), aq.qmin, aq.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zp, self.qmin, self.qmax)


def _stand_in(qmodel: nn.Module) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A float copy of ``qmodel`` for tracing, and per quantized layer what its initializers must become."""
    gm = copy.deepcopy(qmodel)
    acts_by_layer = {node.target: input_act(qmodel, node) for node in qmodel.graph.nodes if node.op == "call_module"}
    layers: dict[str, dict[str, Any]] = {}
    for name, mod in list(gm.named_modules()):
        if isinstance(mod, ActQuant):
            new: nn.Module = _FakeQuant(mod)
        elif isinstance(mod, QConv2d | QLinear):
            q = mod.qweight
            if q.scheme.number_format.name != "int8" or not q.scheme.symmetric or q.scheme.granularity not in (
                    "channel", "tensor"):
                raise LowbitError(f"layer {name}: scheme {q.scheme.name} has no QDQ form here (int8 per channel or "
                                  f"per tensor, symmetric)")
            s = q.qparams()[0].reshape(-1)
            s = s.expand(q.shape[0]).contiguous() if s.numel() == 1 else s
            codes = (q.codes.to(torch.int16) - 128).to(torch.int8).reshape(q.shape)  # stored offset by 128
            if isinstance(mod, QConv2d):
                new = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                                mod.dilation, mod.groups, bias=mod.bias is not None)
                codes = codes.reshape(new.weight.shape)
            else:
                new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                new.weight.copy_(mod.weight.reshape(new.weight.shape))
                if mod.bias is not None:
                    new.bias.copy_(mod.bias)
            aq = acts_by_layer.get(name)
            layers[name] = {"codes": codes, "scale": s, "act": aq, "qweight": q, "bias": mod.bias}
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
    return gm.eval(), layers


def write_qdq_onnx(qmodel: nn.Module, path: str | os.PathLike, example_inputs: tuple[torch.Tensor, ...], *,
                   force: bool = False, opset: int = OPSET) -> QDQReport:
    """Write ``qmodel`` (from ``quantize_static``) as a QDQ ONNX file; inputs ``input`` (``input_1`` …), batch axis
    dynamic; output ``output``."""
    import onnx

    if not is_full_integer(qmodel):
        raise LowbitError("export onnx (QDQ): the model is not a full-integer lowbit model "
                          "(quantize it with act='int8-static' first)")
    out = Path(path)
    if out.exists() and not force:
        raise LowbitError(f"{out}: exists (pass force=True / --force to overwrite)")
    stand_in, layers = _stand_in(qmodel)
    names = ["input"] + [f"input_{i}" for i in range(1, len(example_inputs))]
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(stand_in, tuple(example_inputs), buf, dynamo=False, opset_version=opset,
                          input_names=names, output_names=["output"], do_constant_folding=True,
                          dynamic_axes={n: {0: "batch"} for n in [*names, "output"]})
    model = onnx.load_from_string(buf.getvalue())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    report = QDQReport(str(out), 0, 0, sum(isinstance(m, ActQuant) for m in qmodel.modules()))
    new_nodes, drop = [], set()
    for name, info in layers.items():
        wname, bname = f"{name}.weight", f"{name}.bias"
        if wname not in inits:
            raise LowbitError(f"layer {name}: the traced graph holds no initializer {wname} (an exporter change?)")
        users = consumers.get(wname, [])
        if len(users) != 1 or users[0].op_type not in ("Conv", "Gemm"):
            raise LowbitError(f"layer {name}: its weight is used by {[u.op_type for u in users]}, not one Conv/Gemm")
        op = users[0]
        if op.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in op.attribute):
            raise LowbitError(f"layer {name}: Gemm without transB (an exporter change?)")
        w_scale = info["scale"].numpy().astype(np.float32)
        zp = op.op_type == "Gemm"
        u8 = (info["codes"].to(torch.int16) + 128).to(torch.uint8).numpy()  # see _dq: u8 weights, zero point 128
        new_nodes += _dq(g, f"{name}.weight", u8, w_scale, True, zero=128)
        drop.add(wname)
        if info["bias"] is not None and bname in inits:
            if info["act"] is None:
                report.warnings.append(f"{name}: its input is not on an integer grid; bias kept in float")
            else:
                codes, s = bias_grid(info["bias"], info["act"], info["qweight"])
                new_nodes += _dq(g, f"{name}.bias", codes.numpy(), s.numpy().astype(np.float32), zp)
                drop.add(bname)
        report.quantized_layers += 1
    kept = [i for i in g.initializer if i.name not in drop]
    del g.initializer[:]
    g.initializer.extend(kept)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + nodes)  # DequantizeLinear of the constants first: the graph stays topological
    model.producer_name, model.producer_version = "lowbit", _version()
    onnx.checker.check_model(model)
    with atomic_file(out) as tmp:
        onnx.save_model(model, str(tmp))
    report.bytes = out.stat().st_size
    report.float_layers = [n for n, m in qmodel.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return report


def _dq(g, name: str, codes: np.ndarray, scale: np.ndarray, zero_point: bool, zero: int = 0) -> list:
    """Initializers ``name_quantized`` / ``_scale`` (/ ``_zero_point``, all 0) and the DequantizeLinear (axis 0) that
    rebuilds tensor ``name`` from them. Without ``zero_point`` the operator's default, 0 of the codes' type, holds:
    onnxruntime fuses convolutions either way, but fuses a Gemm into QGemm only with the zero-points written."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.ascontiguousarray(codes), f"{name}_quantized"),
             numpy_helper.from_array(scale, f"{name}_scale")]
    if zero_point:
        inits.append(numpy_helper.from_array(np.full(len(scale), zero, codes.dtype), f"{name}_zero_point"))
    g.initializer.extend(inits)
    return [helper.make_node("DequantizeLinear", [i.name for i in inits], [name], name=f"{name}_dequantize", axis=0)]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowbit")
    except PackageNotFoundError:
        return "0"

"""ONNX export of lowbit-quantized transformers: causal LMs (logits) and encoders (last hidden state).

How: a float stand-in of the model (every quantized layer replaced by a float layer holding lowbit's dequantized
weight) is exported by torch's TorchScript exporter (``dynamo=False``, no constant folding: every linear weight
stays an initializer named after its parameter, behind a Transpose), then the graph is rewritten with the ``onnx``
API so each quantized layer holds lowbit's own codes (nothing is quantized again):

==========================================  =================================================================
lowbit layer                                ONNX
==========================================  =================================================================
QLinear int2/int4/int8, groups or channels  ``com.microsoft.MatMulNBits`` (see :mod:`lowbit.io.onnx.matmulnbits`)
QLinear int8 per channel + int8 activations per-token absmax (or the static scale) -> Round -> Clip -> uint8
(W8A8: ``act=int8-dynamic|int8-static``)    codes + 128, ``MatMulIntegerToFloat`` (zero point 128) x act scale
QEmbedding int8 per row                     ``Gather`` of the int8 rows and their scales, then ``Cast`` x scale
QEmbedding of any other scheme              float table (lowbit's dequantized values; a report warning)
==========================================  =================================================================

Graphs: causal LMs take ``input_ids`` and ``attention_mask`` (int64, ``(batch, seq)``) and give ``logits``
``(batch, seq, vocab)``: one full forward, no KV cache (a generation loop re-runs the prefix). Encoders take
``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the model has them) and give
``last_hidden_state``. Attention is exported in its eager form (explicit mask), so padded batches are right.

Exactness: MatMulNBits dequantizes ``(code - zero) * scale`` in float32 as lowbit does, so every weight equals
``qweight.dequantize(torch.float32)`` bit for bit; logits differ from lowbit's float32 reference kernels by float
summation order only (SmolLM2 int4-g64: KL 2e-11). W8A8 layers compute lowbit's int8-int8 arithmetic: the same
activation codes (the same float32 division, round-half-even), the exact int32 sum, then the rescale in float32
(one layer: ~1e-7 relative). Over a whole model a 1-ulp difference upstream now and then moves a value across a
rounding boundary, and attention spreads that token's change: MiniLM's hidden states end ~3-5% (relative L2) from
lowbit's own W8A8 run, with the same cosine to the float model. MatMulNBits runs with onnxruntime's default
``accuracy_level`` (float32 A); level 4 (int8 A) is faster but no longer lowbit's arithmetic.

>>> report = write_transformer_onnx(qmodel, "tiny-int4.onnx")   # 2 blocks × 7 linears (SmolLM2: 210 of them)
>>> report.layers
{'embedding-int8': 1, 'matmulnbits-4bit': 14, 'matmulnbits-8bit': 1}
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_file, remove_leftovers
from lowbit.io.onnx import graph as G
from lowbit.io.onnx.matmulnbits import why_not
from lowbit.model.arch import arch_for_type
from lowbit.model.qmodules import QEmbedding, QLinear

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 14
EXTERNAL_DATA_BYTES = 1_800_000_000  # above this the tensors go to ``<file>.data`` beside the .onnx (protobuf: 2 GB)
ACT_INT8 = ("int8-dynamic", "int8-static")


@dataclass
class TransformerOnnxReport:
    path: str
    kind: str  # "causal-lm" or "encoder"
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    layers: dict[str, int] = field(default_factory=dict)  # how many layers became each kind of node
    bytes_on_disk: int = 0  # the .onnx file plus its external data file, if any
    external_data: str | None = None  # the external data file's name, when the tensors live beside the graph
    opset: int = DEFAULT_OPSET
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- what each layer becomes ---------------------------------------------------------------------------------


def _layer_kind(name: str, mod: nn.Module) -> str:
    """The ONNX form of one quantized layer ("matmulnbits-4bit", "int8-int8", "embedding-int8", "embedding-float");
    LowbitError naming the layer where none fits."""
    q = mod.qweight
    if isinstance(mod, QEmbedding):
        s = q.scheme
        if s.block is None and s.format == "int8" and s.symmetric and s.granularity == "channel":
            return "embedding-int8"
        return "embedding-float"
    act = mod.act_scheme
    if act is not None:
        s = q.scheme
        if act not in ACT_INT8:
            raise LowbitError(f"layer {name}: {act} activations have no ONNX Runtime int8 form (int8-dynamic, "
                              f"int8-static do)")
        if not (s.block is None and s.format == "int8" and s.symmetric and s.granularity == "channel"):
            raise LowbitError(f"layer {name}: {act} activations with {s.name} weights: the ONNX int8 path takes "
                              f"int8 weights per channel (symmetric)")
        return "int8-int8"
    why = why_not(q)
    if why is not None:
        raise LowbitError(f"layer {name}: {q.scheme.name} cannot be exported as MatMulNBits: {why}")
    return f"matmulnbits-{q.scheme.bits}bit"


def _model_kind(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    info = arch_for_type(getattr(config, "model_type", None))
    cls = type(model).__name__
    if info is not None and info.causal and cls.endswith("ForCausalLM"):
        return "causal-lm"
    if info is not None and not info.causal and cls.endswith("Model"):
        return "encoder"
    raise LowbitError(f"{cls}: the transformer ONNX export takes a causal LM (…ForCausalLM of a known family) or a "
                      f"bare encoder (BertModel …)")


# -- the float stand-in ----------------------------------------------------------------------------------------


class _FloatLinear(nn.Linear):
    """A QLinear's float stand-in: lowbit's dequantized weight, after its per-input-channel divisor if any."""

    def __init__(self, m: QLinear):
        super().__init__(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        self.weight = nn.Parameter(m.qweight.dequantize(torch.float32), requires_grad=False)
        if m.bias is not None:
            self.bias = nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)
        self.input_scale = None if m.input_scale is None else m.input_scale.detach().float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale
        return F.linear(x, self.weight, self.bias)


class _FloatEmbedding(nn.Embedding):
    def __init__(self, m: QEmbedding):
        super().__init__(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx, device="meta")
        self.weight = nn.Parameter(m.qweight.dequantize(torch.float32), requires_grad=False)
        self.embed_scale = None if m.embed_scale is None else m.embed_scale.detach().float().clone()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids)
        return rows if self.embed_scale is None else rows * self.embed_scale


def _stand_in(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` with every quantized layer a float layer of its dequantized weight."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QLinear | QEmbedding)}
    memo = {id(m): None for m in quantized.values()}  # deepcopy skips the quantized layers: replaced below
    out = copy.deepcopy(model, memo)
    for name, m in quantized.items():
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr,
                _FloatLinear(m) if isinstance(m, QLinear) else _FloatEmbedding(m))
    out = out.float().eval()
    out.config.use_cache = False
    out.config._attn_implementation = "eager"  # an explicit additive mask: padded batches export right
    return out


class _Graph(nn.Module):
    """The traced function: named tensors in, one tensor out (logits or last_hidden_state)."""

    def __init__(self, model: nn.Module, kind: str, names: tuple[str, ...]):
        super().__init__()
        self.m, self.kind, self.names = model, kind, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.names, args, strict=True))
        if self.kind == "causal-lm":
            kwargs["use_cache"] = False
        out = self.m(**kwargs)
        return out.logits if self.kind == "causal-lm" else out.last_hidden_state


def _example_inputs(model: nn.Module, kind: str, given: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if given is not None:
        out = {k: torch.as_tensor(v).long() for k, v in given.items()}
        if "input_ids" not in out:
            raise LowbitError("example_inputs: needs input_ids (and optionally attention_mask, token_type_ids)")
    else:
        vocab = model.config.vocab_size
        ids = torch.arange(16).reshape(2, 8) * 7 % vocab
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # a padded row: the mask path is traced, never skipped
        out = {"input_ids": ids, "attention_mask": mask}
    out.setdefault("attention_mask", torch.ones_like(out["input_ids"]))
    takes_types = kind == "encoder" and getattr(model.config, "type_vocab_size", 0) > 0
    if takes_types:
        out.setdefault("token_type_ids", torch.zeros_like(out["input_ids"]))
    else:
        out.pop("token_type_ids", None)
    order = ("input_ids", "attention_mask", "token_type_ids")
    return {k: out[k] for k in order if k in out}


def outputs_of(kind: str) -> str:
    return "logits" if kind == "causal-lm" else "last_hidden_state"


def _export_float(stand_in: nn.Module, kind: str, inputs: dict[str, torch.Tensor], opset: int, path: Path) -> None:
    names = tuple(inputs)
    output = outputs_of(kind)
    axes = {n: {0: "batch", 1: "sequence"} for n in (*names, output)}
    with torch.no_grad():
        torch.onnx.export(_Graph(stand_in, kind, names), tuple(inputs.values()), str(path), dynamo=False,
                          input_names=list(names), output_names=[output], dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=False)


# -- the entry point --------------------------------------------------------------------------------------------


def write_transformer_onnx(qmodel: nn.Module, path: str | os.PathLike, *,
                           example_inputs: Mapping[str, torch.Tensor] | None = None, opset: int | None = None,
                           force: bool = False, progress: Callable[[str], None] | None = None
                           ) -> TransformerOnnxReport:
    """Write a lowbit-quantized causal LM or encoder as one ``.onnx`` file for onnxruntime (CPU).

    ``example_inputs`` (``{"input_ids": …, "attention_mask": …}``) are what the exporter traces with (default: a
    batch of two rows of 8 tokens, one left-padded); batch and sequence stay dynamic. ``opset`` defaults to
    17 (>= 14). The file is written atomically; an existing ``path`` is refused unless ``force``. ``progress``,
    if given, is called with a short line per step.

    >>> qmodel, _ = lowbit.quantize(model, tok, scheme="int4-g64")
    >>> write_transformer_onnx(qmodel, "model.onnx").layers["matmulnbits-4bit"]
    14
    """
    t0 = time.perf_counter()
    say = progress or (lambda msg: log.info(msg))
    dest = Path(path)
    if dest.exists() and not force:
        raise LowbitError(f"{dest}: already exists (pass force=True / --force to replace it)")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise LowbitError(f"opset {opset}: the transformer export needs opset >= {MIN_OPSET}")
    kind = _model_kind(qmodel)
    quantized = {n: m for n, m in qmodel.named_modules() if isinstance(m, QLinear | QEmbedding)}
    if not any(isinstance(m, QLinear) for m in quantized.values()):
        raise LowbitError("the model has no lowbit-quantized linear layers: quantize it first (lowbit.quantize)")
    kinds = {n: _layer_kind(n, m) for n, m in quantized.items()}
    report = TransformerOnnxReport(str(dest), kind, opset=opset)
    floated = [n for n, k in kinds.items() if k == "embedding-float"]
    if floated:
        report.warnings.append(f"{', '.join(floated)}: {quantized[floated[0]].qweight.scheme.name} embeddings written "
                               f"as float tables (lowbit's dequantized values; the int8 form takes int8 per row)")
    inputs = _example_inputs(qmodel, kind, example_inputs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent))
    try:
        say("exporting the float stand-in (TorchScript)")
        float_file = work / "float.onnx"
        _export_float(_stand_in(qmodel), kind, inputs, opset, float_file)
        import onnx

        model = onnx.load(str(float_file))
        say("rewriting quantized layers")
        in_graph = {i.name for i in model.graph.initializer} | {i for n in model.graph.node for i in n.input}
        counts = G.rewrite(model, {f"m.{n}": (m, kinds[n]) for n, m in quantized.items()}, opset)
        served = {n for n in quantized if counts.get(f"m.{n}", 0)}
        missing = sorted(n for n in quantized if n not in served and f"m.{n}.weight" in in_graph)
        if missing:
            raise LowbitError(f"layer {missing[0]}: its weight is in the exported graph but no MatMul / Gemm / Gather "
                              f"the export knows reads it; the export cannot place it")
        unused = [n for n in quantized if n not in served]
        if unused:
            report.warnings.append(f"{', '.join(unused)}: not in the graph (it does not feed {outputs_of(kind)})")
        report.layers = dict(Counter(kinds[n] for n in quantized if n in served))
        report.inputs = [i.name for i in model.graph.input]
        report.outputs = [o.name for o in model.graph.output]
        say(f"writing {dest}")
        report.external_data = _save(model, dest, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.bytes_on_disk = dest.stat().st_size + (
        (dest.parent / report.external_data).stat().st_size if report.external_data else 0)
    report.seconds = time.perf_counter() - t0
    return report


def _save(model: Any, dest: Path, work: Path) -> str | None:
    """Write ``model`` to ``dest`` atomically; tensors beside it in ``<name>.data`` when the graph is too big for one
    protobuf. Returns the external data file's name, or None."""
    import onnx

    if model.ByteSize() < EXTERNAL_DATA_BYTES:
        with atomic_file(dest) as tmp:
            onnx.save_model(model, str(tmp))
        stale = dest.with_name(dest.name + ".data")
        stale.unlink(missing_ok=True)  # a data file of an earlier, larger export of this path
        return None
    data_name = dest.name + ".data"
    staged = work / "out"
    staged.mkdir()
    onnx.save_model(model, str(staged / dest.name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    os.replace(staged / data_name, dest.parent / data_name)  # the data first: the graph names it
    os.replace(staged / dest.name, dest)
    return data_name


__all__ = ["TransformerOnnxReport", "write_transformer_onnx"]

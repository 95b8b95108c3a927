"""Hugging Face export: a lowbit model as a compressed-tensors ``pack-quantized`` checkpoint.

``transformers`` loads it natively (``AutoModelForCausalLM.from_pretrained(out)``, with the
``compressed-tensors`` package installed; ``pip install lowbit[hf]``): the format llm-compressor writes for vLLM.

Layout::

    out/
      config.json            the transformers config + ``quantization_config`` (compressed-tensors)
      model.safetensors      per packed linear layer: weight_packed (int32), weight_scale, weight_shape and, when
                             asymmetric, weight_zero_point (int32, packed along the rows); every other tensor in float
      generation_config.json, tokenizer files

What is packed: linear layers at int2 / int4 / int8 with a scale per output channel, per group or per tensor,
symmetric or with integer zero-points. What is written as float (lowbit's dequantized values, so the numbers do
not change; listed in ``ignore`` and as report warnings): embeddings and a head tied to them (the format packs
linear layers only), and linear layers whose scheme the format cannot hold (int3/5/6, whose int32 packing differs
between compressed-tensors releases; nf4, fp8, float zero-points) -- with ``strict=True`` the latter are an error.
Layers that quantize their activations (W8A8) are refused: this export is weight-only.

Exactness: compressed-tensors dequantizes in the dtype of the scales, so scales are stored in float32 for a
float32 model (lowbit's fp16 scales are exact there) and transformers' weights equal ``qweight.dequantize()`` bit
for bit. (In a bf16/fp16 model transformers casts the scales to the model's dtype: exact only when lowbit's
scales already are in it, e.g. ``-sbf16``; otherwise the report warns.) A group size that does not divide a
row (SmolLM2's 576 with groups of 128) is re-expressed with the largest group size that divides every row of that
scheme (64), each scale repeated: the same numbers, more scales.

Loading quirk (transformers 5.23, compressed-tensors 0.20): asymmetric pack-quantized layers load only through
transformers' dequantize-at-load path, which applies one scheme to every layer. An export with asymmetric layers
therefore keeps one scheme packed (the one covering the most weights), writes other quantized linear layers as
float (with a warning) and sets ``"dequantize": true`` in its ``quantization_config``.

>>> report = export_hf(qmodel, "tiny-int4-hf", tokenizer=tok)
>>> hf = transformers.AutoModelForCausalLM.from_pretrained("tiny-int4-hf")
>>> torch.equal(hf.model.layers[0].self_attn.q_proj.weight,
...             qmodel.model.layers[0].self_attn.q_proj.qweight.dequantize())
True
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.core.qtensor import QTensor
from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir
from lowbit.io.save import add_plain_tensors, save_companions
from lowbit.model.qmodules import QEmbedding, QLinear, quantized_state_keys
from lowbit.primitives.numformats import IntFormat
from lowbit.primitives.packing import pack, unpack

WEIGHTS_FILE = "model.safetensors"
FORMAT = "pack-quantized"
# widths whose int32 layout (32 // bits codes per word) is the same in every compressed-tensors release and vLLM
PACKABLE_BITS = (2, 4, 8)


@dataclass(frozen=True)
class CTScheme:
    """One compressed-tensors weight scheme (``QuantizationArgs``): ``group_size`` None means per channel."""

    bits: int
    symmetric: bool
    group_size: int | None

    def args(self) -> dict[str, Any]:
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                "strategy": "channel" if self.group_size is None else "group", "group_size": self.group_size,
                "dynamic": False, "actorder": None}

    @property
    def label(self) -> str:
        ranges = "channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}-{ranges}-{'sym' if self.symmetric else 'asym'}"


@dataclass
class LayerExport:
    name: str
    scheme: str  # lowbit's scheme
    stored: str  # "packed" (with ``ct`` the compressed-tensors scheme) or "float"
    ct: str = ""
    note: str = ""


@dataclass
class HFExportReport:
    path: str
    layers: list[LayerExport] = field(default_factory=list)
    dequantize_on_load: bool = False
    bytes_on_disk: int = 0
    packed_bpw: float = 0.0  # bits per weight of the packed layers (codes + scales + zero-points)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def packed(self) -> list[str]:
        return [r.name for r in self.layers if r.stored == "packed"]

    @property
    def floated(self) -> list[str]:
        """Layers lowbit quantized that were written as float."""
        return [r.name for r in self.layers if r.stored == "float"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- tensors ---------------------------------------------------------------------------------------------


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``(rows, cols)`` into int32 words ``(rows, ceil(cols * bits / 32))`` as
    compressed-tensors does: code ``j`` of a word in bits ``[j * bits, (j + 1) * bits)``, the row's tail
    padded with zero codes. That is lowbit's own bit order read as little-endian words, row by row.

    >>> pack_int32(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), 4).tolist()  # 0xF7654321
    [[-144358623]]
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"int32 packing of {bits}-bit codes is not portable (supported: {PACKABLE_BITS})")
    rows, cols = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, (-cols) % (32 // bits)))
    return _words(pack(padded, bits), rows)  # every row now fills whole 4-byte words


def _words(raw: torch.Tensor, rows: int) -> torch.Tensor:
    """Packed bytes whose rows fill whole 4-byte words, as int32 words ``(rows, -1)`` (little-endian)."""
    raw = raw.reshape(-1, 4)
    if sys.byteorder == "big":
        raw = raw.flip(-1)
    return raw.contiguous().view(torch.int32).reshape(rows, -1)


def pack_quantized(q: QTensor, group_size: int | None, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors (names without the layer prefix) of a 2-D integer QTensor ``(rows, cols)``.

    Stored codes are ``q - qmin`` of the scheme's grid; compressed-tensors stores ``x_q + 2**(bits-1)`` with
    ``x_q`` on the signed grid and dequantizes ``(x_q - zp) * scale``, so the unsigned codes and zero-points
    go in unchanged. ``group_size`` must divide the scheme's (None: one scale per row, also for per-tensor).
    """
    s = q.scheme
    fmt = s.number_format
    rows, cols = q.shape
    if (cols * fmt.bits) % 32 == 0:  # rows fill whole words: lowbit's packed bytes already are them
        packed = _words(q.codes, rows)
    else:
        packed = pack_int32(unpack(q.codes, fmt.bits, q.numel).reshape(rows, cols), fmt.bits)
    scale, zero = q.qparams()  # (R, G, 1) float32; R = 1 per tensor

    def per_layout(t: torch.Tensor) -> torch.Tensor:  # (R, G, 1) -> (rows, cols // group_size) or (rows, 1)
        t = t.reshape(t.shape[0], -1).expand(rows, -1)
        if group_size is not None:
            t = t.repeat_interleave(s.group_size // group_size, dim=1)[:, : cols // group_size]
        return t.contiguous()

    out = {"weight_packed": packed,
           "weight_scale": per_layout(scale).to(scale_dtype),
           "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    if zero is not None:
        zu = per_layout(zero - fmt.qmin).round().to(torch.uint8)  # (rows, G')
        out["weight_zero_point"] = pack_int32(zu.T, fmt.bits).T.contiguous()  # packed along the rows
    return out


# -- which layer goes how ----------------------------------------------------------------------------------


def _why_not_packed(q: QTensor, target: nn.Module) -> str | None:
    s = q.scheme
    if not isinstance(target, nn.Linear):
        return f"{type(target).__name__} layers are not packed (the format packs nn.Linear)"
    if s.block is not None:
        return f"{s.name} is a GGML block type (export it as GGUF); compressed-tensors has no such layout"
    if not isinstance(s.number_format, IntFormat):
        return f"{s.name} is not an integer grid"
    if s.bits not in PACKABLE_BITS:
        return f"{s.bits}-bit codes have no portable pack-quantized layout (int2, int4, int8 do)"
    if s.zero_dtype not in (None, "int"):
        return "float zero-points have no compressed-tensors form"
    return None


def _skeleton(model: nn.Module, config: Any) -> nn.Module:
    """The model class built from ``config`` without memory: names, layer types, shapes and ties to check against."""
    with torch.device("meta"):
        return type(model)(config)


def _tie_groups(skeleton: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = defaultdict(list)
    for n, p in skeleton.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(n)
    return [names for names in by_id.values() if len(names) > 1]


def _origin(model: nn.Module, param_name: str) -> int:
    """Identity of what the lowbit model holds at ``param_name``: its QTensor, else its parameter."""
    mod_name, _, attr = param_name.rpartition(".")
    mod = model.get_submodule(mod_name)
    return id(mod.qweight) if isinstance(mod, QLinear | QEmbedding) else id(getattr(mod, attr))


def _resolve_ties(model: nn.Module, config: Any) -> tuple[nn.Module, set[str]]:
    """The skeleton matching the export and the parameter names written through a tie (not stored themselves).

    A head lowbit quantized apart from its tied embedding (a different scheme) is untied in the config."""
    skeleton = _skeleton(model, config)
    groups = _tie_groups(skeleton)
    if any(len({_origin(model, n) for n in g}) > 1 for g in groups):
        if not hasattr(config, "tie_word_embeddings"):
            raise LowbitError(f"{', '.join(groups[0])}: tied in {type(model).__name__} but quantized apart; "
                              "cannot untie them in this config")
        config.tie_word_embeddings = False
        skeleton = _skeleton(model, config)
        groups = _tie_groups(skeleton)
        if any(len({_origin(model, n) for n in g}) > 1 for g in groups):
            raise LowbitError(f"{', '.join(groups[0])}: tied in {type(model).__name__} but quantized apart")
    return skeleton, {n for g in groups for n in g[1:]}


def _plan(model: nn.Module, skeleton: nn.Module, tied: set[str], strict: bool,
          report: HFExportReport) -> dict[str, CTScheme]:
    """Layer -> compressed-tensors scheme for the packed layers; fills ``report.layers`` for every quantized one."""
    tied_layers = {n.rpartition(".")[0] for n in tied}
    candidates: dict[str, QTensor] = {}
    floated: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, QLinear | QEmbedding):
            continue
        try:
            target = skeleton.get_submodule(name)
        except AttributeError:
            raise LowbitError(f"layer {name}: not in a {type(model).__name__} built from its config") from None
        if isinstance(mod, QEmbedding):
            floated[name] = "embeddings are written as float (the format packs linear layers only)"
            continue
        if mod.act_scheme is not None or mod.input_scale is not None:
            raise LowbitError(f"layer {name}: quantizes its activations ({mod.act_scheme or 'input scale'}); the "
                              f"compressed-tensors export is weight-only: quantize without activation quantization")
        if name in tied_layers:
            floated[name] = "tied to the embeddings: written once, as float"
            continue
        why = _why_not_packed(mod.qweight, target)
        if why is not None:
            if strict:
                raise LowbitError(f"layer {name}: {mod.qweight.scheme.name} cannot be stored as compressed-tensors "
                                  f"{FORMAT}: {why} (export without strict to write it as float)")
            floated[name] = why
            continue
        candidates[name] = mod.qweight
    sizes = _group_sizes(candidates, report)
    ct = {n: CTScheme(q.scheme.bits, q.scheme.symmetric, sizes.get(q.scheme.name)) for n, q in candidates.items()}
    if any(not c.symmetric for c in ct.values()) and len(set(ct.values())) > 1:
        # transformers' dequantize-at-load path (the only one that reads asymmetric layers) takes one scheme
        weight: dict[CTScheme, int] = defaultdict(int)
        for n, c in ct.items():
            weight[c] += candidates[n].numel
        keep = max(weight, key=weight.__getitem__)
        for n in [n for n, c in ct.items() if c != keep]:
            if strict:
                raise LowbitError(f"layer {n}: {candidates[n].scheme.name} cannot be packed beside the asymmetric "
                                  f"{keep.label} layers: transformers loads those with one scheme for every layer")
            floated[n] = f"transformers loads asymmetric checkpoints with one scheme for every layer ({keep.label})"
            del ct[n]
    by_reason: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, mod in model.named_modules():
        if name in ct:
            report.layers.append(LayerExport(name, mod.qweight.scheme.name, "packed", ct[name].label))
        elif name in floated:
            report.layers.append(LayerExport(name, mod.qweight.scheme.name, "float", note=floated[name]))
            by_reason[(mod.qweight.scheme.name, floated[name])].append(name)
    for (scheme, why), names in by_reason.items():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        report.warnings.append(f"{', '.join(names[:3])}{more}: {scheme} written as float: {why}")
    if not ct:
        linear = [(n, w) for n, w in floated.items() if isinstance(model.get_submodule(n), QLinear)]
        detail = f"{linear[0][0]}: {linear[0][1]}" if linear else "it has no quantized linear layers"
        raise LowbitError(f"no layer of this model can be stored as compressed-tensors {FORMAT} (int2/int4/int8 "
                          f"linear layers): {detail}")
    return ct


def _group_sizes(candidates: dict[str, QTensor], report: HFExportReport) -> dict[str, int]:
    """Per grouped lowbit scheme, the largest group size dividing its own and every row it covers (576, g128 -> 64)."""
    sizes: dict[str, int] = {}
    for q in candidates.values():
        if q.scheme.granularity == "group":
            sizes[q.scheme.name] = math.gcd(sizes.get(q.scheme.name, q.scheme.group_size), q.shape[1])
    for name, g in sizes.items():
        orig = next(q.scheme.group_size for q in candidates.values() if q.scheme.name == name)
        if g != orig:
            report.warnings.append(f"{name}: groups of {orig} do not divide every row; stored as groups of {g} "
                                   f"(the same numbers, each scale repeated {orig // g}x)")
    return sizes


# -- the checkpoint ----------------------------------------------------------------------------------------


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return next((m.qweight.dtype for m in model.modules() if isinstance(m, QLinear | QEmbedding)), torch.float32)


def _tensors(model: nn.Module, skeleton: nn.Module, ct: dict[str, CTScheme], tied: set[str],
             dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, QLinear | QEmbedding) or f"{name}.weight" in tied:
            continue
        q = mod.qweight
        if name in ct:
            # scales in a dtype that holds lowbit's exactly: compressed-tensors dequantizes in the scales' dtype
            sdt = dtype if getattr(torch, q.scheme.scale_dtype) == dtype else torch.float32
            out.update({f"{name}.{k}": v for k, v in pack_quantized(q, ct[name].group_size, sdt).items()})
            continue
        w = q.dequantize()
        if not isinstance(skeleton.get_submodule(name), nn.Linear | nn.Embedding):  # Conv1D: (in, out)
            w = w.T
        out[f"{name}.weight"] = w.contiguous()
    add_plain_tensors(model, out, skip=tied | quantized_state_keys(model))
    expected = {k: v for k, v in skeleton.state_dict().items() if k not in tied}
    for name in ct:
        expected.pop(f"{name}.weight")
    packed = {k for k in out if k.rpartition(".")[0] in ct and k.rpartition(".")[2].startswith("weight_")}
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected) - packed)
    wrong = [k for k, v in expected.items() if k in out and tuple(out[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise LowbitError(f"the exported tensors do not fit a {type(model).__name__} built from its config ({detail})")
    return out


def quantization_config(ct: dict[str, CTScheme], ignore: list[str], dequantize: bool) -> dict[str, Any]:
    """The ``quantization_config`` of config.json: one config group per scheme, ``ignore`` naming float linears."""
    by_scheme: dict[CTScheme, list[str]] = defaultdict(list)
    for name, c in ct.items():
        by_scheme[c].append(name)
    single = len(by_scheme) == 1
    groups = {f"group_{i}": {"targets": ["Linear"] if single else names, "weights": c.args(),
                             "input_activations": None, "output_activations": None, "format": FORMAT}
              for i, (c, names) in enumerate(by_scheme.items())}
    qc: dict[str, Any] = {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
                          "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None}
    if dequantize:
        qc["dequantize"] = True  # read by transformers' CompressedTensorsConfig (see the module docstring)
    return qc


def export_hf(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, force: bool = False, *,
              strict: bool = False) -> HFExportReport:
    """Write a lowbit-quantized transformers model as a compressed-tensors checkpoint transformers loads.

    The directory is written atomically; an existing ``out_dir`` is refused unless ``force``. Layers the format
    cannot pack are written as float and reported (``strict=True``: an error for linear layers instead).

    >>> report = export_hf(qmodel, "tiny-int4-hf", tokenizer=tok)
    >>> round(report.packed_bpw, 2), report.floated   # lm_head: int8 beside asymmetric int4 (see the module doc)
    (4.28, ['model.embed_tokens', 'lm_head'])
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not force:
        raise LowbitError(f"{out}: already exists (pass force=True / --force to replace it)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise LowbitError(f"{type(model).__name__}: the Hugging Face export needs a transformers model (with .config)")
    if not any(isinstance(m, QLinear | QEmbedding) for m in model.modules()):
        raise LowbitError("the model has no lowbit-quantized layers: quantize it first (lowbit.quantize)")
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    dtype = _float_dtype(model)
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
    report = HFExportReport(str(out))
    skeleton, tied = _resolve_ties(model, config)
    ct = _plan(model, skeleton, tied, strict, report)
    tensors = _tensors(model, skeleton, ct, tied, dtype)
    ignore = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in ct]
    report.dequantize_on_load = any(not c.symmetric for c in ct.values())
    off = sorted({m.qweight.scheme.scale_dtype for n, m in model.named_modules() if n in ct} - {str(dtype)[6:]})
    if dtype != torch.float32 and off and not report.dequantize_on_load:
        report.warnings.append(f"{', '.join(off)} scales in a {str(dtype)[6:]} model: transformers casts them to "
                               f"{str(dtype)[6:]} as it loads, so its weights differ from lowbit's by that rounding "
                               f"(quantize with scales in the model's dtype, e.g. -sbf16, for exact weights)")
    config.quantization_config = quantization_config(ct, ignore, report.dequantize_on_load)
    packed_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items()
                       if k.rpartition(".")[0] in ct and not k.endswith(".weight_shape"))
    report.packed_bpw = 8 * packed_bytes / sum(math.prod(model.get_submodule(n).qweight.shape) for n in ct)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}  # the same file from any device
    with atomic_dir(out, force=force) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        config.save_pretrained(tmp)
        save_companions(model, tmp, tokenizer)
    report.bytes_on_disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    report.seconds = time.perf_counter() - t0
    return report

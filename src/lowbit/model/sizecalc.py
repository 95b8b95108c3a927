"""How big a model is in each storage format, from its config alone: the table ``lowbit size`` prints.

The parameters come from :func:`lowbit.model.shape.model_shape` (the model built on the meta device from
the config :func:`lowbit.model.hfconfig.load_config` reads), so counts are exact for any architecture
transformers knows, with no weights read or allocated. Those modules' names are importable from here too.

Storage rule (one row of :func:`size_table` per format):

* ``fp32``: every parameter 4 bytes.
* a lowbit scheme (``bf16``, ``fp8``, ``int8``, ``int4-g128``, …): linear-layer weights in that scheme,
  bytes computed exactly per layer shape with QTensor's arithmetic (codes + scales + zero-points, a ragged
  last group counting as a whole group); token/position embeddings and an untied output head in the same
  scheme when it has 8 or more bits, else in ``int8`` (per row); everything else (norms, biases) in 16 bits.
* ``Q4_K_M`` / ``Q8_0``: llama.cpp's per-tensor type choice for that file type (GGML block sizes from
  the ``gguf`` package); 1-D tensors stay float32 as llama.cpp keeps them.

``runtime_bytes`` adds a KV cache of ``context`` tokens at batch 1 (2 × layers × kv heads × head dim ×
context × ``kv_bytes``) for causal LMs; activations and framework overhead are not counted.

>>> rows = size_table("config.json")            # here: Llama-2-7B's
>>> [(r.format, round(r.weight_bytes / 1e9, 2)) for r in rows[:2]]
[('fp32', 26.95), ('bf16', 13.48)]
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme, parse_scheme
from lowbit.model.hfconfig import GENERIC_DIR_NAMES, ConfigError, load_config
from lowbit.model.shape import (
    ARCH_SUFFIX_TASKS,
    ENCODER_MODEL_TYPES,
    TASK_AUTO_CLASSES,
    ModelShape,
    TensorShape,
    auto_model_class,
    model_shape,
    model_task,
)

__all__ = [
    "ARCH_SUFFIX_TASKS", "DEFAULT_FORMATS", "EMBED_FALLBACK", "ENCODER_MODEL_TYPES", "GENERIC_DIR_NAMES",
    "GGUF_CATEGORIES", "GGUF_FALLBACK", "GGUF_RECIPES", "OTHER_BYTES", "TASK_AUTO_CLASSES", "ModelShape",
    "SizeError", "SizeReport", "SizeRow", "TensorShape", "auto_model_class", "budget_row", "format_report",
    "gguf_tensor_type", "kv_cache_bytes", "load_config", "model_shape", "model_task", "scheme_nbytes", "size_report",
    "size_table", "tensor_nbytes",
]

DEFAULT_FORMATS = ("fp32", "bf16", "fp8", "int8", "int4-g128", "int3-g64", "int2-g64", "Q4_K_M")
EMBED_FALLBACK = "int8"  # embeddings / head of schemes below 8 bits
OTHER_BYTES = 2  # norms and biases, except in the fp32 row

# what the size calculator raises: a config it cannot read or build (the same class), or a bad request
SizeError = ConfigError


# -- bytes per format -------------------------------------------------------------------------------


def scheme_nbytes(scheme: Scheme | str, shape: tuple[int, ...]) -> int:
    """Bytes a QTensor of ``shape`` takes in ``scheme`` (codes + scales + zero-points).

    >>> scheme_nbytes("int4-g128", (4096, 4096))  # 4 bits + (16-bit scale + 4-bit zero) / 128
    8716288
    """
    s = parse_scheme(scheme)
    empty = torch.empty(0, dtype=torch.uint8)
    return sum(QTensor(empty, None, None, tuple(shape), torch.float32, s).expected_nbytes().values())


# llama.cpp's K-quant recipes. HF parameter name -> llama.cpp tensor category:
GGUF_CATEGORIES: tuple[tuple[str, str], ...] = (
    (r"\.(v_proj|value)\.weight$", "attn_v"),
    (r"\.(qkv_proj|query_key_value|c_attn|Wqkv)\.weight$", "attn_qkv"),
    (r"\.(down_proj|fc2|dense_4h_to_h|w2)\.weight$|\.mlp\.c_proj\.weight$|(?<!attention)\.output\.dense\.weight$",
     "ffn_down"),
)
# type per category: (default, with more bits in the layers llama.cpp's use_more_bits picks)
GGUF_RECIPES: dict[str, dict[str, tuple[str, str]]] = {
    "Q4_K_M": {"default": ("Q4_K", "Q4_K"), "attn_v": ("Q4_K", "Q6_K"), "ffn_down": ("Q4_K", "Q6_K"),
               "attn_qkv": ("Q5_K", "Q5_K"), "head": ("Q6_K", "Q6_K")},
    "Q8_0": {"default": ("Q8_0", "Q8_0"), "head": ("Q8_0", "Q8_0")},
}
# a type whose block does not divide the row length falls back (as llama.cpp does), finally to F16
GGUF_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gguf_tensor_type(recipe: str, t: TensorShape, num_layers: int) -> str:
    """The GGML type llama.cpp's ``recipe`` (e.g. ``Q4_K_M``) gives tensor ``t``.

    >>> gguf_tensor_type("Q4_K_M", TensorShape("model.layers.0.mlp.down_proj.weight", (576, 1536), "linear"), 30)
    'Q6_K'
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(t.shape) < 2 or t.role == "other":
        return "F32"
    rules = GGUF_RECIPES[recipe]
    cols = t.shape[-1]
    if t.is_head:  # llama.cpp: the output tensor (or the embedding tied to it) -> Q8_0 if its blocks do not fit
        gtype = rules["head"][0]
        return gtype if cols % GGML_QUANT_SIZES[GGMLQuantizationType[gtype]][0] == 0 else "Q8_0"
    category = next((c for pat, c in GGUF_CATEGORIES if re.search(pat, t.name)), "default")
    layer = re.search(r"\.(\d+)\.", t.name)
    more = layer is not None and num_layers > 0 and _use_more_bits(int(layer.group(1)), num_layers)
    gtype = rules.get(category, rules["default"])[int(more)]
    while cols % GGML_QUANT_SIZES[GGMLQuantizationType[gtype]][0]:
        gtype = GGUF_FALLBACK.get(gtype, "F16")
    return gtype


def tensor_nbytes(fmt: str, t: TensorShape, num_layers: int = 0) -> int:
    """Bytes of one parameter stored in ``fmt`` under the module's storage rule."""
    if fmt == "fp32":
        return 4 * t.numel
    if fmt in GGUF_RECIPES:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[gguf_tensor_type(fmt, t, num_layers)]]
        return t.numel // block * block_bytes
    if t.role == "other" or len(t.shape) < 2:
        return t.numel * OTHER_BYTES
    s = parse_scheme(fmt)
    if t.role in ("embedding", "head") and s.bits < 8:
        s = parse_scheme(EMBED_FALLBACK)
    return scheme_nbytes(s, t.shape)


def kv_cache_bytes(shape: ModelShape, context: int = 4096, kv_bytes: int = 2, batch: int = 1) -> int:
    """K and V for ``context`` tokens in every layer (0 for encoders, which keep no cache)."""
    if shape.task != "causal-lm":
        return 0
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * context * kv_bytes * batch


@dataclass(frozen=True)
class SizeRow:
    """One format: ``bpw`` over all parameters, ``linear_bpw`` over linear-layer weights only."""

    format: str
    bpw: float
    weight_bytes: int
    runtime_bytes: int
    linear_bpw: float


def size_table(
    config_or_source: Any,
    formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS,
    context: int = 4096,
    kv_bytes: int = 2,
) -> list[SizeRow]:
    """Weight and runtime bytes of a model in each of ``formats`` (a ModelShape, config, path or hub id).

    >>> [r.format for r in size_table("config.json", ["bf16", "int4-g128"])]
    ['bf16', 'int4-g128']
    >>> [r.format for r in size_table("HuggingFaceTB/SmolLM2-135M", ["Q4_K_M"])]  # a hub id: network  # doctest: +SKIP
    ['Q4_K_M']
    """
    shape = config_or_source if isinstance(config_or_source, ModelShape) else model_shape(config_or_source)
    for fmt in formats:
        if fmt != "fp32" and fmt not in GGUF_RECIPES:
            parse_scheme(fmt)  # a bad name fails before any work, naming the format
    total, n_lin = shape.params(), shape.params("linear")
    kv = kv_cache_bytes(shape, context, kv_bytes)
    rows = []
    for fmt in formats:
        per = [(t.role, tensor_nbytes(fmt, t, shape.num_layers)) for t in shape.tensors]
        nbytes = sum(n for _, n in per)
        lin = sum(n for role, n in per if role == "linear")
        rows.append(SizeRow(fmt, 8 * nbytes / total, nbytes, nbytes + kv, 8 * lin / n_lin if n_lin else 0.0))
    return rows


# -- the report `lowbit size` prints --------------------------------------------------------------------


@dataclass(frozen=True)
class SizeReport:
    """Everything ``lowbit size`` shows: parameter counts by role, one SizeRow per format, the machine's RAM."""

    name: str
    model_type: str
    task: str
    params: int
    linear_params: int
    embedding_params: int
    head_params: int
    other_params: int
    tied: bool
    context: int
    kv_bytes: int  # per cached value
    kv_cache_bytes: int
    rows: tuple[SizeRow, ...]
    machine_ram_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        return d

    def largest_fitting(self) -> SizeRow | None:
        """The format with the most bytes whose runtime still fits in this machine's RAM."""
        if self.machine_ram_bytes is None:
            return None
        fits = [r for r in self.rows if r.runtime_bytes <= self.machine_ram_bytes]
        return max(fits, key=lambda r: r.weight_bytes, default=None)


def budget_row(shape: ModelShape, budget: Any, context: int = 4096, kv_bytes: int = 2) -> SizeRow:
    """The row of a ``--budget`` (a :class:`lowbit.model.budget.Budget` of bits per weight or bytes): embeddings
    and head at int8 and norms at 16 bits as in the scheme rows, the linear layers at the bits per weight the
    budget names or leaves. bpw counts an untied head with the linear layers, as ``lowbit quantize`` reports it.

    >>> from lowbit.model.budget import parse_budget
    >>> r = budget_row(model_shape("config.json"), parse_budget("3.5bpw"))
    >>> r.format, round(r.linear_bpw, 2), round(r.weight_bytes / 1e9, 2)
    ('3.5bpw', 3.5, 3.02)
    """
    if budget.kind not in ("bpw", "bytes"):
        raise SizeError(f"--budget {budget.text}: a KL bound needs a measured sensitivity table (lowbit plan "
                        f"--budget {budget.text} --calib FILE); size takes bits per weight or bytes")
    fixed = sum(tensor_nbytes("int4", t) for t in shape.tensors if t.role != "linear")  # int8 edges, 16-bit rest
    head = [t for t in shape.tensors if t.role == "head"]
    n_lin, n_head = shape.params("linear"), sum(t.numel for t in head)
    head_bytes = sum(tensor_nbytes("int4", t) for t in head)
    if budget.kind == "bpw":
        lin = budget.value * (n_lin + n_head) / 8 - head_bytes
    else:
        lin = budget.value - fixed
    if lin <= 0:
        raise SizeError(f"--budget {budget.text}: less than the embeddings, head and norms take at int8 "
                        f"({fixed / 1e6:.2f} MB)")
    total = fixed + lin
    kv = kv_cache_bytes(shape, context, kv_bytes)
    return SizeRow(budget.text, 8 * total / shape.params(), int(total), int(total) + kv,
                   8 * (lin + head_bytes) / max(n_lin + n_head, 1))


def size_report(
    source: Any,
    formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS,
    context: int = 4096,
    kv_bytes: int = 2,
    budgets: tuple[Any, ...] | list[Any] = (),
) -> SizeReport:
    """:func:`size_table` plus parameter counts and this machine's RAM, for the ``lowbit size`` command.

    >>> print(format_report(size_report("config.json")))  # this machine's RAM varies  # doctest: +ELLIPSIS
    config.json · llama · 6.74 B parameters (6.48 B in linear layers)
    format          bpw     weights  + runtime (ctx 4096, fp16 KV)
    fp32          32.00    26.95 GB                      29.10 GB
    bf16          16.00    13.48 GB                      15.62 GB
    fp8            8.01     6.74 GB                       8.89 GB
    int8           8.00     6.74 GB                       8.89 GB
    int4-g128      4.31     3.63 GB                       5.77 GB
    int3-g64       3.48     2.93 GB                       5.08 GB
    int2-g64       2.50     2.11 GB                       4.26 GB
    Q4_K_M         4.84     4.08 GB                       6.23 GB
    This machine: ... GB RAM → fits up to ...
    bpw over all parameters; below 8 bits, embeddings and head at int8; norms at 16 bits
    runtime = weights + KV cache (activations not counted)
    """
    if context < 1:
        raise SizeError(f"context must be a positive number of tokens, got {context}")
    shape = source if isinstance(source, ModelShape) else model_shape(source)
    rows = size_table(shape, formats, context, kv_bytes) + [budget_row(shape, b, context, kv_bytes) for b in budgets]
    try:
        import psutil

        ram: int | None = int(psutil.virtual_memory().total)
    except ImportError:
        ram = None
    return SizeReport(
        name=shape.name, model_type=shape.model_type, task=shape.task, params=shape.params(),
        linear_params=shape.params("linear"), embedding_params=shape.params("embedding"),
        head_params=shape.params("head"), other_params=shape.params("other"), tied=shape.tied, context=context,
        kv_bytes=kv_bytes, kv_cache_bytes=kv_cache_bytes(shape, context, kv_bytes), rows=tuple(rows),
        machine_ram_bytes=ram,
    )


def _human(n: float, prefixes: str = "TGMk", unit: str = "B") -> str:
    """``26.95 GB`` for bytes; ``6.74 B`` for counts (``prefixes="TBMk", unit=""``)."""
    for scale, prefix in zip((1e12, 1e9, 1e6, 1e3), prefixes, strict=True):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def format_report(report: SizeReport) -> str:
    """The plain-text table of :func:`size_report` (what ``lowbit size`` prints)."""
    tie = ", tied embeddings" if report.tied else ""
    head = (f"{report.name} · {report.model_type} · {_human(report.params, 'TBMk', '')} parameters "
            f"({_human(report.linear_params, 'TBMk', '')} in linear layers{tie})")
    kv_type = {1: "fp8", 2: "fp16", 4: "fp32"}.get(report.kv_bytes, f"{8 * report.kv_bytes}-bit")
    kv = f"ctx {report.context}, {kv_type} KV" if report.kv_cache_bytes else "no KV cache"
    lines = [head, f"{'format':<12}{'bpw':>7}  {'weights':>10}  {'+ runtime (' + kv + ')':>28}"]
    for r in report.rows:
        lines.append(f"{r.format:<12}{r.bpw:>7.2f}  {_human(r.weight_bytes):>10}  {_human(r.runtime_bytes):>28}")
    if report.machine_ram_bytes is not None:
        best = report.largest_fitting()
        fits = f"fits up to {best.format}" if best else "fits none of these formats"
        lines.append(f"This machine: {_human(report.machine_ram_bytes)} RAM → {fits}")
    lines.append("bpw over all parameters; below 8 bits, embeddings and head at int8; norms at 16 bits")
    lines.append("runtime = weights + KV cache (activations not counted)")
    return "\n".join(lines)

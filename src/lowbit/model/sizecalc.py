"""How big a model is in each storage format, from its config alone.

The model is built on the meta device from its transformers config, so parameter counts are exact for
any architecture transformers knows, with no weights read or allocated.

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

>>> rows = size_table("config.json")            # e.g. Llama-2-7B
>>> [(r.format, round(r.weight_bytes / 1e9, 2)) for r in rows[:2]]
[('fp32', 26.95), ('bf16', 13.48)]
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme, parse_scheme
from lowbit.errors import LowbitError

DEFAULT_FORMATS = ("fp32", "bf16", "fp8", "int8", "int4-g128", "int3-g64", "int2-g64", "Q4_K_M")
EMBED_FALLBACK = "int8"  # embeddings / head of schemes below 8 bits
OTHER_BYTES = 2  # norms and biases, except in the fp32 row

# -- which transformers class a config is loaded with (architecture knowledge as data) ---------------
# (suffix of config.architectures[0], task); the first match wins
ARCH_SUFFIX_TASKS: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForMaskedLM", "masked-lm"),
    ("ForSequenceClassification", "sequence-classification"),
    ("Model", "encoder"),
)
# model types that are encoders even though transformers also registers a causal-LM head for them
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "mpnet",
                                 "distilbert", "albert", "deberta", "deberta-v2", "modernbert", "nomic_bert"})
TASK_AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "encoder": "AutoModel",
}


class SizeError(LowbitError, ValueError):
    """A config the size calculator cannot read or build."""


def model_task(config: Any) -> str:
    """``"causal-lm"``, ``"encoder"``, … from ``config.architectures``, else from ``config.model_type``.

    >>> model_task(BertConfig(architectures=["BertModel"]))
    'encoder'
    """
    for arch in getattr(config, "architectures", None) or ():
        for suffix, task in ARCH_SUFFIX_TASKS:
            if arch.endswith(suffix):
                return task
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if model_type in ENCODER_MODEL_TYPES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "encoder"
    return "causal-lm"


def auto_model_class(config: Any) -> type:
    """The transformers Auto class that builds ``config``'s model (AutoModelForCausalLM, AutoModel, …)."""
    import transformers

    return getattr(transformers, TASK_AUTO_CLASSES[model_task(config)])


# -- reading a config -------------------------------------------------------------------------------


def load_config(source: Any) -> Any:
    """A transformers config from a config object, a dict, a config.json, a model folder, a .gguf or a hub id.

    >>> load_config({"model_type": "llama", "hidden_size": 64}).hidden_size
    64
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    try:
        if isinstance(source, dict):
            d = dict(source)
            if "model_type" not in d:
                raise SizeError("config dict has no 'model_type'")
            return AutoConfig.for_model(d.pop("model_type"), **d)
        text = os.fspath(source)
        p = Path(text).expanduser()
        if not p.exists() and (p.suffix in (".json", ".gguf") or text.startswith(("/", ".", "~"))):
            raise SizeError(f"{p}: no such file or directory")
        if p.is_file() and p.suffix == ".json":
            d = json.loads(p.read_text())
            if not isinstance(d, dict) or "model_type" not in d:
                raise SizeError(f"{p}: not a transformers config (no 'model_type')")
            return load_config(d)
        if p.is_file() and p.suffix == ".gguf":
            return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise SizeError(f"{p}: no config.json in this folder")
            return AutoConfig.from_pretrained(str(p))
        if p.exists():
            raise SizeError(f"{p}: unknown file type (expected config.json, a model folder or a .gguf)")
        return AutoConfig.from_pretrained(str(source))  # a hub id (needs network)
    except LowbitError:
        raise
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SizeError(f"{source}: cannot read a model config ({first})") from None


# -- shapes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorShape:
    """One parameter. ``role``: linear | embedding | head | other; linear shapes are (out, in)."""

    name: str
    shape: tuple[int, ...]
    role: str
    is_head: bool = False  # the output head, or the input embedding tied to it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelShape:
    """Every parameter of a model (each shared tensor once) plus what the KV cache needs."""

    name: str
    model_type: str
    task: str
    tensors: tuple[TensorShape, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tied: bool

    def params(self, role: str | None = None) -> int:
        return sum(t.numel for t in self.tensors if role is None or t.role == role)


def model_shape(source: Any) -> ModelShape:
    """Build ``source``'s model on the meta device and list its parameters by role.

    >>> s = model_shape({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    ...                  "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000})
    >>> s.params()
    6738415616
    """
    from accelerate import init_empty_weights
    from transformers.pytorch_utils import Conv1D

    config = load_config(source)
    task = model_task(config)
    try:
        with init_empty_weights():
            model = auto_model_class(config).from_config(config)
        # from_config under init_empty_weights leaves tied weights as two tensors; tie them outside it
        # (inside, accelerate's hook would wrap the shared tensor in a new Parameter again)
        model.tie_weights()
    except (ValueError, KeyError, TypeError, AttributeError, ImportError, RuntimeError) as e:
        raise SizeError(f"{_label(source, config)}: transformers cannot build this model ({e})") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_w = getattr(head, "weight", None)
    seen: set[int] = set()
    tensors = []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}" if mname else pname
            shape = tuple(p.shape)
            if isinstance(module, nn.Embedding):
                role = "embedding"
            elif p is head_w:
                role = "head"
            elif pname == "weight" and len(shape) >= 2:
                role = "linear"
                if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
                    shape = shape[::-1]
                shape = (p.numel() // shape[-1], shape[-1])  # conv / expert stacks as (rows, in)
            else:
                role = "other"
            tensors.append(TensorShape(name, shape, role, is_head=p is head_w))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = int(getattr(text, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(text, "head_dim", None) or (text.hidden_size // n_heads if n_heads else 0))
    return ModelShape(
        name=_label(source, config), model_type=str(config.model_type), task=task, tensors=tuple(tensors),
        num_layers=int(getattr(text, "num_hidden_layers", 0) or 0), num_kv_heads=kv_heads, head_dim=head_dim,
        tied=head_w is not None and not any(t.role == "head" for t in tensors),
    )


GENERIC_DIR_NAMES = frozenset({"model", "models", "hf", "float", "weights", "checkpoint", "snapshot"})


def _label(source: Any, config: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        p = Path(os.fspath(source))
        if p.name == "config.json":
            p = p.parent
        if p.name in GENERIC_DIR_NAMES and p.parent.name:
            return f"{p.parent.name}/{p.name}"
        return p.name or str(source)
    return str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "model"))


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

    >>> [r.format for r in size_table("HuggingFaceTB/SmolLM2-135M", ["bf16", "int4-g128"])]
    ['bf16', 'int4-g128']
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


def size_report(
    source: Any,
    formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS,
    context: int = 4096,
    kv_bytes: int = 2,
) -> SizeReport:
    """:func:`size_table` plus parameter counts and this machine's RAM, for the ``lowbit size`` command.

    >>> print(format_report(size_report("config.json")))  # doctest: +SKIP
    """
    if context < 1:
        raise SizeError(f"context must be a positive number of tokens, got {context}")
    shape = source if isinstance(source, ModelShape) else model_shape(source)
    rows = size_table(shape, formats, context, kv_bytes)
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

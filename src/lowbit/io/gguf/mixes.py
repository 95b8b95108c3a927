"""Which GGML type each tensor gets: llama.cpp's file-type mixes as a data table, and its fallbacks.

A mix (``Q4_K_M``, ``Q3_K_S``, ``Q8_0`` …) has a base type and per-category rules, as llama-quantize
applies them (``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp``, dense non-Falcon models):
a rule names a tensor category, the mixes it belongs to, a condition on the layer and model, and a type.
The first matching rule of a category wins. Then a tensor whose rows do not split into whole blocks falls
back to a type with smaller blocks (Q4_K -> Q5_0, Q6_K -> Q8_0 …; F16 when nothing fits), with a note.

>>> choose_type("blk.5.ffn_down.weight", (576, 1536), "Q4_K_M", ModelFacts(n_layer=30, n_head=9, n_head_kv=3))
TypeChoice(ggml='Q6_K', requested='Q6_K', note='')
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from torch import nn

from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError
from lowbit.layouts.ggml import FALLBACK
from lowbit.methods.registry import MethodConfig
from lowbit.model.plan import Plan
from lowbit.primitives.ggml_types import GGML_SCHEMES

FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPE_NAMES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
# mix name -> (base type, llama.cpp file type)
MIXES: dict[str, tuple[str, LlamaFileType]] = {
    "F32": ("F32", LlamaFileType.ALL_F32), "F16": ("F16", LlamaFileType.MOSTLY_F16),
    "BF16": ("BF16", LlamaFileType.MOSTLY_BF16), "Q8_0": ("Q8_0", LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": ("Q4_0", LlamaFileType.MOSTLY_Q4_0), "Q4_1": ("Q4_1", LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": ("Q5_0", LlamaFileType.MOSTLY_Q5_0), "Q5_1": ("Q5_1", LlamaFileType.MOSTLY_Q5_1),
    "Q2_K": ("Q2_K", LlamaFileType.MOSTLY_Q2_K), "Q2_K_S": ("Q2_K", LlamaFileType.MOSTLY_Q2_K_S),
    "Q3_K_S": ("Q3_K", LlamaFileType.MOSTLY_Q3_K_S), "Q3_K_M": ("Q3_K", LlamaFileType.MOSTLY_Q3_K_M),
    "Q3_K_L": ("Q3_K", LlamaFileType.MOSTLY_Q3_K_L), "Q4_K_S": ("Q4_K", LlamaFileType.MOSTLY_Q4_K_S),
    "Q4_K_M": ("Q4_K", LlamaFileType.MOSTLY_Q4_K_M), "Q5_K_S": ("Q5_K", LlamaFileType.MOSTLY_Q5_K_S),
    "Q5_K_M": ("Q5_K", LlamaFileType.MOSTLY_Q5_K_M), "Q6_K": ("Q6_K", LlamaFileType.MOSTLY_Q6_K),
    "IQ4_NL": ("IQ4_NL", LlamaFileType.MOSTLY_IQ4_NL), "IQ4_XS": ("IQ4_XS", LlamaFileType.MOSTLY_IQ4_XS),
}
# llama-quantize's aliases
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


@dataclass(frozen=True)
class ModelFacts:
    """What the rules look at: layer count, heads (for GQA), tied embeddings, an importance matrix."""

    n_layer: int
    n_head: int = 1
    n_head_kv: int = 1
    tied_embeddings: bool = False
    has_imatrix: bool = False
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B (a Llama with 80 layers)

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(self.n_head_kv, 1)


@dataclass(frozen=True)
class TypeChoice:
    ggml: str  # the type written
    requested: str  # what the mix asked for, before any fallback
    note: str = ""


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer pattern for extra bits: the first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


Cond = Callable[[int, ModelFacts], bool]


def _always(i: int, f: ModelFacts) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    category: str
    mixes: tuple[str, ...]
    type: str
    when: Cond = _always


# (category, mixes, type, condition(i_layer, facts)); first match per category wins, as in llama.cpp's chains
RULES: tuple[Rule, ...] = (
    Rule("attn_v", ("Q2_K",), "Q4_K", lambda i, f: f.n_gqa >= 4),
    Rule("attn_v", ("Q2_K",), "Q3_K"),
    Rule("attn_v", ("Q2_K_S",), "Q4_K", lambda i, f: f.n_gqa >= 4),
    Rule("attn_v", ("Q3_K_M",), "Q5_K", lambda i, f: i < 2),
    Rule("attn_v", ("Q3_K_M",), "Q4_K"),
    Rule("attn_v", ("Q3_K_L",), "Q5_K"),
    Rule("attn_v", ("Q4_K_M", "Q5_K_M"), "Q6_K", lambda i, f: use_more_bits(i, f.n_layer)),
    Rule("attn_v", ("Q4_K_S",), "Q5_K", lambda i, f: i < 4),
    Rule("ffn_down", ("Q2_K",), "Q3_K"),
    Rule("ffn_down", ("Q2_K_S",), "Q4_K", lambda i, f: i < f.n_layer // 8),
    Rule("ffn_down", ("Q3_K_M",), "Q5_K", lambda i, f: i < f.n_layer // 16),
    Rule("ffn_down", ("Q3_K_M",), "Q4_K"),
    Rule("ffn_down", ("Q3_K_L",), "Q5_K"),
    Rule("ffn_down", ("Q4_K_M", "Q5_K_M"), "Q6_K", lambda i, f: use_more_bits(i, f.n_layer)),
    Rule("ffn_down", ("Q4_K_S",), "Q5_K", lambda i, f: i < f.n_layer // 8),
    Rule("ffn_down", ("Q4_0",), "Q4_1", lambda i, f: f.has_imatrix and i < f.n_layer // 8),
    Rule("ffn_down", ("Q5_0",), "Q5_1", lambda i, f: f.has_imatrix and i < f.n_layer // 8),
    Rule("attn_output", ("Q2_K",), "Q3_K"),
    Rule("attn_output", ("Q3_K_M",), "Q4_K"),
    Rule("attn_output", ("Q3_K_L",), "Q5_K"),
)
_LAYER = re.compile(r"^blk\.(\d+)\.")


def category(name: str) -> str:
    """llama.cpp's broad tensor category of a GGUF tensor name."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for cat in ("attn_qkv", "attn_v", "attn_k", "attn_q", "attn_output", "ffn_up", "ffn_gate", "ffn_down"):
        if f"{cat}.weight" in name or (cat.startswith("ffn") and cat in name):
            return "attn_v" if cat == "attn_qkv" else cat
    return "other"


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp quantizes 2-D ``*weight`` tensors except norms, position embeddings and token types."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and name not in ("position_embd.weight", "token_types.weight"))


def block_size(ggml: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml]][0]


def resolve_mix(mix: str) -> tuple[str, str, LlamaFileType]:
    """(canonical mix name, base type, file type) of a user's type string; a LowbitError lists the known ones."""
    key = mix.strip().upper()
    key = ALIASES.get(key, key)
    if key not in MIXES:
        raise LowbitError(f"unknown GGUF type {mix!r} (known: {', '.join(list(MIXES) + list(ALIASES))})")
    base, ftype = MIXES[key]
    return key, base, ftype


def fallback(name: str, ncols: int, ggml: str) -> TypeChoice:
    """``ggml`` if its block divides the row length ``ncols``, else llama.cpp's fallback (F16 last)."""
    if ggml in FLOAT_TYPES or ncols % block_size(ggml) == 0:
        return TypeChoice(ggml, ggml)
    alt = FALLBACK.get(ggml, ggml)
    if ncols % block_size(alt) != 0:
        alt = "F16"
    why = f"row length {ncols} is not a multiple of {ggml}'s block of {block_size(ggml)}: {alt} instead"
    return TypeChoice(alt, ggml, why)


def mix_type(name: str, shape: tuple[int, ...], mix: str, facts: ModelFacts, pure: bool = False) -> str:
    """The type llama.cpp's rules give tensor ``name`` (numpy-order ``shape``, rows last dim) before fallbacks."""
    key, base, _ = resolve_mix(mix)
    if base in FLOAT_TYPES or pure:
        return base
    cat = category(name)
    ncols = shape[-1]
    if cat == "output" or (facts.tied_embeddings and cat == "token_embd"):
        if ncols % block_size(base) != 0:
            return "Q8_0"
        return base if base == "Q8_0" else "Q6_K"
    m = _LAYER.match(name)
    i = int(m.group(1)) if m else 0
    new = base
    for r in RULES:
        if r.category == cat and key in r.mixes and r.when(i, facts):
            new = r.type
            break
    if cat == "attn_v" and facts.is_70b and new in ("Q3_K", "Q4_K"):
        new = "Q5_K"
    return new


def choose_type(name: str, shape: tuple[int, ...], mix: str, facts: ModelFacts, pure: bool = False) -> TypeChoice:
    """The GGML type of one tensor under ``mix``: float32 for tensors llama.cpp never quantizes.

    ``shape`` is the torch shape ``(rows, cols)``; blocks run along ``cols``.
    """
    if not quantizable(name, shape):
        return TypeChoice("F32", "F32")
    return fallback(name, shape[-1], mix_type(name, shape, mix, facts, pure))


def type_for_scheme(scheme: Scheme | None, float_type: str = "F32") -> tuple[str, str]:
    """The GGML type closest to a lowbit scheme, and a note when it is not the same format.

    ``None`` (kept in float) gives ``float_type``. Groups of 32 map to the legacy types exactly
    (int4-g32-sym -> Q4_0, int4-g32 -> Q4_1, int5 likewise, int8 -> Q8_0); other groupings go to the
    k-quant of the same width (its own 16/32-wide sub-blocks).
    """
    if scheme is None:
        return float_type, ""
    if scheme.block is not None:  # a GGML type: itself
        return scheme.block.ggml, ""
    fmt = scheme.format
    if fmt in ("fp16", "bf16"):
        return ("F16" if fmt == "fp16" else "BF16"), ""
    bits = scheme.bits
    g32 = scheme.granularity == "group" and scheme.group_size == 32
    if fmt.startswith("int") and bits in (4, 5) and g32:
        return (f"Q{bits}_0" if scheme.symmetric else f"Q{bits}_1"), ""
    table = {8: "Q8_0", 6: "Q6_K", 5: "Q5_K", 4: "Q4_K", 3: "Q3_K", 2: "Q2_K"}
    if fmt.startswith("int") and bits in table:
        t = table[bits]
        exact = t == "Q8_0" and g32 and scheme.symmetric
        return t, "" if exact else f"{scheme.name} has no GGML twin: {t}"
    t = "Q8_0" if bits >= 8 else "Q4_K"
    return t, f"{scheme.name} has no GGML twin: {t}"


def model_facts(config: Any, has_imatrix: bool = False) -> ModelFacts:
    """What the mix rules look at, from a transformers config."""
    from lowbit.io.gguf.writer import arch_spec

    spec = arch_spec(config)
    n_layer = int(config.num_hidden_layers)
    return ModelFacts(n_layer, int(config.num_attention_heads),
                      int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
                      bool(getattr(config, "tie_word_embeddings", False)), has_imatrix=has_imatrix,
                      is_70b=spec.gguf_arch == "llama" and n_layer == 80)


def is_mix(name: str) -> bool:
    """A llama.cpp file type (``Q4_K_M``, ``Q3_K_S`` …) rather than a single type's scheme (``q4_k``)."""
    return isinstance(name, str) and name.strip().upper() in MIXES and name.strip().upper() not in FLOAT_TYPES \
        and name.strip().lower() not in GGML_SCHEMES


def ggml_scheme(ggml: str) -> str | None:
    """The lowbit scheme storing GGML type ``ggml`` (None for F32: kept in float)."""
    return {"F32": None, "F16": "fp16", "BF16": "bf16"}.get(ggml, ggml.lower())


def mix_plan(model: nn.Module, mix: str, method: str = "rtn", config: MethodConfig | None = None,
             has_imatrix: bool = False, pure: bool = False) -> Plan:
    """llama.cpp's mix ``mix`` as a lowbit Plan: one rule per layer with the GGML type llama-quantize would
    give it, quantized by ``method`` (embeddings and the head by the data-free block search, as llama.cpp
    has no activations for them). Fallbacks for rows that blocks do not fit happen when the Plan resolves.

    >>> plan = mix_plan(model, "Q4_K_M", "gptq")
    >>> resolved = plan.resolve(model)
    >>> resolved["model.layers.0.self_attn.q_proj"].scheme.name, resolved["model.layers.0.mlp.down_proj"].scheme.name
    ('q4_k', 'q5_0')
    """
    from lowbit.io.gguf.writer import arch_spec, gguf_names
    from lowbit.model.plan import Rule, layer_kind

    cfg = model.config
    spec = arch_spec(cfg)
    facts = model_facts(cfg, has_imatrix)
    tied = facts.tied_embeddings
    mods = {n: m for n, m in model.named_modules() if layer_kind(m)}
    keys = [f"{n}.weight" for n in mods if not (tied and n == "lm_head")]
    names = gguf_names(spec, cfg, keys)
    rules: list[Rule] = []
    by_kind: dict[str, str | None] = {}
    for n, m in mods.items():
        g = names.get(f"{n}.weight")
        if g is None:  # a tied head: the embedding's type
            continue
        w = m.weight
        shape = tuple(w.shape) if layer_kind(m) == "embedding" or not hasattr(m, "in_features") else (
            m.out_features, m.in_features)
        t = mix_type(g, shape, mix, facts, pure) if quantizable(g, shape) else "F32"
        sch = ggml_scheme(t)
        by_kind[n] = sch
        inside = category(g) not in ("token_embd", "output")
        meth = method if inside else "rtn"
        cf = (config or MethodConfig()) if inside else MethodConfig()
        rules.append(Rule(n, sch, meth, cf, kind=layer_kind(m)))
    if tied and "lm_head" in mods:
        emb = next(n for n, m in mods.items() if layer_kind(m) == "embedding")
        rules.append(Rule("lm_head", by_kind.get(emb), "rtn", MethodConfig(), kind="linear"))
    return Plan(tuple(rules))

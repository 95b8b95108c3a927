"""Architecture facts as data: where the blocks are, which layers run in sequence, which pair for AWQ.

One entry per family (:data:`FAMILIES`, keyed by family name; each ``model_type`` belongs to one family).
A new architecture is a new entry here, or ``register_arch(ArchInfo(...))`` from its own file, not a code
branch elsewhere.
Layer names are relative to a block; ``embeddings``/``head`` are relative to the model.
Each path may list alternatives (``a|b``): the first that exists in the model is used (e.g. a bare
``BertModel`` has ``encoder.layer``, ``BertForMaskedLM`` has ``bert.encoder.layer``).

>>> arch_for_type("qwen2").family, FAMILIES.get("gpt2").blocks
('llama', 'transformer.h')
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError
from lowbit.registry import Registry


@dataclass(frozen=True)
class ArchInfo:
    family: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path of the ModuleList of blocks
    embeddings: tuple[str, ...]  # token (and position) embeddings
    head: str | None  # LM head, None for encoders
    # Layers of one block in the order their inputs become available; each group sees the
    # quantized outputs of the groups before it (GPTQ's "true sequential").
    sequential: tuple[tuple[str, ...], ...]
    # (previous op, layers it feeds): an input-channel scale on the layers can be folded into the
    # previous op's output (a norm's weight or a linear's rows). Used by AWQ and SmoothQuant.
    scale_pairs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    causal: bool = True
    # The last sequential group is one layer whose output is added straight into the block's output (a
    # residual add, no norm after it): the runner then gets the block's quantized output from the float
    # one plus x·(Ŵ − W)ᵀ instead of another forward pass (checked against a real forward on block 0).
    residual_last: bool = False


_LLAMA_LIKE = dict(
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    head="lm_head",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    scale_pairs=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    residual_last=True,
)

FAMILIES: Registry[ArchInfo] = Registry("architecture family")
_BY_MODEL_TYPE: Registry[ArchInfo] = Registry("model type")


def register_arch(info: ArchInfo) -> ArchInfo:
    """Add a family to the table; its name and every one of its model types must be new."""
    taken = [t for t in info.model_types if t in _BY_MODEL_TYPE]
    if taken:
        raise LowbitError(f"model type {taken[0]!r} is already in family {_BY_MODEL_TYPE.get(taken[0]).family!r}")
    FAMILIES.add(info.family, info)
    for t in info.model_types:
        _BY_MODEL_TYPE.add(t, info)
    return info


for _info in (
    ArchInfo("llama", ("llama", "mistral", "qwen2", "qwen3"), **_LLAMA_LIKE),
    # Gemma norms compute x * (1 + w): a scale folds into (1 + w), not w, so no AWQ pairs through norms.
    ArchInfo(
        "gemma",
        ("gemma", "gemma2", "gemma3", "gemma3_text"),
        **{
            **_LLAMA_LIKE,
            "scale_pairs": (("self_attn.v_proj", ("self_attn.o_proj",)), ("mlp.up_proj", ("mlp.down_proj",))),
            "residual_last": False,  # Gemma 2/3 normalise the MLP's output before the residual add
        },
    ),
    ArchInfo(
        "phi3",
        ("phi3",),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        head="lm_head",
        sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        scale_pairs=(
            ("input_layernorm", ("self_attn.qkv_proj",)),
            ("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
        residual_last=True,
    ),
    ArchInfo(
        "gpt2",
        ("gpt2",),
        blocks="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        head="lm_head",
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        scale_pairs=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        residual_last=True,
    ),
    ArchInfo(
        "bert",
        ("bert",),
        blocks="encoder.layer|bert.encoder.layer",
        embeddings=(
            "embeddings.word_embeddings|bert.embeddings.word_embeddings",
            "embeddings.position_embeddings|bert.embeddings.position_embeddings",
        ),
        head=None,
        sequential=(
            ("attention.self.query", "attention.self.key", "attention.self.value"),
            ("attention.output.dense",),
            ("intermediate.dense",),
            ("output.dense",),
        ),
        scale_pairs=(("attention.self.value", ("attention.output.dense",)),),
        causal=False,
    ),
):
    register_arch(_info)
del _info


def arch_for_type(model_type: str | None) -> ArchInfo | None:
    """The table entry of a transformers ``model_type``, None when no family has it."""
    return _BY_MODEL_TYPE.get(model_type) if model_type in _BY_MODEL_TYPE else None


def arch_for(model: nn.Module) -> ArchInfo:
    """The table entry for ``model`` (by ``config.model_type``), or a clear error saying what to add."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    info = arch_for_type(model_type)
    if info is not None:
        return info
    known = _BY_MODEL_TYPE.names()
    raise LowbitError(
        f"architecture {model_type!r} ({type(model).__name__}) is not in lowbit's table: add an ArchInfo entry "
        f"to lowbit/model/arch.py naming its blocks, embeddings, head and sequential layer groups "
        f"(known: {', '.join(known)})"
    )


def get_path(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule at the first alternative of ``path`` that exists, else None."""
    for alt in path.split("|"):
        try:
            return model.get_submodule(alt)
        except AttributeError:
            continue
    return None


def resolve_path(model: nn.Module, path: str) -> str | None:
    """The first alternative of ``path`` naming a submodule of ``model``."""
    for alt in path.split("|"):
        try:
            model.get_submodule(alt)
            return alt
        except AttributeError:
            continue
    return None


def blocks_of(model: nn.Module, info: ArchInfo) -> tuple[str, nn.ModuleList]:
    name = resolve_path(model, info.blocks)
    if name is None:
        raise LowbitError(f"{type(model).__name__}: no block list at {info.blocks!r} (family {info.family})")
    mods = model.get_submodule(name)
    assert isinstance(mods, nn.ModuleList)
    return name, mods

"""Units of layers that share one scheme, and what each candidate stores for them: the model-walking half of
the sensitivity table (shapes and bytes, no data). :func:`bytes_table` is the table with every predicted KL 0,
enough to refuse a bits-per-weight or bytes budget before anything is measured.

>>> [u[0].rsplit(".", 2)[-2:] for u in units_of(model, arch_for(model))[:4]]
[['self_attn', 'q_proj'], ['self_attn', 'o_proj'], ['mlp', 'gate_proj'], ['mlp', 'down_proj']]
>>> fixed_layers(model, units_of(model, arch_for(model)))
{'model.embed_tokens': 'int8', 'lm_head': 'int8'}
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from lowbit.core.scheme import Scheme, parse_scheme
from lowbit.errors import LowbitError
from lowbit.layouts import layout_of
from lowbit.methods.registry import MethodConfig, method_spec
from lowbit.model.arch import ArchInfo, arch_for, blocks_of
from lowbit.model.convert import weight_matrix
from lowbit.model.plan import fit_row_length, layer_kind, row_length
from lowbit.model.sensitivity_table import Cost, SensitivityTable, Unit

# the candidates the issue names: lowbit's grouped schemes, and GGML types for a GGUF file
DEFAULT_SCHEMES = ("int8", "int6", "int5", "int4-g128", "int4-g64", "int3-g64", "int2-g64")
GGUF_SCHEMES = ("q8_0", "q6_k", "q5_k", "q5_0", "q4_k", "q4_0", "q3_k", "q2_k")


def fingerprint(model: nn.Module) -> dict[str, str]:
    """The model's identity for a saved table: its type and a hash of every quantizable layer's name, shape
    and first row (cheap, and different for any two checkpoints that differ in those rows)."""
    h = hashlib.sha256()
    for n, m in model.named_modules():
        if layer_kind(m) is None:
            continue
        w = m.weight.detach()
        h.update(f"{n}:{tuple(w.shape)}".encode())
        h.update(w.reshape(w.shape[0], -1)[0].to(torch.float32).cpu().numpy().tobytes())
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", "") or type(model).__name__
    return {"name": str(name), "model_type": str(getattr(cfg, "model_type", "")), "fingerprint": h.hexdigest()}


def units_of(model: nn.Module, info: ArchInfo, tied: bool = True) -> list[tuple[str, ...]]:
    """Full layer names grouped into units, block by block: the family's sequential groups (``tied``), or one
    layer each; a block's linear layers in no group are units of their own."""
    blocks_name, blocks = blocks_of(model, info)
    units: list[tuple[str, ...]] = []
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}."
        mine = [n for n, m in block.named_modules() if layer_kind(m) == "linear"]
        groups = [tuple(r for r in g if r in mine) for g in info.sequential]
        rest = [(r,) for r in mine if not any(r in g for g in groups)]
        for g in [g for g in groups if g] + rest:
            units += [tuple(prefix + r for r in g)] if tied else [(prefix + r,) for r in g]
    return units


def fixed_layers(model: nn.Module, units: Sequence[tuple[str, ...]], scheme: str = "int8") -> dict[str, str | None]:
    """Every quantizable layer outside the units (embeddings, head) at ``scheme`` (by RTN), as Plan.default
    gives them below 8 bits."""
    inside = {n for u in units for n in u}
    return {n: scheme for n, m in model.named_modules() if layer_kind(m) and n not in inside}


def fixed_bytes(model: nn.Module, units: Sequence[tuple[str, ...]], fixed: dict[str, str | None]
                ) -> tuple[int, tuple[int, int]]:
    """Checkpoint bytes outside the units (fixed layers' layouts, every other state-dict tensor at its dtype),
    and (weights, bytes) of the fixed *linear* layers, a tied twin counted once (as the checkpoint stores it)."""
    planned = {n for u in units for n in u} | {n for n, s in fixed.items() if s is not None}
    total, lin_w, lin_b = 0, 0, 0
    seen: dict[int, str] = {}
    for n, s in fixed.items():
        if s is None:
            continue
        mod = model.get_submodule(n)
        sch, _ = fit_row_length(parse_scheme(s), row_length(mod))
        w = weight_matrix(mod)
        if seen.get(id(mod.weight)) == sch.name:
            continue  # tied to a layer already counted, in the same scheme: stored once
        seen[id(mod.weight)] = sch.name
        nb = layout_of(sch).nbytes(sch, tuple(w.shape))
        total += nb
        if layer_kind(mod) == "linear":
            lin_w, lin_b = lin_w + w.numel(), lin_b + nb
    for k, t in model.state_dict().items():
        mod_name, _, leaf = k.rpartition(".")
        if leaf == "weight" and mod_name in planned:
            continue
        total += t.numel() * t.element_size()
    return total, (lin_w, lin_b)


def layer_scheme(mod: nn.Module, candidate: str, method: str) -> Scheme | None:
    """The scheme ``candidate`` resolves to on this layer (a GGML type's fallback), None when the method or
    the layout cannot take it."""
    s, _ = fit_row_length(parse_scheme(candidate), row_length(mod))
    try:
        method_spec(method).check_layout(s)
        layout_of(s).check(s, tuple(weight_matrix(mod).shape))
    except LowbitError:
        return None
    return s


def bytes_table(model: nn.Module, *, method: str = "gptq", schemes: Sequence[str] = DEFAULT_SCHEMES,
                tied: bool = True, fixed_scheme: str = "int8") -> SensitivityTable:
    """The table's bytes alone (every predicted KL 0), from the layer shapes, without any data: enough to tell
    a bits-per-weight or bytes budget these candidates cannot meet before anything is measured."""
    cands = [parse_scheme(s).name for s in schemes]
    units = units_of(model, arch_for(model), tied)
    rows = []
    for u in units:
        mods = [model.get_submodule(n) for n in u]
        costs = {}
        for c in cands:
            ss = [layer_scheme(m, c, method) for m in mods]
            if all(ss):
                costs[c] = Cost(sum(layout_of(x).nbytes(x, tuple(weight_matrix(m).shape))
                                    for x, m in zip(ss, mods, strict=True) if x is not None), 0.0)
        rows.append(Unit(u, sum(weight_matrix(m).numel() for m in mods), costs))
    fixed = fixed_layers(model, units, fixed_scheme)
    fbytes, flin = fixed_bytes(model, units, fixed)
    return SensitivityTable(model=fingerprint(model), method=method, config=MethodConfig(), candidates=tuple(cands),
                            units=tuple(rows), fixed=fixed, fixed_bytes=fbytes, fixed_linear=flin)

"""Measure a :class:`~lowbit.model.sensitivity_table.SensitivityTable`: what quantizing each unit of layers
alone to each candidate scheme costs, in bytes and in predicted ΔKL of the final logits.

Two passes over calibration windows:

1. **Output Fisher** (:func:`output_fisher`): one backward pass over a few windows with the parameters
   frozen, the input embeddings requiring grad, and labels *sampled from the float model's own softmax*
   (seeded). Then E[g gᵀ] is the Fisher of the output distribution, whose quadratic form is the second-order
   KL; per linear layer we keep its diagonal on the layer's output: ``f_o`` = mean over tokens of (∂L/∂y_o)².
2. **Block pass** (:func:`measure_sensitivity`): the runner's float block-by-block walk (one block and the
   calibration activations in memory). Per block, XᵀX of every linear; per layer × candidate, the user's
   method (without its pair transform: AWQ's scaling is the runner's, not the method's) quantizes the layer
   alone, and with ΔW = Ŵ − W ``(out, in)`` and H = XᵀX ``(in, in)`` summed over N tokens::

       predicted ΔKL ≈ ½ Σ_o f_o · (ΔW H ΔWᵀ)_oo / N        (mean nats per position)

   Units' costs are the sums of their layers'; bytes are the layouts' exact ``nbytes``.

>>> table = measure_sensitivity(model, windows, method="gptq", schemes=("int8", "int4-g64", "int2-g64"))
>>> u = table.units[0]; [n.rsplit(".", 1)[-1] for n in u.layers], sorted(u.costs)
(['q_proj', 'k_proj', 'v_proj'], ['int2-g64', 'int4-g64', 'int8'])
>>> u.costs["int2-g64"].kl > u.costs["int4-g64"].kl > u.costs["int8"].kl
True
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.scheme import Scheme, parse_scheme
from lowbit.errors import LowbitError
from lowbit.layouts import layout_of
from lowbit.methods.registry import LayerStats, MethodConfig, get_method, method_spec
from lowbit.model.arch import ArchInfo, arch_for, blocks_of
from lowbit.model.calibrate import BlockInput, capture_block_inputs, collect_stats, run_block
from lowbit.model.convert import weight_matrix
from lowbit.model.plan import fit_row_length, layer_kind, row_length
from lowbit.model.sensitivity_table import Cost, SensitivityTable, Unit

log = logging.getLogger(__name__)

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


@dataclass
class OutputFisher:
    """The output gradients of the sampled-label loss, per layer: ``channel`` = mean over tokens of (∂L/∂y_o)²
    ``(out,)`` (float64); ``token`` = Σ_o (∂L/∂y_o)² per token ``(N·T,)``, scaled to mean 1 (float32), so that
    ``channel[o] · token[t]`` is a rank-one fit of (∂L/∂y_{t,o})²; ``tokens`` = N·T."""

    channel: dict[str, torch.Tensor]
    token: dict[str, torch.Tensor]
    tokens: int


def output_fisher(model: nn.Module, windows: torch.Tensor, layers: dict[str, nn.Module], seed: int = 0
                  ) -> OutputFisher:
    """The :class:`OutputFisher` of ``layers`` on ``windows`` ``(N, T)``, one window per backward pass."""
    emb = model.get_input_embeddings()
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    acc = {n: torch.zeros(1, dtype=torch.float64) for n in layers}
    per_token: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    gen = torch.Generator().manual_seed(seed)

    def make_hook(n: str):
        def grad_hook(g: torch.Tensor) -> None:
            g2 = g.detach().to(torch.float64).square().reshape(-1, g.shape[-1]).cpu()  # (T, out)
            acc[n] = acc[n] + g2.sum(dim=0)
            per_token[n].append(g2.sum(dim=1))

        def hook(mod, args, out):
            if out.requires_grad:
                out.register_hook(grad_hook)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    tokens = 0
    try:
        for p in params:
            p.requires_grad_(False)
        for ids in windows.split(1):
            ids = ids.to(emb.weight.device)
            x = emb(ids).detach().requires_grad_(True)  # (1, T, H): gradients flow, parameters stay frozen
            logits = model(inputs_embeds=x, attention_mask=torch.ones_like(ids), use_cache=False).logits
            logits = logits.reshape(-1, logits.shape[-1]).to(torch.float32)  # (T, V)
            with torch.no_grad():
                probs = torch.softmax(logits.double(), dim=-1).cpu()
                labels = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(logits.device)  # y ~ p_float
            F.cross_entropy(logits, labels, reduction="sum").backward()
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    token = {}
    for n, parts in per_token.items():
        t = torch.cat(parts) if parts else torch.ones(tokens, dtype=torch.float64)  # one (T,) per window, in order
        token[n] = (t / t.mean().clamp(min=1e-300)).to(torch.float32)
    return OutputFisher({n: a / max(tokens, 1) for n, a in acc.items()}, token, tokens)


def weighted_xtx(block: nn.Module, inputs: list[BlockInput], layers: dict[str, nn.Module],
                 token: dict[str, torch.Tensor], n_windows: int) -> dict[str, torch.Tensor]:
    """Σ_t w_t x_t x_tᵀ ``(in, in)`` per layer over the first ``n_windows`` calibration windows, ``w`` the
    layer's per-token gradient weight (:class:`OutputFisher`), its windows in order."""
    out: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}

    def make_hook(n: str):
        def hook(mod, args):
            x = args[0].detach()  # (B, T, in)
            b0, take = state["first"], state["take"]
            xs = x[:take].to(torch.float32)
            w = token[n][b0 * x.shape[1]:(b0 + take) * x.shape[1]].to(xs.device).reshape(take, x.shape[1], 1)
            xw = (xs * w.sqrt()).reshape(-1, x.shape[-1])  # (take·T, in)
            h = (xw.T @ xw).double()
            out[n] = h if n not in out else out[n] + h

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for bi in inputs:
                take = min(bi.hidden.shape[0], n_windows - bi.first_window)
                if take <= 0:
                    break
                state.update(first=bi.first_window, take=take)
                block(bi.hidden, **bi.kwargs)
    finally:
        for h in handles:
            h.remove()
    return out


def predicted_kl(dw: torch.Tensor, xtx: torch.Tensor, fisher: torch.Tensor, tokens: int) -> float:
    """½ Σ_o f_o (ΔW H ΔWᵀ)_oo / tokens for ΔW ``(out, in)``, H ``(in, in)``, f ``(out,)``."""
    d = dw.to(torch.float32)
    per_row = ((d @ xtx.to(torch.float32)).double() * d.double()).sum(dim=1)  # (out,) = diag(ΔW H ΔWᵀ)
    return float(0.5 * (fisher.to(per_row) * per_row).sum()) / max(tokens, 1)


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


def unit_costs(mods: dict[str, nn.Module], stats: dict[str, LayerStats], fisher: OutputFisher,
               hw: dict[str, torch.Tensor], candidates: Sequence[str], method: str, config: MethodConfig
               ) -> dict[str, Cost]:
    """Each candidate's cost for one unit (``mods``: full name -> layer), quantizing each layer alone from its
    ``stats``; ``hw``: each layer's gradient-weighted XᵀX over the Fisher windows (:func:`weighted_xtx`)."""
    fn = get_method(method)
    out: dict[str, Cost] = {}
    seen: set[tuple[str, ...]] = set()
    for cand in candidates:
        schemes = [layer_scheme(m, cand, method) for m in mods.values()]
        if any(s is None for s in schemes):
            continue
        key = tuple(s.name for s in schemes if s is not None)
        if key in seen:  # another candidate already resolved to these very schemes (a GGML fallback)
            continue
        seen.add(key)
        nbytes, kl = 0, 0.0
        for (n, m), s in zip(mods.items(), schemes, strict=True):
            assert s is not None
            w = weight_matrix(m).to(torch.float32)
            st = stats[n]
            try:
                q = fn(w, st, s, config).qtensor
            except LowbitError as e:
                raise LowbitError(f"sensitivity: layer {n}, {cand}: {e}") from None
            nbytes += q.nbytes
            kl += predicted_kl(q.dequantize(torch.float32) - w, hw[n], fisher.channel[n], fisher.tokens)
        out[cand] = Cost(nbytes, kl, key if key != (cand,) * len(key) else ())
    return out


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


def measure_sensitivity(model: nn.Module, windows: torch.Tensor, *, method: str = "gptq",
                        config: MethodConfig | None = None, schemes: Sequence[str] = DEFAULT_SCHEMES,
                        fisher_windows: int = 8, seed: int = 0, batch_size: int = 8, tied: bool = True,
                        fixed_scheme: str = "int8", progress: bool | None = None) -> SensitivityTable:
    """The sensitivity table of ``model`` on calibration ``windows`` ``(N, T)``; ``method`` is the one the
    plan will quantize with, ``fisher_windows`` the first windows used for the backward pass."""
    cfg = config or MethodConfig()
    spec = method_spec(method)
    if spec.act or cfg.options.get("act"):
        raise LowbitError(f"--budget plans weight-only schemes; method {method} quantizes activations too")
    cands = [parse_scheme(s).name for s in schemes]
    info = arch_for(model)
    units = units_of(model, info, tied)
    mods = {n: model.get_submodule(n) for u in units for n in u}
    n_fisher = min(max(1, fisher_windows), int(windows.shape[0]))
    fisher = output_fisher(model, windows[:n_fisher], mods, seed)
    blocks_name, blocks = blocks_of(model, info)
    rows: list[Unit] = []
    tokens = 0
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks[0], windows, batch_size)
        for i in tqdm(range(len(blocks)), desc="sensitivity", disable=None if progress is None else not progress):
            block, prefix = blocks[i], f"{blocks_name}.{i}."
            rel = {n[len(prefix):]: n for n in mods if n.startswith(prefix)}
            layers = {full: block.get_submodule(r) for r, full in rel.items()}
            stats = collect_stats(block, inputs, layers, set(layers))
            hw = weighted_xtx(block, inputs, layers, fisher.token, n_fisher)
            for u in (u for u in units if u[0].startswith(prefix)):
                um = {n: layers[n] for n in u}
                costs = unit_costs(um, stats, fisher, hw, cands, method, cfg)
                rows.append(Unit(u, sum(weight_matrix(m).numel() for m in um.values()), costs))
            tokens = max([tokens] + [s.tokens for s in stats.values()])
            inputs = run_block(block, inputs)
    fixed = fixed_layers(model, units, fixed_scheme)
    fbytes, flin = fixed_bytes(model, units, fixed)
    return SensitivityTable(
        model=fingerprint(model), method=method, config=cfg, candidates=tuple(cands), units=tuple(rows),
        fixed=fixed, fixed_bytes=fbytes, fixed_linear=flin, windows=int(windows.shape[0]),
        window_len=int(windows.shape[1]), fisher_windows=n_fisher, seed=seed, proxy="fisher-rank1",
        tokens=tokens)

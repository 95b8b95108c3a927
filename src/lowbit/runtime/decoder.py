"""lowbit's own decoder: prefill and token-by-token decode of a Llama-family causal LM on a static KV cache.

transformers' forward spends as long in Python as a quantized model spends in its matrix products (masks,
a growing cache concatenated per step, wrappers per layer: about 15 ms of a 33 ms SmolLM2 decode step on
one core). A :class:`Decoder` runs the same modules — float ``nn.Linear`` or lowbit's quantized layers
with their kernels — through a short loop of its own:

* layers that read one input (q, k and v; gate and up) run as **one** kernel call where a kernel can stack
  them (:func:`lowbit.kernels.base.stacked`: lowbit's C++ GEMVs at 1–16 tokens; the stacked weight is held
  once, each layer's packed state becomes a view of its rows), else one call each;
* the KV cache is preallocated per layer and written in place (grown by doubling);
* rotary embeddings come from the model's own ``rotary_emb`` (every RoPE variant transformers implements),
  once per step; attention is ``scaled_dot_product_attention`` with grouped KV heads.

It computes what the model's own forward computes, up to float32 rounding order (tested against it on
Llama, Mistral and Qwen2 configs, float and quantized). What it runs: ``model_type`` llama, mistral or
qwen2 with SiLU MLPs, RMSNorm, no sliding window in effect, batch rows of equal length (no padding).
:func:`unsupported` says why a model is not one of those; callers then use transformers' forward.

A Decoder reads the model's weights (and packs the kernels' states) when built: build a new one after
changing them.

>>> dec = Decoder(model)                    # doctest: +SKIP
>>> # prefill: (batch, vocab), the next token's logits after ids; step: one more token on the cache
>>> logits = dec.prefill(ids)               # doctest: +SKIP
>>> logits = dec.step(logits.argmax(-1))    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from time import perf_counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.base import HUGE_ACTIVATION, kernel_mode, stacked

MODEL_TYPES = ("llama", "mistral", "qwen2")
_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def unsupported(model: nn.Module) -> str | None:
    """Why :class:`Decoder` cannot run ``model``, or None when it can."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in MODEL_TYPES:
        return f"model type {mt!r} is not one the runtime runs ({', '.join(MODEL_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (the runtime runs SiLU MLPs)"
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not len(layers) or getattr(model, "lm_head", None) is None:
        return f"{type(model).__name__} has no model.layers / lm_head"
    for name in ("embed_tokens", "norm", "rotary_emb"):
        if getattr(inner, name, None) is None:
            return f"{type(model).__name__} has no model.{name}"
    for i, layer in enumerate(layers):
        for p in _LAYER_PARTS:
            try:
                layer.get_submodule(p)
            except AttributeError:
                return f"layer {i} has no {p}"
        if any(t.is_meta for t in layer.parameters()):
            return f"layer {i} is not loaded (meta tensors)"
    return None


def _norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
    return F.rms_norm(x.to(torch.float32), (x.shape[-1],), m.weight.to(torch.float32), eps).to(x.dtype)


class Linears:
    """Layers reading one input, called as one: ``Linears(mods).runner(tokens, dtype)`` is a callable ``x ->
    cat([m(x) for m in mods], -1)``, one stacked kernel call where :func:`~lowbit.kernels.base.stacked` finds
    a kernel for these layers at that batch size under the current kernel mode, else each layer's own forward
    (resolved once per batch size, dtype, kernel mode and thread count)."""

    def __init__(self, mods: Sequence[nn.Module]):
        self.mods = list(mods)
        self.sizes = [m.out_features for m in self.mods]
        self._runs: dict[tuple, tuple[str | None, Any]] = {}
        self.kernel: str | None = None  # the stacking kernel's name at the last resolved call, if any

    def _resolve(self, tokens: int, dtype: torch.dtype, fuse: bool = True) -> tuple[str | None, Any]:
        hit = stacked(self.mods, tokens, dtype) if fuse else None
        if hit is not None:
            return hit[0].name, hit[1]
        mods = self.mods
        if len(mods) == 1:
            return None, mods[0]
        return None, lambda x: torch.cat([m(x) for m in mods], -1)

    def runner(self, tokens: int, dtype: torch.dtype, fuse: bool = True):
        """``fuse=False``: each layer's own forward (its own kernel choice), never a stacked call."""
        key = (tokens, dtype, kernel_mode(), torch.get_num_threads(), fuse)
        hit = self._runs.get(key)
        if hit is None:
            hit = self._runs[key] = self._resolve(tokens, dtype, fuse)
        self.kernel = hit[0]
        return hit[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x.numel() // x.shape[-1], x.dtype)(x)


class _Layer:
    def __init__(self, layer: nn.Module):
        a, m = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.eps1, self.eps2 = (getattr(n, "variance_epsilon", getattr(n, "eps", 1e-6)) for n in (self.ln1, self.ln2))
        self.groups = (Linears([a.q_proj, a.k_proj, a.v_proj]), Linears([a.o_proj]),
                       Linears([m.gate_proj, m.up_proj]), Linears([m.down_proj]))
        self.inter = m.gate_proj.out_features
        self.scaling = getattr(a, "scaling", None)

    def runners(self, tokens: int, dtype: torch.dtype, fuse: bool = True) -> tuple:
        return tuple(g.runner(tokens, dtype, fuse) for g in self.groups)

    def native_args(self) -> tuple | None:
        """The packed states of the four products for ``layer_step`` (csrc/layer.h) at one float32 token, or
        None when one of them is not a stacked C++ GEMV."""
        tensors, meta = [], []
        empty = torch.empty(0)
        for run in self.runners(1, torch.float32):
            name, st = getattr(run, "state", (None, None))
            if name == "int4-cpp":
                packed, scale, minv, g, bias, isa = st
                tensors += [packed, scale, minv, empty if bias is None else bias]
                meta += [0, g, isa]
            elif name == "grid8-cpp":  # any affine grid of up to 8 bits, repacked to int8 codes
                codes, scale, minv, g, bias, isa = st
                tensors += [codes, scale, minv, empty if bias is None else bias]
                meta += [3, g, isa]
            elif name == "int8-cpp":
                codes, scale, g, bias, isa = st
                tensors += [codes, scale, empty, empty if bias is None else bias]
                meta += [1, g, isa]
            elif name == "int8-int8-cpp":  # W8A8 (the stacking refused SmoothQuant input scales)
                codes, scale, bias, isa = st
                static = torch.tensor([run.static], dtype=torch.float32) if run.static > 0 else empty
                tensors += [codes, scale, static, empty if bias is None else bias]
                meta += [2, 32, isa]
            else:
                return None
        return (self.ln1.weight.detach().to(torch.float32).contiguous(), float(self.eps1),
                self.ln2.weight.detach().to(torch.float32).contiguous(), float(self.eps2), tensors, meta)


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x·cos + rotate_half(x)·sin`` as ``x·cos + roll(x, d/2)·sin'`` (transformers' rotate_half is
    ``cat(−x₂, x₁)``, so ``sin'`` is ``sin`` with its first half negated)."""
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), -1)


class Decoder:
    """Prefill and decode ``model`` (see the module docstring) on a KV cache of its own.

    ``prefill(ids)`` starts a new sequence, ``step(ids)`` appends tokens to it; both return the logits of the
    last position ``(batch, vocab)`` (``forward(ids, all_logits=True)``: every position's)."""

    def __init__(self, model: nn.Module):
        why = unsupported(model)
        if why is not None:
            raise LowbitError(f"lowbit runtime: {why}")
        cfg = model.config
        inner = model.model
        self.model = model
        self.embed, self.norm, self.rotary, self.head = inner.embed_tokens, inner.norm, inner.rotary_emb, model.lm_head
        self.layers = [_Layer(layer) for layer in inner.layers[: cfg.num_hidden_layers]]
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = inner.layers[0].self_attn.head_dim
        self.lm = Linears([self.head])
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self.pos = 0  # tokens in the cache
        self._native_args: dict[tuple, Any] = {}
        self.layers_native = False  # the last call ran each layer as one C++ call (csrc/layer.h)
        # one-token steps, under kernel tuning: stacked C++ GEMVs (and one C++ call per layer) or each layer's own
        # measured kernel, whichever ran the first TRIAL_STEPS steps faster (by key: mode, threads, batch)
        self._fuse: dict[tuple, bool] = {}
        self._trials: dict[tuple, list[tuple[bool, float]]] = {}

    # -- the cache ------------------------------------------------------------------------------------------
    def _room(self, batch: int, end: int, like: torch.Tensor) -> None:
        have = self._k[0].shape[2] if self._k else 0
        if self._k and self._k[0].shape[0] == batch and self._k[0].dtype == like.dtype and end <= have:
            return
        cap = max(end, 2 * have, 256)
        shape = (batch, self.kv_heads, cap, self.head_dim)
        new_k = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in self.layers]
        new_v = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in self.layers]
        if self._k and self._k[0].shape[0] == batch and self.pos:
            for old, new in zip([*self._k, *self._v], [*new_k, *new_v], strict=True):
                new[:, :, : self.pos] = old[:, :, : self.pos]
        self._k, self._v = new_k, new_v

    def reset(self) -> None:
        """Forget the sequence (the cache's memory is kept for the next one)."""
        self.pos = 0

    TRIAL_STEPS = 6  # one-token steps measured, alternately stacked and per layer, before the choice is kept

    def _fusing(self, b: int, t: int) -> tuple[bool, list | None]:
        """Whether this call stacks layers (and runs whole layers in C++), and the trial list to time it into
        while the choice is being measured. Only one-token steps under kernel tuning are measured: the stacked
        C++ GEMVs are fixed kernels, and on some CPUs torch's packed kernels, chosen per layer by measurement,
        are faster (a 7B-wide int4 model on an AMX Xeon: bench/RESULTS.md)."""
        from lowbit.kernels import tuning

        if t != 1 or kernel_mode() != "auto" or not tuning.enabled():
            return True, None
        key = (kernel_mode(), torch.get_num_threads(), b)
        if key in self._fuse:
            return self._fuse[key], None
        trial = self._trials.setdefault(key, [])
        if len(trial) >= self.TRIAL_STEPS:
            best = {f: min(s for g, s in trial if g == f) for f in (True, False)}
            self._fuse[key] = best[True] <= best[False]
            del self._trials[key]
            return self._fuse[key], None
        return len(trial) % 2 == 0, trial

    def _native(self):
        """``(library, per-layer layer_step arguments)`` when every layer's four products are stacked C++ GEMVs
        at one float32 token under the current kernel mode (one C++ call per layer), else None."""
        key = (kernel_mode(), torch.get_num_threads())
        if key not in self._native_args:
            from lowbit.kernels import native

            lib = native.library()
            args = [L.native_args() for L in self.layers] if lib is not None and hasattr(lib, "layer_step") else [None]
            self._native_args[key] = None if any(a is None for a in args) else (lib, args)
        return self._native_args[key]

    # -- the forward ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Append ``ids`` ``(batch, T)`` to the sequence; the logits of its last position ``(batch, vocab)``, or
        of every new position ``(batch, T, vocab)`` with ``all_logits``."""
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise LowbitError(f"lowbit runtime: ids must be (batch, tokens), got shape {tuple(ids.shape)}")
        b, t = ids.shape
        start = self.pos
        if start and self._k and self._k[0].shape[0] != b:
            raise LowbitError(f"lowbit runtime: batch {b} after a sequence of batch {self._k[0].shape[0]}; "
                              "call prefill() to start a new one")
        x = self.embed(ids)
        positions = torch.arange(start, start + t, device=ids.device).unsqueeze(0)
        cos, sin = _rope_tables(*self.rotary(x, positions))
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (1, T, 1, head_dim): broadcast over batch and heads
        self._room(b, start + t, x)
        end = start + t
        if t == 1:
            mask, causal = None, False
        elif start == 0:
            mask, causal = None, True
        else:  # new tokens see the cache and the new tokens before them
            mask, causal = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(start), False
        gqa = self.kv_heads != self.heads
        nh, nkv, hd = self.heads, self.kv_heads, self.head_dim
        fuse, trial = self._fusing(b, t)
        t_start = perf_counter() if trial is not None else 0.0
        native = self._native() if fuse and b * t == 1 and x.dtype == torch.float32 else None
        if native is not None:
            lib, layers = native
            x = x.reshape(1, -1).contiguous()
            c, s_ = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()
            for i, (L, args) in enumerate(zip(self.layers, layers, strict=True)):
                lib.layer_step(x, *args, self._k[i], self._v[i], start, c, s_, nh, nkv, hd,
                               L.scaling or hd ** -0.5, L.inter, HUGE_ACTIVATION)
            x = x.view(b, t, -1)
            self.layers_native = True
        else:
            self.layers_native = False
        half = hd // 2
        for i, L in enumerate(self.layers if native is None else ()):
            qkv_run, o_run, gu_run, down_run = L.runners(b * t, x.dtype, fuse)
            qkv = qkv_run(F.rms_norm(x, (x.shape[-1],), L.ln1.weight, L.eps1)).view(b, t, nh + 2 * nkv, hd)
            qk = qkv[:, :, : nh + nkv]
            qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)  # rotary on q and k at once
            q = qk[:, :, :nh].transpose(1, 2)
            kc, vc = self._k[i], self._v[i]
            kc[:, :, start:end] = qk[:, :, nh:].transpose(1, 2)
            vc[:, :, start:end] = qkv[:, :, nh + nkv:].transpose(1, 2)
            a = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=mask, is_causal=causal,
                                               scale=L.scaling, enable_gqa=gqa)
            x = x + o_run(a.transpose(1, 2).reshape(b, t, nh * hd))
            gu = gu_run(F.rms_norm(x, (x.shape[-1],), L.ln2.weight, L.eps2))
            x = x + down_run(F.silu(gu[..., : L.inter]) * gu[..., L.inter:])
        self.pos = end
        x = x if all_logits else x[:, -1:]
        logits = self.lm(_norm(self.norm, x))
        if trial is not None:
            trial.append((fuse, perf_counter() - t_start))
        return logits if all_logits else logits[:, 0]

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence with ``ids`` ``(batch, T)``; the next token's logits ``(batch, vocab)``."""
        self.reset()
        return self.forward(ids)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` ``(batch,)`` or ``(batch, T)``; the next token's logits ``(batch, vocab)``."""
        if self.pos == 0:
            raise LowbitError("lowbit runtime: step() before prefill()")
        return self.forward(ids.reshape(ids.shape[0], -1))

    def kernels(self) -> dict[str, int]:
        """Quantized layers per kernel at the last call: a stacking kernel's name for the layers it ran as one
        (``int4-cpp`` …; also inside the one-call C++ layers), else the kernel each layer's own forward chose
        (float layers are not counted)."""
        out: dict[str, int] = {}
        groups = [g for L in self.layers for g in L.groups]
        if self.layers_native:
            for g in groups:
                g.runner(1, torch.float32)  # what the C++ layers ran (sets g.kernel)
        for g in [*groups, self.lm]:
            for m in g.mods:
                k = g.kernel or getattr(getattr(m, "_kernel", None), "name", None)
                if k:
                    out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items()))


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.to(torch.float32) / max(temperature, 1e-6)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate(model: nn.Module | Decoder, ids: torch.Tensor, max_new_tokens: int = 32, *,
             eos_token_id: int | Sequence[int] | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``ids`` ``(batch, T)`` followed by up to ``max_new_tokens`` tokens, through lowbit's runtime (greedy by
    default; ``do_sample`` draws from the softmax at ``temperature``, among the ``top_k`` best). A row that
    emits an EOS id keeps emitting it; generation stops when every row has. ``model``: a model
    :class:`Decoder` runs (see :func:`unsupported`) or a Decoder.

    >>> out = generate(model, ids, 16, eos_token_id=tok.eos_token_id)   # doctest: +SKIP
    """
    dec = model if isinstance(model, Decoder) else Decoder(model)
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or ()))
    out = [ids]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    logits = dec.prefill(ids)
    for n in range(max_new_tokens):
        nxt = _pick(logits, do_sample, temperature, top_k, generator)
        if eos:
            stop = torch.tensor(sorted(eos), device=ids.device)
            nxt = torch.where(done, stop[0], nxt)
            done = done | torch.isin(nxt, stop)
        out.append(nxt.unsqueeze(1))
        if (eos and bool(done.all())) or n == max_new_tokens - 1:
            break
        logits = dec.step(nxt)
    return torch.cat(out, 1)

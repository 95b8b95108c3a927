"""Float layer -> quantized layer, keeping everything the float layer computed except how its weight is stored.

A conversion is registered per float module type (``@register_conversion``) and copies what that type's
forward uses beyond the weight: the bias, the padding index, an embedding's output scale (Gemma's
``*ScaledWordEmbedding`` multiplies the looked-up rows by √hidden). A subclass that keeps its parent's
``forward`` inherits the parent's conversion; one that overrides ``forward`` with arithmetic no conversion
declares is refused with a one-line error naming the layer (keep it in float with ``--keep LAYER``), never
swapped silently. Every conversion is then checked on a probe input: the quantized module's arithmetic,
run with the float weight, must give what the float module gives — so a conversion that forgets something
fails loudly at quantize time instead of producing a model that computes something else.

>>> emb = model.model.embed_tokens
>>> new = quantized_module("model.embed_tokens", emb, lowbit.quantize_tensor(emb.weight.detach(), "int8"))
>>> type(new).__name__, new.padding_idx == emb.padding_idx
('QEmbedding', True)
>>> class Doubled(torch.nn.Linear):           # arithmetic of its own that no conversion declares
...     def forward(self, x):
...         return 2 * super().forward(x)
>>> quantized_module("head", Doubled(64, 8), lowbit.quantize_tensor(torch.randn(8, 64), "int8"))  # doctest: +ELLIPSIS
Traceback (most recent call last):
lowbit.errors.LowbitError: layer head: Doubled overrides Linear.forward with arithmetic lowbit has no ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.core.qtensor import QTensor
from lowbit.errors import LowbitError
from lowbit.model.qmodules import QConv2d, QEmbedding, QLinear
from lowbit.registry import Registry

PROBE_TOL = 1e-3  # relative difference allowed between the float module and the quantized arithmetic


@dataclass(frozen=True)
class Conversion:
    float_type: type[nn.Module]
    build: Callable[[nn.Module, QTensor], nn.Module]
    accepts: Callable[[nn.Module], bool]  # this module's forward is what ``build`` reproduces


CONVERSIONS: Registry[Conversion] = Registry("conversion")


def _same_forward(base: type[nn.Module]) -> Callable[[nn.Module], bool]:
    return lambda m: type(m).forward is base.forward


def register_conversion(float_type: type[nn.Module], accepts: Callable[[nn.Module], bool] | None = None,
                        name: str | None = None):
    """Register ``build(float_module, qtensor) -> quantized module`` for ``float_type``; later ones win.

    ``accepts`` (default: the module's class does not override ``float_type.forward``) says which
    instances the conversion reproduces exactly. ``name`` (default: the build function's name without
    leading underscores) must be new.
    """

    def deco(build: Callable[[nn.Module, QTensor], nn.Module]):
        key = name or build.__name__.lstrip("_")
        CONVERSIONS.add(key, Conversion(float_type, build, accepts or _same_forward(float_type)))
        return build

    return deco


def _latest_first() -> list[Conversion]:
    return CONVERSIONS.values()[::-1]


def conversion_for(mod: nn.Module) -> Conversion | None:
    return next((c for c in _latest_first() if isinstance(mod, c.float_type) and c.accepts(mod)), None)


def weight_matrix(mod: nn.Module) -> torch.Tensor:
    """(out, in) weight; transformers' Conv1D (GPT-2) stores (in, out)."""
    from transformers.pytorch_utils import Conv1D

    w = mod.weight.detach()
    if isinstance(mod, nn.Conv2d):  # one row per output channel: (out, in / groups × kh × kw)
        return w.reshape(w.shape[0], -1)
    return w.T.contiguous() if isinstance(mod, Conv1D) else w


def check_convertible(name: str, mod: nn.Module) -> None:
    """Raise a one-line error when no registered conversion reproduces ``mod``'s forward."""
    if conversion_for(mod) is not None:
        return
    cls = type(mod).__name__
    if isinstance(mod, nn.Embedding) and mod.max_norm is not None:
        why = "renormalises rows to max_norm on every lookup"
    else:
        base = next((c.float_type.__name__ for c in _latest_first() if isinstance(mod, c.float_type)), "nn.Module")
        why = f"overrides {base}.forward with arithmetic lowbit has no conversion for"
    raise LowbitError(f"layer {name}: {cls} {why}; quantizing it would change what the model computes — "
                      f"keep it in float (--keep {name}) or register a conversion in lowbit.model.convert")


def quantized_module(name: str, mod: nn.Module, q: QTensor, *, probe: bool = True) -> nn.Module:
    """The quantized replacement of float layer ``mod`` (named ``name``), checked against it on a probe."""
    check_convertible(name, mod)
    conv = conversion_for(mod)
    assert conv is not None
    new = conv.build(mod, q)
    if probe and not mod.weight.is_meta:
        _probe(name, mod, new)
    return new


@torch.no_grad()
def _probe(name: str, mod: nn.Module, new: nn.Module) -> None:
    """The quantized module's arithmetic with the float weight must reproduce the float module."""
    w = weight_matrix(mod)
    if isinstance(new, QEmbedding):
        n = new.num_embeddings
        x = torch.unique(torch.tensor([0, 1, n // 2, n - 1] + ([new.padding_idx % n] if new.padding_idx is not None
                                                                  else []), device=w.device))
        got = new.finish(torch.nn.functional.embedding(x, w))
    elif isinstance(new, QConv2d):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, new.in_channels, *(max(k, 5) for k in new.kernel_size), generator=g).to(w.device, w.dtype)
        got = new.conv_with(x, mod.weight.detach())
    else:
        assert isinstance(new, QLinear)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(2, new.in_features, generator=g).to(device=w.device, dtype=w.dtype)
        got = new.linear_with(x, w)
    want = mod(x)
    err = float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30))
    if got.shape != want.shape or not err <= PROBE_TOL:
        raise LowbitError(f"layer {name}: the quantized {type(new).__name__} does not reproduce "
                          f"{type(mod).__name__}'s forward (relative difference {err:.2g} with the float weight); "
                          f"keep it in float (--keep {name})")


# -- the registered conversions ------------------------------------------------------------------------
@register_conversion(nn.Linear)
def _linear(mod: nn.Linear, q: QTensor) -> QLinear:
    return QLinear(q, mod.bias)


def _conv1d_type() -> type[nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


@register_conversion(_conv1d_type())
def _conv1d(mod: nn.Module, q: QTensor) -> QLinear:
    """GPT-2's Conv1D: ``x W + b`` with W (in, out); ``q`` holds Wᵀ (out, in), as every QLinear does."""
    return QLinear(q, mod.bias)


@register_conversion(nn.Embedding, accepts=lambda m: type(m).forward is nn.Embedding.forward and m.max_norm is None)
def _embedding(mod: nn.Embedding, q: QTensor) -> QEmbedding:
    return QEmbedding(q, mod.padding_idx)


def _is_scaled_embedding(m: nn.Module) -> bool:
    """transformers' ``*ScaledWordEmbedding`` (Gemma 2/3, and the others written the same way): the lookup
    times ``embed_scale``. The probe checks each instance really computes that."""
    return (type(m).__name__.endswith("ScaledWordEmbedding") and isinstance(m.embed_scale, torch.Tensor | float)
            if hasattr(m, "embed_scale") else False) and m.max_norm is None


@register_conversion(nn.Embedding, accepts=_is_scaled_embedding)
def _scaled_embedding(mod: nn.Embedding, q: QTensor) -> QEmbedding:
    return QEmbedding(q, mod.padding_idx, embed_scale=torch.as_tensor(mod.embed_scale, dtype=torch.float32))


@register_conversion(nn.Conv2d, accepts=lambda m: type(m).forward is nn.Conv2d.forward and m.padding_mode == "zeros"
                     and isinstance(m.padding, tuple))
def _conv2d(mod: nn.Conv2d, q: QTensor) -> QConv2d:
    return QConv2d.from_float(mod, q)


@register_conversion(QLinear)
def _requantize_linear(mod: QLinear, q: QTensor) -> QLinear:
    return QLinear(q, mod.bias)


@register_conversion(QEmbedding)
def _requantize_embedding(mod: QEmbedding, q: QTensor) -> QEmbedding:
    return QEmbedding(q, mod.padding_idx, embed_scale=mod.embed_scale)


def float_twin(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``model`` with every quantized layer back as the float module it came from (weights
    dequantized into ``dtype``): the float baseline a quantized model's speed is measured against when its
    float source is not at hand. Values are the quantized ones; shapes, modules and arithmetic are float's."""
    import copy

    twin = copy.deepcopy(model)
    weights: dict[int, nn.Parameter] = {}  # layers sharing one QTensor (a tied head) share one float weight

    def weight(mod: QLinear | QEmbedding) -> nn.Parameter:
        key = id(mod.qweight_codes)
        if key not in weights:
            weights[key] = nn.Parameter(mod.qweight.dequantize(dtype), requires_grad=False)
        return weights[key]

    for name, mod in list(twin.named_modules(remove_duplicate=False)):
        if isinstance(mod, QLinear):
            new: nn.Module = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            new.weight = weight(mod)
            if mod.bias is not None:
                new.bias = nn.Parameter(mod.bias.detach().to(dtype), requires_grad=False)
        elif isinstance(mod, QEmbedding) and mod.embed_scale is None:
            new = nn.Embedding(mod.num_embeddings, mod.embedding_dim, mod.padding_idx, device="meta")
            new.weight = weight(mod)
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, leaf, new)
    return twin

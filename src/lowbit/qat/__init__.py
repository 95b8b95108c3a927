"""Quantization-aware training: layers that train on the exact grid they are stored on.

Two ways in. The runner's way: ``lowbit.quantize(model, tok, scheme, method="qat", calib=...)`` (or
``lowbit quantize … --method qat``) quantizes each block with a post-training method (``init``, GPTQ by
default) and then trains the block's layers against the float block's outputs (:mod:`lowbit.qat.block`),
block by block, in bounded memory. Your own training loop: ``prepare`` swaps every planned linear layer for a
:class:`QATLinear` (fake-quant on its layout's grid: latent weight + learnable scales), you train, and
``convert`` gives back the same ``QLinear`` layers every other method produces:

>>> qat_model = lowbit.qat.prepare(model, "int4-g64")         # or prepare(qmodel): start from a PTQ result
>>> loss = my_loss(qat_model(ids).logits); loss.backward(); opt.step()   # doctest: +SKIP
>>> qmodel = lowbit.qat.convert(qat_model)
>>> type(qmodel.model.layers[0].mlp.up_proj).__name__
'QLinear'
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError
from lowbit.methods.registry import LayerStats, method_spec
from lowbit.model.plan import Plan
from lowbit.model.quantize import _set_module
from lowbit.qat.block import BlockTraining, BlockTrainOptions, train_block
from lowbit.qat.modules import QATConv2d, QATLinear
from lowbit.qat.static import StaticQatOptions, convert_static, prepare_static, train_static

__all__ = ["BlockTrainOptions", "BlockTraining", "QATConv2d", "QATLinear", "StaticQatOptions", "convert",
           "convert_static", "prepare", "prepare_static", "train_block", "train_static"]


def prepare(model: nn.Module, plan: Plan | str | Scheme | None = None) -> nn.Module:
    """``model`` (in place) with its linear layers as :class:`QATLinear` (a quantized model's convs as
    :class:`QATConv2d`).

    A float model needs ``plan`` (or a scheme: every linear layer at it): each planned layer's grid starts at
    its method's data-free result (RTN, HQQ …) and its latent weight at the float weight. A quantized model
    (``QLinear`` layers, from any method) needs no plan: each layer starts exactly at its stored weight and
    grid, so ``convert(prepare(qmodel))`` is ``qmodel`` again. Layers with quantized activations stay as they are.
    """
    from lowbit.model.qmodules import QConv2d, QLinear

    quantized = [(n, m) for n, m in model.named_modules()
                 if (isinstance(m, QLinear) and m.act_scheme is None) or isinstance(m, QConv2d)]
    if quantized:
        for n, m in quantized:
            _set_module(model, n, QATConv2d.from_qconv(m) if isinstance(m, QConv2d)
                        else QATLinear(m.qweight, m.qweight.dequantize(torch.float32), m.bias))
        return model
    if plan is None:
        raise LowbitError("qat.prepare: a float model needs a plan or a scheme (e.g. 'int4-g64')")
    if not isinstance(plan, Plan):
        plan = Plan.default(plan)
    for name, lp in plan.resolve(model).items():
        mod = model.get_submodule(name)
        if lp.scheme is None or lp.kind != "linear" or not isinstance(mod, nn.Linear):
            continue
        spec = method_spec(lp.method)
        if spec.needs:
            raise LowbitError(f"qat.prepare: layer {name}: method {lp.method} needs calibration statistics; "
                              f"quantize with calibration first (lowbit.quantize) and prepare the quantized model")
        try:
            q = spec.fn(mod.weight.detach(), LayerStats(), lp.scheme, lp.config).qtensor
        except LowbitError as e:
            raise LowbitError(f"layer {name}: {e}") from None
        _set_module(model, name, QATLinear(q, mod.weight.detach(), mod.bias))
    return model


def convert(model: nn.Module) -> nn.Module:
    """``model`` (in place) with every :class:`QATLinear` stored as the ``QLinear`` of its trained weight (a
    :class:`QATConv2d` as its ``QConv2d``)."""
    from lowbit.model.qmodules import QLinear

    for n, m in [(n, m) for n, m in model.named_modules() if isinstance(m, QATLinear)]:
        if isinstance(m, QATConv2d):
            _set_module(model, n, m.to_qconv())
        else:
            with torch.no_grad():
                _set_module(model, n, QLinear(m.to_qtensor(), m.current_bias()))
    return model

"""A model as a graph (torch.fx), for models that are not transformers driven by ``input_ids``: CNNs, any module.

:func:`trace` turns a module into a ``GraphModule`` (the same submodules, under the same names);
:func:`fold_batchnorm` folds every BatchNorm that follows a convolution into the conv's weight and bias;
:func:`activation_points` says where a full-integer runtime (TFLite, onnxruntime's QDQ) holds activations as
integers: the input of every quantized layer, the output of every quantized layer (after the ReLU/ReLU6 that
the runtime fuses into it), and the output of every add, so that adds run on integers too.

>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU6()).eval()
>>> gm = trace(m); fold_batchnorm(gm)
1
>>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
['0', '2']
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError

QUANTIZABLE = (nn.Conv2d, nn.Linear)
# ops whose output stays on its input's integer grid (a runtime runs them on integers as they are)
_SAME_GRID_MODULES = (nn.Flatten, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.ReLU, nn.Unflatten)
_SAME_GRID_FUNCTIONS = {torch.flatten, torch.reshape, F.dropout, F.max_pool2d, F.relu, torch.relu}
_SAME_GRID_METHODS = {"view", "reshape", "flatten", "contiguous", "relu"}
_ADDS = {operator.add, operator.iadd, torch.add}
_FUSED_ACT_MODULES = (nn.ReLU, nn.ReLU6)
_FUSED_ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6}


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as a torch.fx GraphModule (a new module sharing ``model``'s parameters: copy first to keep it)."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001  (fx raises many kinds; the user needs the first line)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LowbitError(f"model {type(model).__name__}: torch.fx cannot trace its forward ({first}); "
                          f"a model with data-dependent control flow needs a traceable wrapper") from None


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


@torch.no_grad()
def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold each eval-mode BatchNorm2d whose input is a Conv2d's output used nowhere else; returns how many."""
    folded = 0
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, nn.BatchNorm2d) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        conv = module_of(gm, src)
        if not isinstance(conv, nn.Conv2d) or len(src.users) != 1 or bn.running_mean is None:
            continue
        inv = (bn.running_var + bn.eps).rsqrt()
        g = inv if bn.weight is None else bn.weight * inv  # (C,)
        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        beta = torch.zeros_like(g) if bn.bias is None else bn.bias
        conv.weight.copy_(conv.weight * g.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter((b - bn.running_mean) * g + beta, requires_grad=False)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    if folded:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return folded


def _is_fused_act(gm: fx.GraphModule, node: fx.Node) -> bool:
    m = module_of(gm, node)
    if m is not None:
        return isinstance(m, _FUSED_ACT_MODULES) or (isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0, 6))
    return node.op == "call_function" and node.target in _FUSED_ACT_FUNCTIONS


def same_grid(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` passes its first input's integer values through (reshapes, max-pool, dropout in eval, ReLU)."""
    m = module_of(gm, node)
    if m is not None:
        return isinstance(m, _SAME_GRID_MODULES)
    if node.op == "call_function":
        return node.target in _SAME_GRID_FUNCTIONS
    return node.op == "call_method" and node.target in _SAME_GRID_METHODS


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2
    return node.op == "call_method" and node.target == "add"


@dataclass(frozen=True)
class Point:
    """An activation quantization point: ``node``'s output, for ``users`` (None: every user) of it."""

    node: fx.Node
    users: tuple[fx.Node, ...] | None
    why: str  # "input of features.1.conv.0.0", "output of …", "output of add_3"


def activation_points(gm: fx.GraphModule, quantized: set[str]) -> list[Point]:
    """Where activations are quantized for layers ``quantized`` (module names), in graph order."""
    outputs: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in quantized:
            end = node
            if len(node.users) == 1 and _is_fused_act(gm, next(iter(node.users))):
                end = next(iter(node.users))
            outputs[end] = f"output of {node.target}"
        elif is_add(node) and _touches(node, quantized, gm):
            outputs[node] = f"output of {node.name}"

    def on_grid(n: fx.Node) -> bool:
        while n not in outputs and same_grid(gm, n) and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        return n in outputs

    inputs: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        is_layer = node.op == "call_module" and node.target in quantized
        if not (is_layer or (is_add(node) and node in outputs)):
            continue
        for a in node.args[: 1 if is_layer else 2]:
            if isinstance(a, fx.Node) and not on_grid(a):
                inputs.setdefault(a, []).append(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    points = [Point(n, None, why) for n, why in outputs.items()]
    for n, users in inputs.items():
        names = ", ".join(u.target if u.op == "call_module" else u.name for u in users)
        points.append(Point(n, tuple(users), f"input of {names}"))
    return sorted(points, key=lambda p: (order[p.node], p.users is not None))


def _touches(add: fx.Node, quantized: set[str], gm: fx.GraphModule) -> bool:
    """The add is worth running on integers: a quantized layer feeds it (through same-grid ops)."""
    for a in add.args[:2]:
        n = a
        while isinstance(n, fx.Node):
            if n.op == "call_module" and n.target in quantized:
                return True
            if is_add(n):
                return True
            if not (same_grid(gm, n) or _is_fused_act(gm, n)) or not n.args:
                break
            n = n.args[0]
    return False


def insert_modules(gm: fx.GraphModule, points: list[Point], make) -> dict[str, Point]:
    """Insert ``make(point)`` (a module) after each point's node, for its users; returns name -> point."""
    made: dict[str, Point] = {}
    for i, p in enumerate(points):
        name = f"lowbit_act_{i}"
        gm.add_submodule(name, make(p))
        with gm.graph.inserting_after(p.node):
            new = gm.graph.call_module(name, (p.node,))
        users = list(p.node.users) if p.users is None else list(p.users)
        for u in users:
            if u is not new:
                u.replace_input_with(p.node, new)
        made[name] = p
    gm.graph.lint()
    gm.recompile()
    return made


@torch.no_grad()
def equalize_ranges(gm: fx.GraphModule, run, alpha: float = 0.5, margin: float = 1.5) -> int:
    """Even out the per-channel ranges of each conv → ReLU/ReLU6 → depthwise conv's middle activation, which one
    per-tensor grid must hold (cross-layer equalization, Nagel et al. 2019, on activations): channel i of the first
    conv is scaled up by ``k_i = (max_j m_j / m_i) ** alpha`` (m: its largest output on the calibration inputs,
    ``run(gm)``) and the depthwise conv's channel i down by the same factor, so a small-ranged channel gets more
    of the grid. ReLU is positively homogeneous, so the model is unchanged; under ReLU6 the scaled channel must
    still stay below 6 where it was observed: ``k_i <= 6 / (margin · m_i)`` (inputs far past the calibration maxima
    can then clip sooner). Returns how many pairs were equalized.
    """
    pairs = []
    for node in gm.graph.nodes:
        first = module_of(gm, node)
        if not isinstance(first, nn.Conv2d) or len(node.users) != 1:
            continue
        act = next(iter(node.users))
        act_mod = module_of(gm, act)
        if not isinstance(act_mod, nn.ReLU | nn.ReLU6) or len(act.users) != 1:
            continue
        second = module_of(gm, next(iter(act.users)))
        # only into a depthwise conv: its weight rows are its channels, so dividing a channel leaves its per-channel
        # weight grid as good as before (into a regular conv the division unbalances every row: MobileNetV2's
        # weights-only agreement fell from 97.8% to 95.6% when the projections took it too)
        if isinstance(second, nn.Conv2d) and second.groups == second.in_channels == first.out_channels > 1:
            pairs.append((first, act_mod, second))
    if not pairs:
        return 0
    peak: dict[int, torch.Tensor] = {}

    def hook(mod, args, out):
        m = out.detach().amax(dim=(0, 2, 3)).float()
        peak[id(mod)] = m if id(mod) not in peak else torch.maximum(peak[id(mod)], m)

    handles = [act.register_forward_hook(hook) for _, act, _ in pairs]
    try:
        run(gm)
    finally:
        for h in handles:
            h.remove()
    for first, act, second in pairs:
        m = peak[id(act)].clamp(min=1e-8)
        k = (m.max() / m) ** alpha
        if isinstance(act, nn.ReLU6):
            k = torch.minimum(k, 6.0 / (margin * m))
        k = k.clamp(min=1.0).to(first.weight.dtype)  # only ever scaled up: a ReLU6 cannot take a smaller clip
        first.weight.mul_(k.reshape(-1, 1, 1, 1))
        if first.bias is not None:
            first.bias.mul_(k)
        # depthwise: output channel o reads input channel o // (out / in)
        second.weight.div_(k.repeat_interleave(second.out_channels // second.in_channels).reshape(-1, 1, 1, 1))
    return len(pairs)

"""Full-integer (static W8A8) quantization of any traceable model: the TFLite scheme every edge runtime follows.

Weights int8 per output channel, symmetric (zero-point 0); activations 8-bit per tensor, asymmetric, with
static ranges from calibration (observers: minmax, percentile, mse); biases int32 with scale = input
scale × weight scale. BatchNorm is folded into the preceding conv first. Activations are quantized where an
integer runtime holds them (see :func:`lowbit.model.graph.activation_points`), so lowbit's own forward is the
integer model's arithmetic, up to float summation order: what ``export_onnx`` writes computes the same.

>>> qcnn, report = quantize_static(cnn, calib=images)          # images: (N, 3, H, W)
>>> type(qcnn.get_submodule("features.0.0")).__name__, report.folded_bn, len(report.points)
('QConv2d', 52, 65)
"""

from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.scheme import parse_scheme
from lowbit.errors import LowbitError
from lowbit.methods.registry import LayerStats, MethodConfig, get_method
from lowbit.model.convert import conversion_for, quantized_module, weight_matrix
from lowbit.model.graph import (
    QUANTIZABLE,
    activation_points,
    equalize_ranges,
    fold_batchnorm,
    insert_modules,
    same_grid,
    trace,
)
from lowbit.model.qmodules import QLinear
from lowbit.model.report import LayerReport
from lowbit.primitives.observers import RangeObserver

ACT_DTYPES = {"uint8": (0, 255), "int8": (-128, 127)}


class ActQuant(nn.Module):
    """One activation tensor's 8-bit grid: observes while calibrating, then fake-quantizes
    ``(clamp(round(x / scale) + zero_point, qmin, qmax) − zero_point) · scale``, as ONNX's QuantizeLinear /
    DequantizeLinear pair does (round half to even, float32 division).

    >>> aq = ActQuant("uint8"); aq(torch.tensor([0.0, 2.0, 6.0])); aq.freeze("minmax")
    tensor([0., 2., 6.])
    >>> aq(torch.tensor([1.0, 7.0])), int(aq.zero_point)
    (tensor([0.9882, 6.0000]), 0)
    """

    def __init__(self, dtype: str = "uint8", where: str = ""):
        super().__init__()
        if dtype not in ACT_DTYPES:
            raise LowbitError(f"activation dtype {dtype!r} (known: {', '.join(ACT_DTYPES)})")
        self.dtype, self.where = dtype, where
        self.qmin, self.qmax = ACT_DTYPES[dtype]
        self.observer: RangeObserver | None = RangeObserver()
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.range: tuple[float, float] = (0.0, 0.0)

    def freeze(self, method: str = "minmax") -> None:
        """Fix the grid from what the observer saw (the range always holds 0, so 0 is exact)."""
        if self.observer is None:
            return
        if self.observer.count == 0:
            raise LowbitError(f"activation at {self.where}: calibration never reached it")
        lo, hi = self.observer.range(method)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi - lo <= 1e-12:
            hi = lo + 1e-6  # a tensor that is 0 everywhere: any positive scale stores it exactly
        scale = torch.tensor((hi - lo) / (self.qmax - self.qmin), dtype=torch.float32)
        zp = int(torch.clamp(torch.round(self.qmin - torch.tensor(lo, dtype=torch.float32) / scale),
                             self.qmin, self.qmax))
        self.scale, self.zero_point = scale, torch.tensor(zp, dtype=torch.int32)
        self.range, self.observer = (lo, hi), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        s, z = self.scale.to(x.dtype), self.zero_point.to(x.dtype)
        return (torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax) - z) * s

    def extra_repr(self) -> str:
        return f"{self.dtype}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}, at {self.where}"


@dataclass
class PointReport:
    name: str
    where: str
    lo: float
    hi: float
    scale: float
    zero_point: int


@dataclass
class StaticReport:
    """What :func:`quantize_static` did: layers (as ``QuantReport`` rows), activation points, folded BNs."""

    layers: list[LayerReport] = field(default_factory=list)
    points: list[PointReport] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    folded_bn: int = 0
    equalized: int = 0  # conv → ReLU(6) → conv pairs whose middle activation's channel ranges were evened out
    calib_samples: int = 0
    observer: str = "minmax"
    method: str = "gptq"
    act_dtype: str = "uint8"
    seconds: float = 0.0
    qat: Any = None  # a lowbit.qat.static.StaticQatReport when the model was trained after quantizing

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def calib_batches(calib: Any, batch_size: int = 16, desc: str | None = None) -> Callable[..., int]:
    """A function running a model over the calibration inputs (returns how many samples it fed): ``calib`` is a
    tensor (N, …) cut into batches, an iterable of batches (tensors, tuples of positional inputs, or dicts of
    keyword inputs), or a callable that runs the model on its inputs itself. ``desc``: a progress bar of that name
    over the batches (None: no bar)."""
    if callable(calib) and not isinstance(calib, torch.Tensor | nn.Module):
        def run_fn(m: nn.Module, what: str | None = None) -> int:
            calib(m)
            return 0
        return run_fn
    if isinstance(calib, torch.Tensor):
        if calib.dim() < 1 or calib.shape[0] == 0:
            raise LowbitError("calibration inputs: an empty tensor")
        data: Iterable = list(calib.split(batch_size))
    elif isinstance(calib, Iterable):
        data = list(calib)  # GPTQ runs the batches a second time: a generator must not be spent by the first
    else:
        raise LowbitError(f"calibration inputs: a tensor, an iterable of batches or a callable, not "
                          f"{type(calib).__name__}")

    def run(m: nn.Module, what: str | None = None) -> int:  # what: this pass's name on the bar
        n = 0
        for b in tqdm(data, desc=what or desc, disable=desc is None, leave=False):
            if isinstance(b, dict):
                m(**b)
                first = next(iter(b.values()))
            elif isinstance(b, tuple | list):
                m(*b)
                first = b[0]
            else:
                m(b)
                first = b
            n += int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1
        return n
    return run


def quantize_static(model: nn.Module, calib: Any, *, scheme: str = "int8", observer: str = "percentile",
                    act_dtype: str = "uint8", keep: Iterable[str] = (), method: str = "gptq", batch_size: int = 16,
                    equalize: float | None = 0.5, progress: bool | None = None
                    ) -> tuple[fx.GraphModule, StaticReport]:
    """Full-integer quantization of a copy of ``model`` (``model`` itself is not changed).

    Returns the quantized model (a GraphModule: ``QConv2d`` / ``QLinear`` layers under their float names,
    ``ActQuant`` modules ``lowbit_act_N`` at the activation points) and a :class:`StaticReport`. ``keep``:
    module-name globs left in float (a sensitive layer). ``act_dtype``: uint8 (what x86 runtimes fuse) or int8.
    ``method``: ``gptq`` (default: each layer's rounding minimises its output error on the calibration inputs,
    as they arrive on their activation grids; one Hessian per channel for depthwise convs) or ``rtn``.
    ``equalize``: the strength (0..1) of :func:`~lowbit.model.graph.equalize_ranges` on conv → ReLU(6) → conv
    pairs before the ranges are observed (None: off).
    """
    if method not in ("gptq", "rtn"):
        raise LowbitError(f"--method {method}: static int8 quantizes weights with gptq or rtn")
    t0 = time.perf_counter()
    sch = parse_scheme(scheme)
    if sch.number_format.name != "int8" or sch.granularity not in ("channel", "tensor") or not sch.symmetric:
        raise LowbitError(f"scheme {sch.name}: full-integer static quantization stores weights as symmetric int8 "
                          f"per channel or per tensor (scheme int8)")
    if observer not in RangeObserver.METHODS:
        raise LowbitError(f"--observer {observer}: unknown (known: {', '.join(RangeObserver.METHODS)})")
    report = StaticReport(observer=observer, act_dtype=act_dtype, method=method)
    gm = trace(copy.deepcopy(model).eval())
    report.folded_bn = fold_batchnorm(gm)
    pats = list(keep)
    quantized: set[str] = set()
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(mod, QUANTIZABLE):
            continue
        if any(fnmatch.fnmatchcase(node.target, p) for p in pats):
            report.kept.append(node.target)
        elif conversion_for(mod) is None:
            report.kept.append(node.target)
            report.warnings.append(f"{node.target}: {type(mod).__name__} has no conversion; kept in float")
        elif node.target in quantized:
            raise LowbitError(f"layer {node.target}: called more than once in the forward; a shared layer cannot "
                              f"take one static input range (keep it in float: --keep {node.target})")
        else:
            quantized.add(node.target)
    if not quantized:
        raise LowbitError(f"model {type(model).__name__}: no Conv2d or Linear layer to quantize")
    run = calib_batches(calib, batch_size, None if progress is False else "calibrate")
    if equalize:
        report.equalized = equalize_ranges(gm, lambda g: run(g, "equalize ranges"), equalize)
    points = insert_modules(gm, activation_points(gm, quantized), lambda p: ActQuant(act_dtype, p.why))
    with torch.no_grad():
        report.calib_samples = run(gm, "activation ranges")
    for name in points:
        aq = gm.get_submodule(name)
        aq.freeze(observer)
        report.points.append(PointReport(name, aq.where, *aq.range, float(aq.scale), int(aq.zero_point)))
    hessians = _collect_hessians(gm, quantized, run) if method == "gptq" else None  # inputs on their grids now
    _quantize_weights(gm, quantized, sch, report, hessians)
    report.seconds = time.perf_counter() - t0
    return gm, report


class _ConvStats:
    """XᵀX of one layer's inputs as its weight rows see them: im2col patches for a conv, per group of channels
    (a depthwise conv has one 9×9 Hessian per channel); rows for a linear layer."""

    def __init__(self, mod: nn.Module):
        self.mod, self.h, self.n = mod, None, 0

    def __call__(self, mod, args) -> None:
        x = args[0].detach().double()
        if isinstance(mod, nn.Linear):
            cols = x.reshape(1, -1, x.shape[-1]).transpose(1, 2)  # (1 group, in, tokens)
        elif mod.kernel_size == (1, 1) and mod.stride == (1, 1) and mod.groups == 1:
            cols = x.permute(1, 0, 2, 3).reshape(1, x.shape[1], -1)
        else:
            u = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (B, C·kh·kw, L)
            g = mod.groups
            d = u.shape[1] // g
            cols = u.reshape(u.shape[0], g, d, -1).permute(1, 2, 0, 3).reshape(g, d, -1)  # (groups, d, B·L)
        h = cols @ cols.transpose(1, 2)  # (groups, d, d)
        self.h = h if self.h is None else self.h + h
        self.n += cols.shape[-1]


def _gptq_rows(w: torch.Tensor, h: torch.Tensor, sch, damp: float = 0.01):
    """GPTQ with one Hessian per row (``h`` (rows, d, d)), on a per-channel grid fitted to ``w`` (rows, d):
    each weight is rounded in turn and its error spread over the row's later weights."""
    from lowbit.layouts import layout_of

    layout = layout_of(sch)
    params = layout.fit(w, sch)
    s = params.s.reshape(-1, 1).float()
    h = h.clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag == 0
    diag.add_(damp * diag.mean(dim=1, keepdim=True).clamp(min=1e-12))
    diag[dead] = 1.0
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    wq = w.clone().float()
    hi = int(sch.grid.fmt.max_value)  # symmetric: [-127, 127]
    lo = -hi
    for j in range(w.shape[1]):
        col = wq[:, j : j + 1]
        q = torch.clamp(torch.round(col / s), lo, hi) * s
        err = (col - q) / u[:, j, j : j + 1]
        wq[:, j:] -= err * u[:, j, j:]
        wq[:, j : j + 1] = q
    return layout.encode(wq, sch, params)


def _collect_hessians(gm: fx.GraphModule, quantized: set[str], run: Callable[..., int]
                      ) -> dict[str, _ConvStats]:
    stats = {n: _ConvStats(gm.get_submodule(n)) for n in quantized}
    handles = [gm.get_submodule(n).register_forward_pre_hook(st) for n, st in stats.items()]
    try:
        with torch.no_grad():
            run(gm, "gptq statistics")
    finally:
        for hd in handles:
            hd.remove()
    return stats


def bias_grid(bias: torch.Tensor, act: ActQuant, qweight) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's int32 bias codes and their per-channel scale, input scale × weight scale (float64, (out,)): the
    grid of the integer accumulator, on which the full-integer scheme stores biases."""
    s = (float(act.scale) * qweight.qparams()[0].reshape(-1).double()).expand(bias.shape[0])
    codes = torch.round(bias.detach().double() / s).clamp(-(2**31), 2**31 - 1).to(torch.int32)
    return codes, s


def is_full_integer(model: nn.Module) -> bool:
    """``model`` came from :func:`quantize_static` (it holds activation quantizers)."""
    return any(isinstance(m, ActQuant) for m in model.modules())


def input_act(gm: fx.GraphModule, node: fx.Node) -> ActQuant | None:
    """The ActQuant whose grid ``node``'s first input is on (through same-grid ops), if any."""
    n = node.args[0] if node.args else None
    while isinstance(n, fx.Node):
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ActQuant):
            return gm.get_submodule(n.target)
        if not same_grid(gm, n) or not n.args:
            return None
        n = n.args[0]
    return None


@torch.no_grad()
def _quantize_weights(gm: fx.GraphModule, quantized: set[str], sch, report: StaticReport,
                      hessians: dict[str, _ConvStats] | None = None) -> None:
    rtn, gptq = get_method("rtn"), get_method("gptq")
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in quantized:
            continue
        t = time.perf_counter()
        mod = gm.get_submodule(node.target)
        w = weight_matrix(mod).float()
        st = None if hessians is None else hessians[node.target]
        if st is None or st.n == 0:
            q = rtn(w, LayerStats(), sch, MethodConfig()).qtensor
        elif st.h.shape[0] == 1:  # one Hessian for every row: lowbit's GPTQ
            q = gptq(w, LayerStats(xtx=st.h[0].float(), tokens=st.n), sch, MethodConfig()).qtensor
        else:  # grouped / depthwise: row o reads channel group o // (rows / groups)
            rows_per = w.shape[0] // st.h.shape[0]
            q = _gptq_rows(w, st.h.repeat_interleave(rows_per, dim=0), sch)
        new = quantized_module(node.target, mod, q)
        if isinstance(new, QLinear):
            new.kernel_mode = "reference"  # the integer model's arithmetic, not a faster kernel's rounding
        aq = input_act(gm, node)
        note = ""
        if new.bias is not None and aq is not None:  # int32 bias on the accumulator's grid: s_in · s_w
            codes, s = bias_grid(new.bias, aq, q)
            new.bias.copy_((codes.double() * s).to(new.bias.dtype))
        elif aq is None:
            note = "input not on an integer grid: float input"
        parent, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
        rel = float((q.dequantize(torch.float32) - w).norm() / w.norm().clamp(min=1e-30))
        kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
        report.layers.append(LayerReport(node.target, sch.name, report.method, q.bits_per_weight, q.numel, q.nbytes,
                                         rel, None, time.perf_counter() - t, note, kind))

"""Quantization-aware training of a full-integer (static W8A8) model: MobileNetV2 and the other traced CNNs.

It starts from :func:`lowbit.model.static.quantize_static`'s result (GPTQ weights, observed activation ranges)
and trains against the float model's class distribution (KL distillation) on augmented crops of the
calibration images (random area and aspect, mirrored):

- each conv / linear layer's latent weight and its per-channel scales (:class:`~lowbit.qat.modules.QATConv2d`),
- each activation point's scale (LSQ; its zero-point stays, so 0 stays exact),
- the biases, on the accumulator's int32 grid (input scale × weight scale), where the integer model keeps them.

Training's forward is the integer model's arithmetic with the same roundings as ``ActQuant`` and the stored
layers, so :func:`convert_static` gives back a model of ``quantize_static``'s form, bit for bit what training
computed, that ``export_onnx`` writes as it is. Held-out images judge the result: when training raised their KL,
the post-training model is returned.

>>> from lowbit.model.static import quantize_static
>>> start, _ = quantize_static(cnn, calib=images, method="rtn", progress=False)
>>> qcnn, report = train_static(start, cnn, images, StaticQatOptions(steps=2, batch=2, val_images=0), progress=False)
>>> report.steps, report.layers, report.points, type(qcnn.get_submodule("features.0.0")).__name__
(2, 53, 65, 'QConv2d')
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.qmodules import QConv2d, QLinear
from lowbit.model.static import ActQuant, input_act
from lowbit.primitives.quant import cast_ste, round_ste
from lowbit.qat.modules import QATConv2d, QATLinear, train_steps

INIT_METHODS = ("gptq", "rtn")
CHECKPOINT_SECONDS = 300.0  # how often a resumable run saves its training state


@dataclass(frozen=True)
class StaticQatOptions:
    init: str = field(default="gptq", metadata={"help": "the post-training quantization training starts from: "
                                                        "gptq | rtn"})
    steps: int = field(default=200, metadata={"help": "training steps (batch images each)"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate of the latent weights and biases (Adam)"})
    scale_lr: float = field(default=1e-3, metadata={"help": "learning rate of weight and activation scales "
                                                            "(relative steps)"})
    batch: int = field(default=16, metadata={"help": "augmented crops per step"})
    val_images: int = field(default=4, metadata={"help": "calibration images held out to judge the training (at "
                                                             "most a quarter of them)"})
    min_crop: float = field(default=0.25, metadata={"help": "smallest crop, as a fraction of the image's area"})
    seed: int = field(default=0, metadata={"help": "seed of the crops"})

    def __post_init__(self) -> None:
        if self.init not in INIT_METHODS:
            raise LowbitError(f"qat: option 'init' must be {' or '.join(INIT_METHODS)} for a vision model, "
                              f"got {self.init!r}")
        if self.steps < 0 or self.batch < 1 or self.val_images < 0:
            raise LowbitError("qat: options 'steps' and 'val_images' must be >= 0, 'batch' >= 1")
        if not 0 < self.min_crop <= 1:
            raise LowbitError(f"qat: option 'min_crop' must be in (0, 1], got {self.min_crop}")
        if self.lr < 0 or self.scale_lr < 0:
            raise LowbitError("qat: learning rates (lr, scale_lr) must be >= 0")

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> StaticQatOptions:
        """From ``--option`` items: unknown names and wrong types are one error naming the option."""
        from lowbit.methods.registry import parse_options

        return parse_options("qat", cls, raw)


@dataclass
class StaticQatReport:
    steps: int = 0
    train_images: int = 0
    val_images: int = 0
    val_kl_start: float | None = None  # mean KL(float || quantized) on the held-out images, before training
    val_kl_end: float | None = None
    kept: bool = False  # the trained model was returned (False: the post-training one)
    layers: int = 0
    points: int = 0
    seconds: float = 0.0
    resumed_at: int = 0  # the step a killed earlier run had checkpointed (0: trained from the start)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.steps == 0:
            return "qat: 0 steps, the post-training model"
        judged = (f"held-out KL {self.val_kl_start:.4f} -> {self.val_kl_end:.4f} ({self.val_images} images)"
                  if self.val_kl_start is not None else "no held-out images")
        verdict = "trained model kept" if self.kept else "post-training model kept (training raised it)"
        resumed = f" (resumed at step {self.resumed_at})" if self.resumed_at else ""
        return (f"qat: {self.steps} steps{resumed} on {self.train_images} images ({self.layers} layers, {self.points} "
                f"activation scales), {judged}: {verdict}; {self.seconds:.0f} s")


class LearnedActQuant(ActQuant):
    """An :class:`ActQuant` whose scale trains (``s0·exp(θ)``, LSQ through the straight-through rounding); the
    zero-point stays. Its forward is ``ActQuant``'s at the current scale, bit for bit."""

    def __init__(self, aq: ActQuant):
        if aq.observer is not None:
            raise LowbitError(f"activation at {aq.where}: its range is not fixed yet (calibrate first)")
        super().__init__(aq.dtype, aq.where)
        self.observer = None
        self.register_buffer("start_scale", aq.scale.detach().to(torch.float32).clone())
        self.scale = self.start_scale.clone()  # the starting scale (the forward uses current_scale())
        self.zero_point = aq.zero_point.detach().clone()
        self.grid_s = nn.Parameter(torch.zeros(()))
        self.range = aq.range

    def current_scale(self) -> torch.Tensor:
        return self.start_scale * torch.exp(self.grid_s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.current_scale().to(x.dtype), self.zero_point.to(x.dtype)
        return (torch.clamp(round_ste(x / s) + z, self.qmin, self.qmax) - z) * s

    @torch.no_grad()
    def frozen(self) -> ActQuant:
        aq = ActQuant(self.dtype, self.where)
        aq.observer = None
        s = self.current_scale().detach().clone()
        aq.scale, aq.zero_point = s, self.zero_point.clone()
        z = int(self.zero_point)
        aq.range = ((self.qmin - z) * float(s), (self.qmax - z) * float(s))
        return aq


def _act_scale(aq: ActQuant) -> torch.Tensor:
    return aq.current_scale() if isinstance(aq, LearnedActQuant) else aq.scale


class _AccumulatorBias:
    """A layer's bias on the integer accumulator's grid, ``round(b / (s_in·s_w))·s_in·s_w`` in float64 as
    :func:`lowbit.model.static.bias_grid` stores it (the gradient straight through to the bias; the scales are
    taken as they are)."""

    def __init__(self, aq: ActQuant):
        self.aq = [aq]  # a list: not a submodule of the layer (the graph owns the activation quantizer)

    def __call__(self, layer: QATLinear) -> torch.Tensor:
        q = layer.template
        s_w = cast_ste(layer.grid_values()["s"].detach().clamp(min=1e-12), getattr(torch, q.scheme.scale_dtype))
        s = (float(_act_scale(self.aq[0]).detach()) * s_w.reshape(-1).double()).expand(layer.bias.shape[0])
        codes = torch.round(layer.bias.detach().double() / s).clamp(-(2**31), 2**31 - 1)
        exact = (codes * s).to(layer.bias.dtype)
        return exact + (layer.bias - layer.bias.detach())


def _set(gm: fx.GraphModule, name: str, mod: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, mod)


def prepare_static(qgm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``qgm`` (from :func:`quantize_static`) in training form: its QConv2d / QLinear layers as
    QATConv2d / QATLinear (biases trainable, on the accumulator's grid), its ActQuant points as
    :class:`LearnedActQuant`. Everything else is frozen."""
    gm = copy.deepcopy(qgm)
    for p in gm.parameters():
        p.requires_grad_(False)
    for name, m in list(gm.named_modules()):
        if isinstance(m, ActQuant) and not isinstance(m, LearnedActQuant):
            _set(gm, name, LearnedActQuant(m))
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, QConv2d):
            layer: QATLinear = QATConv2d.from_qconv(m)
        elif isinstance(m, QLinear) and m.act_scheme is None:
            layer = QATLinear(m.qweight, m.qweight.dequantize(torch.float32), m.bias)
        else:
            continue
        if layer.template.scheme.number_format.name != "int8" or "s" not in layer.grid_values():
            raise LowbitError(f"layer {node.target}: scheme {layer.template.scheme.name}; full-integer QAT trains "
                              f"int8 weights with a scale per channel or tensor")
        aq = input_act(gm, node)
        if layer.bias is not None:
            layer.bias.requires_grad_(True)
            if aq is not None:
                layer.bias_grid = _AccumulatorBias(aq)
        _set(gm, node.target, layer)
    return gm


@torch.no_grad()
def convert_static(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` (in place) back in ``quantize_static``'s form: QConv2d / QLinear (reference arithmetic) at the
    trained weights and grids, biases on their int32 grids, frozen ActQuant points."""
    for name, m in list(gm.named_modules()):
        if isinstance(m, QATConv2d):
            _set(gm, name, m.to_qconv())
        elif isinstance(m, QATLinear):
            new = QLinear(m.to_qtensor(), m.current_bias())
            new.kernel_mode = "reference"
            _set(gm, name, new)
    for name, m in list(gm.named_modules()):
        if isinstance(m, LearnedActQuant):
            _set(gm, name, m.frozen())
    return gm


def random_crops(canvas: torch.Tensor, n: int, size: int, gen: torch.Generator, min_area: float) -> torch.Tensor:
    """``n`` crops of the images ``canvas`` (N, 3, H, W), each of a random image, area (min_area..1 of it) and
    aspect (3/4..4/3), resized to ``size`` × ``size`` (bilinear, antialiased) and mirrored half the time."""
    N, _, H, W = canvas.shape
    out = []
    for _ in range(n):
        i = int(torch.randint(N, (1,), generator=gen))
        area = H * W * (min_area + (1 - min_area) * float(torch.rand((), generator=gen)))
        aspect = math.exp(math.log(3 / 4) + math.log(16 / 9) * float(torch.rand((), generator=gen)))
        h = max(1, min(H, round(math.sqrt(area / aspect))))
        w = max(1, min(W, round(math.sqrt(area * aspect))))
        top = int(torch.randint(H - h + 1, (1,), generator=gen))
        left = int(torch.randint(W - w + 1, (1,), generator=gen))
        x = canvas[i : i + 1, :, top : top + h, left : left + w]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if float(torch.rand((), generator=gen)) < 0.5:
            x = x.flip(-1)
        out.append(x)
    return torch.cat(out)


def center(canvas: torch.Tensor, size: int) -> torch.Tensor:
    H, W = canvas.shape[-2:]
    if H < size or W < size:
        raise LowbitError(f"images of {H}×{W}: smaller than the model's input, {size}×{size}")
    top, left = (H - size) // 2, (W - size) // 2
    return canvas[..., top : top + size, left : left + size]


def _kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(teacher || student), in nats."""
    logq = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logq)).sum(-1).mean()


def _val_split(n: int, k: int) -> list[int]:
    """``k`` of ``n`` images (at most a quarter of them), evenly spaced; none when fewer than two would be left to
    train on."""
    k = min(k, n // 4)
    if k <= 0 or n - k < 2:
        return []
    return sorted({(i * n) // k + n // (2 * k) for i in range(k)})


def _trained(gm: nn.Module) -> dict[str, torch.Tensor]:
    return {f"param.{n}": p.detach() for n, p in gm.named_parameters() if p.requires_grad}


def _restore(gm: nn.Module, saved: dict[str, torch.Tensor], where: str) -> None:
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if not p.requires_grad:
                continue
            v = saved.get(f"param.{n}")
            if v is None or v.shape != p.shape:
                raise LowbitError(f"resume: {where} lacks {n} (or holds another shape); delete it to start over")
            p.copy_(v)


def train_static(qgm: fx.GraphModule, teacher: nn.Module, canvas: torch.Tensor,
                 opts: StaticQatOptions = StaticQatOptions(), *, size: int | None = None,  # noqa: B008
                 progress: bool | None = None, resume_dir: str | os.PathLike | None = None
                 ) -> tuple[fx.GraphModule, StaticQatReport]:
    """``qgm`` (a :func:`quantize_static` model; not changed) trained against the float ``teacher``.

    ``canvas``: the calibration images (N, 3, H, W), at least ``size`` (default: H) on each side, which random
    crops are cut from; ``opts.val_images`` of them (evenly spaced) are held out and judge the result on their
    center crops. Returns the model in ``quantize_static``'s form and a :class:`StaticQatReport`.

    ``resume_dir``: the training state (trained tensors, Adam's moments, the step) is saved there every
    :data:`CHECKPOINT_SECONDS` and after the last step, and a rerun of the same job (same model, images and
    options) continues from it to the same bits; the caller removes the folder once the model is written."""
    t0 = time.perf_counter()
    size = size or canvas.shape[-1]
    center(canvas, size)  # the size check, before any work
    val_idx = _val_split(canvas.shape[0], opts.val_images)
    train_idx = [i for i in range(canvas.shape[0]) if i not in set(val_idx)]
    report = StaticQatReport(steps=opts.steps, train_images=len(train_idx), val_images=len(val_idx))
    if opts.steps == 0:
        return qgm, report
    was_training = teacher.training
    teacher.eval()
    try:
        return _train(qgm, teacher, canvas, opts, size, progress, resume_dir, report, val_idx, train_idx, t0)
    finally:
        teacher.train(was_training)  # the caller's model as it was


def _train(qgm: fx.GraphModule, teacher: nn.Module, canvas: torch.Tensor, opts: StaticQatOptions, size: int,
           progress: bool | None, resume_dir: str | os.PathLike | None, report: StaticQatReport, val_idx: list[int],
           train_idx: list[int], t0: float) -> tuple[fx.GraphModule, StaticQatReport]:
    gm = prepare_static(qgm).eval()  # eval: no dropout; BatchNorm was folded into the convs
    layers = [m for m in gm.modules() if isinstance(m, QATLinear)]
    acts = [m for m in gm.modules() if isinstance(m, LearnedActQuant)]
    report.layers, report.points = len(layers), len(acts)
    val_x = center(canvas[val_idx], size) if val_idx else None
    with torch.no_grad():
        val_t = None if val_x is None else F.log_softmax(teacher(val_x).float(), dim=-1)
        if val_x is not None:
            report.val_kl_start = float(_kl(qgm(val_x), val_t))
    train = canvas[train_idx]

    def loss_of(i: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + i)
        x = random_crops(train, opts.batch, size, gen, opts.min_crop)
        with torch.no_grad():
            t = F.log_softmax(teacher(x).float(), dim=-1)
        return _kl(gm(x), t)

    weights = [m.weight for m in layers] + [m.bias for m in layers if m.bias is not None]
    scales = [p for m in layers for p in m.grid_params()] + [m.grid_s for m in acts]
    start, adam, save = 0, None, None
    if resume_dir is not None:
        from lowbit.model.resume import BlockCheckpoints, fingerprint

        ck = BlockCheckpoints(resume_dir, fingerprint(qgm, json.dumps(asdict(opts), sort_keys=True), canvas,
                                                      {"job": "qat.static", "size": size}))
        done = ck.e2e()
        if done is not None:
            start, saved = done
            _restore(gm, saved, str(ck.folder / "e2e.safetensors"))
            adam = {k: v for k, v in saved.items() if k.startswith("adam.")}
            report.resumed_at = start

        def save(step: int, adam_state: dict[str, torch.Tensor]) -> None:
            ck.save_e2e(step, {**_trained(gm), **adam_state})

    train_steps([{"params": weights, "lr": opts.lr}, {"params": scales, "lr": opts.scale_lr}], opts.steps,
                opts.steps, loss_of, seed=opts.seed, label="qat", progress=progress, postfix="KL",
                start=min(start, opts.steps), adam=adam, on_checkpoint=save, checkpoint_seconds=CHECKPOINT_SECONDS)
    out = convert_static(gm)
    if val_x is not None:
        with torch.no_grad():
            report.val_kl_end = float(_kl(out(val_x), val_t))
        report.kept = report.val_kl_end < report.val_kl_start
    else:
        report.kept, report.note = True, "no held-out images: the trained model, unjudged"
    report.seconds = time.perf_counter() - t0
    return (out if report.kept else qgm), report

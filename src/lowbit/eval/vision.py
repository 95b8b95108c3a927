"""Evaluation of image models: top-1 agreement with the float model (and accuracy where labels exist), logits
SQNR, and per-layer SQNR to find the layer that hurts; the same for an ONNX file run in onnxruntime.

>>> r = evaluate_images(qcnn, reference=cnn, inputs=images)
>>> 0 <= r.top1_agreement <= 1, r.n_images == len(images)
(True, True)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class LayerSQNR:
    name: str
    sqnr_db: float  # the quantized model's output of this layer against the float model's (errors so far included)


@dataclass
class ImageEval:
    n_images: int
    top1_agreement: float  # share of images where the quantized model's top class is the float model's
    logits_sqnr_db: float
    accuracy: float | None = None  # with labels
    reference_accuracy: float | None = None
    layers: list[LayerSQNR] = field(default_factory=list)
    model_bytes: int | None = None
    reference_bytes: int | None = None
    ms_per_image: float | None = None  # batch 1
    reference_ms_per_image: float | None = None
    threads: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def worst_layers(self, k: int = 5) -> list[LayerSQNR]:
        return sorted(self.layers, key=lambda r: r.sqnr_db)[:k]


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    """10·log10(‖ref‖² / ‖ref − got‖²) (inf when equal)."""
    err = float((ref.double() - got.double()).square().sum())
    sig = float(ref.double().square().sum())
    return math.inf if err == 0 else 10 * math.log10(max(sig, 1e-300) / err)


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def evaluate_images(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], reference: nn.Module,
                    inputs: torch.Tensor, labels: torch.Tensor | None = None, *, batch_size: int = 16,
                    per_layer: bool = True, speed: bool = False) -> ImageEval:
    """``model`` (a lowbit model, or any function images → logits such as an onnxruntime session's) against
    ``reference`` (the float model) on ``inputs`` (N, 3, H, W)."""
    ref = _batched(reference, inputs, batch_size)
    got = _batched(model, inputs, batch_size)
    r = ImageEval(int(inputs.shape[0]), float((got.argmax(-1) == ref.argmax(-1)).float().mean()), sqnr_db(ref, got),
                  threads=torch.get_num_threads())
    if labels is not None:
        r.accuracy = float((got.argmax(-1) == labels).float().mean())
        r.reference_accuracy = float((ref.argmax(-1) == labels).float().mean())
    if per_layer and isinstance(model, nn.Module):
        r.layers = layer_sqnr(model, reference, inputs[: min(len(inputs), 32)])
    if speed:
        r.ms_per_image = ms_per_call(model, inputs[:1])
        r.reference_ms_per_image = ms_per_call(reference, inputs[:1])
    return r


def layer_sqnr(qmodel: nn.Module, reference: nn.Module, x: torch.Tensor) -> list[LayerSQNR]:
    """SQNR of each quantized conv / linear's output against the same layer of the float model (BatchNorm folded,
    as the quantized model has it), in forward order."""
    from lowbit.model.graph import fold_batchnorm, trace
    from lowbit.model.qmodules import QConv2d, QLinear

    names = [n for n, m in qmodel.named_modules() if isinstance(m, QConv2d | QLinear)]
    ref = trace(copy.deepcopy(reference).eval())
    fold_batchnorm(ref)
    outs: dict[str, list[torch.Tensor]] = {}

    def grab(key: str):
        def hook(mod, args, out):
            outs.setdefault(key, []).append(out.detach())
        return hook

    hs = []
    for n in names:
        try:
            hs.append(ref.get_submodule(n).register_forward_hook(grab("f:" + n)))
        except AttributeError:
            continue
        hs.append(qmodel.get_submodule(n).register_forward_hook(grab("q:" + n)))
    try:
        with torch.no_grad():
            ref(x)
            qmodel(x)
    finally:
        for h in hs:
            h.remove()
    return [LayerSQNR(n, sqnr_db(torch.cat(outs["f:" + n]), torch.cat(outs["q:" + n]))) for n in names
            if "f:" + n in outs and "q:" + n in outs]


def ms_per_call(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, seconds: float = 2.0) -> float:
    """Median milliseconds of ``fn(x)`` over repeated calls (after 3 warm-up calls)."""
    times = []
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(times) < 5:
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]

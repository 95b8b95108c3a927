"""lowbit: quantize trained neural networks, measure what it cost, and save them where runtimes load.

>>> import torch, lowbit
>>> q = lowbit.quantize_tensor(torch.randn(256, 576), "int4-g128", observer="mse")
>>> round(q.bits_per_weight, 3)  # 4 + 5 groups × (16-bit scale + 4-bit zero) / 576: the ragged 5th counts whole
4.174
"""

from __future__ import annotations

import torch

from lowbit import qat  # noqa: E402  (lowbit.qat.prepare / convert)
from lowbit.api import (
    calibration_windows,
    default_plan,
    evaluate,
    export_hf,
    export_onnx,
    load,
    plan_budget,
    quantize,
    save,
)
from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme, parse_scheme, preset_names, register_preset
from lowbit.errors import LowbitError
from lowbit.eval.bench import bench
from lowbit.eval.generations import compare_generations
from lowbit.eval.tasks import TaskOptions, eval_tasks, load_task
from lowbit.io.checkpoint import load_tensors, save_tensors
from lowbit.methods.registry import MethodConfig
from lowbit.methods.rtn import quantize_rtn
from lowbit.model.budget import Allocation, allocate, parse_budget
from lowbit.model.plan import Plan
from lowbit.model.sensitivity import measure_sensitivity
from lowbit.model.sensitivity_table import SensitivityTable

__version__ = "0.1.0"

__all__ = [
    "bench", "compare_generations", "eval_tasks", "load_task", "TaskOptions",
    "calibration_windows", "default_plan", "evaluate", "export_hf", "export_onnx",
    "load", "quantize", "save", "Plan", "MethodConfig",
    "LowbitError", "QTensor", "Scheme", "load_tensors", "parse_scheme", "preset_names", "quantize_tensor",
    "register_preset", "save_tensors", "plan_budget", "allocate", "parse_budget", "Allocation",
    "measure_sensitivity", "SensitivityTable", "qat",
]


def quantize_tensor(
    weight: torch.Tensor,
    scheme: str | Scheme,
    observer: str = "minmax",
    importance: torch.Tensor | None = None,
) -> QTensor:
    """Round-to-nearest quantization of one tensor.

    ``scheme``: a Scheme or a string such as ``"int4-g128"``, ``"int8"``, ``"fp8"``, ``"nf4-g64"``.
    ``observer``: ``"minmax"``, ``"percentile"`` or ``"mse"`` (MSE-optimal clipping, optionally
    weighted per input channel by ``importance``, e.g. E[x²] of the layer's inputs).

    >>> w = torch.randn(64, 128)
    >>> q = quantize_tensor(w, "int4-g32-sym")
    >>> q.shape, q.scheme.name, q.bits_per_weight  # 4 bits + a 16-bit scale per 32 weights
    ((64, 128), 'int4-g32-sym', 4.5)
    >>> bool((q.dequantize() - w).norm() < 0.15 * w.norm())
    True
    """
    if not isinstance(weight, torch.Tensor):
        raise LowbitError(f"quantize_tensor expects a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise LowbitError(f"quantize_tensor expects a floating-point tensor, got {weight.dtype}")
    return quantize_rtn(weight, parse_scheme(scheme), observer, importance)

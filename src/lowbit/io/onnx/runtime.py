"""Running an ONNX file in onnxruntime (CPU), as a function of torch tensors.

>>> _ = lowbit.export_onnx(qcnn, "m.onnx", example_inputs=(images[:1],))
>>> run = ort_model("m.onnx", threads=1)
>>> run(images[:2]).shape
torch.Size([2, 1000])
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError


def ort_session(path: str | os.PathLike, threads: int = 1, optimize: bool = True):
    try:
        import onnxruntime as ort
    except ImportError:
        raise LowbitError("running ONNX files needs onnxruntime: pip install 'lowbit[onnx]'") from None
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"{p}: no such ONNX file")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (onnxruntime raises its own exception types)
        raise LowbitError(f"{p}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None


def ort_model(path: str | os.PathLike, threads: int = 1, optimize: bool = True
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``x -> output`` running the file's first input → first output in onnxruntime."""
    sess = ort_session(path, threads, optimize)
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(sess.run(None, {name: x.detach().cpu().numpy()})[0]))

    return run

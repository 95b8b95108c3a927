"""Running an exported ``.onnx`` file in onnxruntime (CPU), in this process or in a child.

A crash inside onnxruntime (a bad graph can abort it) would take the caller with it; :func:`run_onnx_isolated`
runs it in a child process (:func:`lowbit.isolate.run_isolated`), so it becomes one :class:`ChildFailed` error.
:func:`ort_model` wraps a file as a function of torch tensors (its first input to its first output).

>>> _ = lowbit.export_onnx(qcnn, "m.onnx", example_inputs=(images[:1],))
>>> run_onnx_isolated("m.onnx", {"input": images[:2]})[0].shape
(2, 1000)
>>> run = ort_model("m.onnx", threads=1)
>>> run(images[:2]).shape
torch.Size([2, 1000])
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError


def _feeds(feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.asarray(v)) for k, v in feeds.items()}


def run_onnx(path: str | os.PathLike, feeds: Mapping[str, object], threads: int = 1) -> list[np.ndarray]:
    """The graph's outputs for ``feeds`` (arrays or tensors), computed by onnxruntime in this process."""
    return ort_session(path, threads).run(None, _feeds(feeds))


def time_onnx(path: str | os.PathLike, feeds: Mapping[str, object], repeats: int = 5, warmup: int = 1,
              threads: int = 1) -> float:
    """Median seconds of one ``run`` of the graph on ``feeds`` (after ``warmup`` untimed runs)."""
    s = ort_session(path, threads)
    f = _feeds(feeds)
    for _ in range(warmup):
        s.run(None, f)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.run(None, f)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_onnx_isolated(path: str | os.PathLike, feeds: Mapping[str, object], threads: int = 1,
                      timeout: float = 600.0) -> list[np.ndarray]:
    """:func:`run_onnx` in a child process: a crash in onnxruntime is a ChildFailed naming the file."""
    from lowbit.isolate import run_isolated

    return run_isolated(run_onnx, str(path), _feeds(feeds), threads, what=f"onnxruntime on {path}",
                        timeout=timeout)


def ort_session(path: str | os.PathLike, threads: int = 1, optimize: bool = True):
    """An onnxruntime CPU session on ``threads`` intra-op threads (one inter-op), all graph optimizations unless
    ``optimize=False``; a missing file, a missing onnxruntime or a file it cannot load is a one-line LowbitError."""
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

"""Running an exported ``.onnx`` file in onnxruntime (CPU), in this process or in a child.

A crash inside onnxruntime (a bad graph can abort it) would take the caller with it; :func:`run_onnx_isolated`
runs it in a child process (:func:`lowbit.isolate.run_isolated`), so it becomes one :class:`ChildFailed` error.

>>> logits, = run_onnx_isolated("model.onnx", {"input_ids": ids, "attention_mask": mask})
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import numpy as np


def session(path: str | os.PathLike, threads: int = 1):
    """An onnxruntime CPU session on ``threads`` threads (intra- and inter-op), full graph optimizations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.asarray(v)) for k, v in feeds.items()}


def run_onnx(path: str | os.PathLike, feeds: Mapping[str, object], threads: int = 1) -> list[np.ndarray]:
    """The graph's outputs for ``feeds`` (arrays or tensors), computed by onnxruntime in this process."""
    return session(path, threads).run(None, _feeds(feeds))


def time_onnx(path: str | os.PathLike, feeds: Mapping[str, object], repeats: int = 5, warmup: int = 1,
              threads: int = 1) -> float:
    """Median seconds of one ``run`` of the graph on ``feeds`` (after ``warmup`` untimed runs)."""
    s = session(path, threads)
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

"""Kernels chosen by measurement on this machine: which kernel is fastest for a layer depends on the CPU
(torch's packed int4 kernel beats float32 by 1.4× at 512 tokens on one 2-core AMD EPYC and loses to it by
2× on an Intel Xeon of the same size), on the layer's shape and on the batch size, so fixed priorities
cannot be right everywhere.

Under kernel mode ``auto``, when more than one kernel can serve a call, each of them runs the call a few
times, the fastest is kept for that *kind* of call — (layer type, scheme, shape, bias, activation dtype,
tokens rounded up to a power of two, torch threads, the kernels that competed) — and the choice is written to
``<cache>/kernel-choices.json`` under this machine's CPU name and torch version, so later processes on the
same machine reuse it instead of measuring again. Every candidate computes the same layer (each within its
stated arithmetic bound against the dequantize reference), so only speed differs.

``LOWBIT_KERNEL_TUNING=off`` turns measuring off: the highest ``priority`` that serves runs, the same choice
on every machine. A kernel with ``measured=False`` (the calibration weight cache) wins whenever it serves.

>>> bucket(1), bucket(3), bucket(128), bucket(129), bucket(100000)
(1, 4, 128, 256, 4096)
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_BUCKET = 4096
MIN_SECONDS = 2e-3  # each candidate runs until it has spent this long (after one warm-up call) …
MAX_RUNS = 20  # … or this many calls; its figure is the fastest call
FILE_VERSION = 1

_lock = threading.Lock()
_choices: dict[str, str] | None = None  # this machine's measured choices, loaded at first use


def enabled() -> bool:
    return os.environ.get("LOWBIT_KERNEL_TUNING", "on").strip().lower() not in ("off", "0", "false", "no")


def bucket(tokens: int) -> int:
    """``tokens`` rounded up to a power of two, at most MAX_BUCKET."""
    b = 1
    while b < tokens and b < MAX_BUCKET:
        b *= 2
    return b


def call_key(module: Any, x: torch.Tensor, tokens: int) -> str:
    q = module.qweight
    return (f"{type(module).__name__}|{q.scheme.name}|act={module.act_scheme}|{module.out_features}x"
            f"{module.in_features}|bias={module.bias is not None}|{str(x.dtype).removeprefix('torch.')}|"
            f"{x.device.type}|tokens<={bucket(tokens)}|threads={torch.get_num_threads()}")


def machine_key() -> str:
    from lowbit.kernels.cpu import cpu_name

    return f"{cpu_name()} | torch {torch.__version__}"


def choices_path() -> Path:
    from lowbit.io.loaders import cache_dir

    return cache_dir() / "kernel-choices.json"


def _read(path: Path) -> dict:
    """The choices file as ``{"version": 1, "machines": {machine: {call: kernel}}}``; ValueError when it is not."""
    if path.stat().st_size > 8 << 20:
        raise ValueError("larger than 8 MB")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("version") != FILE_VERSION or not isinstance(data.get("machines"), dict):
        raise ValueError("not a kernel-choices file of version 1")
    for mine in data["machines"].values():
        if not isinstance(mine, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mine.items()):
            raise ValueError("its entries are not strings")
    return data


def _load(known: set[str]) -> dict[str, str]:
    """This machine's stored choices; a damaged or foreign file is ignored (one warning) and rewritten later."""
    path = choices_path()
    if not path.exists():
        return {}
    try:
        mine = _read(path)["machines"].get(machine_key(), {})
    except (OSError, ValueError, UnicodeDecodeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return {}
    return {k: v for k, v in mine.items() if v in known}  # kernels since removed: measure again


def _store(key: str, name: str) -> None:
    from lowbit.io.atomic import atomic_file

    path = choices_path()
    try:
        data = _read(path) if path.exists() else {"version": FILE_VERSION, "machines": {}}
    except (OSError, ValueError, UnicodeDecodeError):
        data = {"version": FILE_VERSION, "machines": {}}  # damaged: _load warned; start the file again
    data["machines"].setdefault(machine_key(), {})[key] = name
    try:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    except OSError as e:  # a read-only home: the choice still holds for this process
        log.warning("could not save kernel choices to %s: %s", path, e)


def forget() -> None:
    """Drop the choices held in memory (the file is read again at the next choice)."""
    global _choices
    with _lock:
        _choices = None


def time_call(run, reps_seconds: float = MIN_SECONDS, max_runs: int = MAX_RUNS) -> float:
    """Seconds of the fastest of a few calls of ``run()`` after one warm-up call."""
    run()
    best, spent, n = float("inf"), 0.0, 0
    while n < max_runs and (spent < reps_seconds or n < 2):
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


def _synced(y: torch.Tensor) -> torch.Tensor:
    """``y`` once its device has finished computing it (CUDA runs asynchronously: time the work, not the launch)."""
    if y.is_cuda:
        torch.cuda.synchronize(y.device)
    return y


def fastest(module: Any, x: torch.Tensor, tokens: int, takers: list) -> Any:
    """The kernel among ``takers`` (each able to run this call) that runs it fastest here, measured once per
    kind of call on this machine and remembered."""
    from lowbit.kernels.base import KERNELS, prepared

    global _choices
    # the kernels that competed are part of the key: a kernel added later (or built, or switched back on with
    # LOWBIT_CPP_KERNELS) is measured, not hidden behind a choice made without it
    key = f"{call_key(module, x, tokens)}|among={','.join(sorted(k.name for k in takers))}"
    with _lock:
        if _choices is None:
            _choices = _load(set(KERNELS.names()))
        name = _choices.get(key)
    by_name = {k.name: k for k in takers}
    if name in by_name:
        return by_name[name]
    times = {}
    with torch.no_grad():
        for k in takers:
            state = prepared(module, k)
            times[k.name] = time_call(lambda k=k, state=state: _synced(k.run(module, state, x)))
    name = min(times, key=times.__getitem__)
    for k in takers:  # the losers' packed copies go: only the kernel that runs keeps memory
        if k.name != name:
            module._kernel_state.pop(k.name, None)
    log.info("kernel for %s: %s (%s)", key, name, ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in times.items()))
    with _lock:
        assert _choices is not None
        _choices[key] = name
    _store(key, name)
    return by_name[name]

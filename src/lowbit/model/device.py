"""Where the work runs: the ``--device`` option, and moving a block or a layer there and back.

The model stays where it was loaded (its *home*, normally the CPU); the runner sends one block (or one
layer) at a time to the device, quantizes it there and sends it home again, so the device holds one block
and the calibration activations. A model the user already put on the device never leaves it.

>>> parse_device("cpu")
device(type='cpu')
>>> parse_device("tpu")
Traceback (most recent call last):
lowbit.errors.LowbitError: --device tpu: unknown device (expected cpu, cuda or cuda:N)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")


def parse_device(text: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` (the current CUDA device, with its index) or ``cuda:N`` as a torch device; a one-line
    error naming ``--device`` for anything else, for CUDA on a machine without it, and for a CUDA index past the
    device count."""
    spec = str(text).strip()
    m = _DEVICE.fullmatch(spec.lower())
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise LowbitError(f"--device {spec}: unknown device (expected cpu, cuda or cuda:N)")
    if m.group(1) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LowbitError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}, "
                          f"{torch.cuda.device_count()} CUDA devices); use --device cpu")
    if m.group(2) is None:  # with its index, so that it compares equal to the device tensors report
        return torch.device("cuda", torch.cuda.current_device())
    index, count = int(m.group(2)), torch.cuda.device_count()
    if index >= count:
        raise LowbitError(f"--device {spec}: there {'is' if count == 1 else 'are'} {count} CUDA device"
                          f"{'' if count == 1 else 's'} (cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})")
    return torch.device("cuda", index)


def optional_device(device: str | torch.device | None) -> torch.device | None:
    """:func:`parse_device`, with None meaning "where the tensors already are"."""
    return None if device is None else parse_device(device)


def module_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer that is not on meta (meta if all are; None if it
    holds no tensors)."""
    seen = None
    for t in (*module.parameters(), *module.buffers()):
        if not t.is_meta:
            return t.device
        seen = t.device
    return seen


def to_device(obj: Any, device: torch.device | None) -> Any:
    """``obj`` with every tensor inside (lists, tuples, dicts, dataclasses such as a block's inputs and
    keyword arguments) on ``device``; ``device`` None returns ``obj`` itself."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, list | tuple):
        items = [to_device(v, device) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def send(module: nn.Module, device: torch.device | None) -> torch.device | None:
    """Move ``module`` to ``device`` (None: leave it) and return where it was, to send it back with
    ``send(module, home)``."""
    home = module_device(module)
    if device is not None and home is not None and home != device:
        module.to(device)
    return home


@contextmanager
def layer_on(model: nn.Module, name: str, device: torch.device | None) -> Iterator[None]:
    """Run the body with submodule ``name`` on ``device``. Afterwards the module at ``name`` then (its
    quantized replacement) goes home, and so does the module that was there: a weight it shares with a layer
    still in float (a tied head) must not stay behind on the device."""
    old = model.get_submodule(name)
    home = send(old, device)
    try:
        yield
    finally:
        if device is not None and home is not None and home != device:
            new = model.get_submodule(name)
            send(old, home)
            if new is not old:
                send(new, home)

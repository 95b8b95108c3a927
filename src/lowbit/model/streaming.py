"""Streamed weights: a model whose transformer blocks stay on the ``meta`` device until they are needed.

``lowbit.load(source, lazy=True)`` builds such a model (see :mod:`lowbit.io.lazy`): embeddings, final
norm and head are real, each block's parameters are shapes only, and :class:`StreamedWeights` remembers
where each of them lives (safetensors file + key) with the reader the loader handed it (this layer opens
no files itself). ``quantize_model`` loads a block right before it quantizes it; the float weights of the
layers it replaces go with them, so memory holds one float block at a time, never the whole model.

>>> model, tok = lowbit.load("tiny-llama", lazy=True)
>>> model.model.layers[1].mlp.up_proj.weight.is_meta
True
>>> streamed_weights(model).load_block(model, "model.layers.1.")   # or .load_all(model)
>>> model.model.layers[1].mlp.up_proj.weight.is_meta, model.model.layers[0].mlp.up_proj.weight.is_meta
(False, True)
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError

ATTR = "lowbit_stream"  # the model attribute holding its StreamedWeights

# reads the tensors ``keys`` of one weights file, in that order, into new memory
TensorReader = Callable[[str, Sequence[str]], Iterable[torch.Tensor]]


@dataclass
class StreamedWeights:
    """Where a model's not-yet-loaded tensors live, and how to read them.

    ``blocks``: the module prefixes loaded one at a time (``"model.layers.0."`` …), in execution order;
    ``locations``: state_dict name -> (weights file, key in that file); ``read``: the file reader (the
    loader that built the model gives it: :func:`lowbit.io.lazy.read_safetensors_tensors`).
    """

    blocks: tuple[str, ...]
    locations: dict[str, tuple[str, str]]
    read: TensorReader

    def digest(self) -> list[tuple[str, int, int]]:
        """The weights files as (path, size, modification time): what a resumed run checks it reads again."""
        files = sorted({f for f, _ in self.locations.values()})
        return [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]

    def pending(self, model: nn.Module, prefix: str = "") -> list[str]:
        """Names under ``prefix`` still on the meta device."""
        return [n for n in self.locations if n.startswith(prefix) and _is_meta(model, n)]

    def load(self, model: nn.Module, names: Iterable[str]) -> None:
        """Read the tensors ``names`` from their files into the model, in the dtype the model declares."""
        by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for n in names:
            file, key = self.locations[n]
            by_file[file].append((n, key))
        for file, items in by_file.items():
            for (n, _), value in zip(items, self.read(file, [key for _, key in items]), strict=True):
                _set(model, n, value)

    def load_block(self, model: nn.Module, prefix: str) -> None:
        """Load every tensor under the module prefix ``prefix`` (a block) that is not loaded yet."""
        release_freed_memory()  # what the previous block freed, before this one allocates
        self.load(model, self.pending(model, prefix))

    def load_all(self, model: nn.Module) -> None:
        """Load everything still missing: the model becomes an ordinary, complete one."""
        self.load(model, self.pending(model))


def release_freed_memory() -> None:
    """Hand memory freed by Python back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    A block's tensors are mostly a few MB, under glibc's mmap threshold, so they live in malloc's heap, and
    the heap does not shrink on its own: on SmolLM2 (30 blocks) resident memory crept up ~10 MB a block
    while the live data did not grow.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def streamed_weights(model: nn.Module) -> StreamedWeights | None:
    """The model's :class:`StreamedWeights` if it was loaded lazily and still has blocks on meta, else None."""
    stream = getattr(model, ATTR, None)
    return stream if isinstance(stream, StreamedWeights) and stream.pending(model) else None


def _own_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter or buffer ``name`` as its module registered it; None once a quantized layer replaced
    the module (whose ``.weight`` would be a freshly dequantized copy)."""
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None
    return mod._parameters[attr] if attr in mod._parameters else mod._buffers.get(attr)


def _is_meta(model: nn.Module, name: str) -> bool:
    t = _own_tensor(model, name)
    return t is not None and t.is_meta


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    old = _own_tensor(model, name)
    if old is None:
        raise LowbitError(f"weight {name!r}: the model has no such parameter or buffer")
    if tuple(value.shape) != tuple(old.shape):
        raise LowbitError(f"weight {name!r}: the checkpoint holds shape {tuple(value.shape)}, the model's config "
                          f"asks for {tuple(old.shape)}")
    value = value.to(old.dtype)  # no copy when the checkpoint already holds the model's dtype
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value

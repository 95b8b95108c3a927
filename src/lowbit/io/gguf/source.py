"""Where exported weights come from, and how they go back into a model.

* :func:`open_source` — a transformers model (float, or with lowbit's QLinear/QEmbedding, dequantized on
  demand) or a Hugging Face safetensors folder read tensor by tensor, behind one small interface;
* :func:`read_gguf_weights` / :func:`load_gguf_into` — reading a GGUF file back; they live in
  :mod:`lowbit.io.gguf.reader` and are importable from here too.

>>> sd = load_gguf_into(model, "model.gguf")   # model now computes what the file stores
>>> torch.equal(model.lm_head.weight, sd["lm_head.weight"])
True
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.scheme import Scheme
from lowbit.io.gguf.reader import load_gguf_into, read_gguf_weights  # noqa: F401  (re-exported)
from lowbit.io.gguf.writer import GGUFExportError


@dataclass
class TensorSource:
    """Named tensors with lazy access. ``names`` in source order; shapes in torch order."""

    config: Any
    tokenizer: Any
    label: str
    model: nn.Module | None
    entries: dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[int, int], torch.Tensor]]]
    schemes: dict[str, Scheme] = field(default_factory=dict)  # quantized layers' weights
    qtensors: dict[str, Any] = field(default_factory=dict)  # their QTensors (GGML blocks are written as stored)

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][1] if name in self.entries else torch.float32

    def get(self, name: str, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` of tensor ``name`` (all of a 1-D tensor); a folder reads only those rows."""
        shape = self.entries[name][0]
        if len(shape) < 2:
            return self.entries[name][2](0, shape[0] if shape else 1)
        return self.entries[name][2](r0, shape[0] if r1 is None else r1)


def _drop_tied(config: Any, entries: dict) -> None:
    if getattr(config, "tie_word_embeddings", False):
        entries.pop("lm_head.weight", None)


def _rows_of_qtensor(q: Any) -> Callable[[int, int], torch.Tensor]:
    """Row reader of a QTensor: dequantizes once, on first use, and keeps the float copy for later chunks."""
    cache: dict[str, torch.Tensor] = {}

    def get(r0: int, r1: int) -> torch.Tensor:
        if "w" not in cache or r0 == 0:
            cache["w"] = q.dequantize(torch.float32).cpu()
        out = cache["w"][r0:r1]
        if r1 >= q.shape[0]:
            cache.clear()
        return out

    return get


def _from_model(model: nn.Module, tokenizer: Any) -> TensorSource:
    from lowbit.model.qmodules import QEmbedding, QLinear, quantized_state_keys

    entries: dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[int, int], torch.Tensor]]] = {}
    schemes: dict[str, Scheme] = {}
    qtensors: dict[str, Any] = {}
    for n, m in model.named_modules():
        if isinstance(m, QLinear | QEmbedding):
            if isinstance(m, QLinear) and (m.act_scheme or m.input_scale is not None):
                raise GGUFExportError(f"layer {n}: quantized activations ({m.act_scheme or 'input scale'}) have "
                                      f"no GGUF form; export the weight-only model")
            q = m.qweight
            entries[f"{n}.weight"] = (tuple(q.shape), q.dtype, _rows_of_qtensor(q))
            schemes[f"{n}.weight"] = q.scheme
            qtensors[f"{n}.weight"] = q
    quantized = quantized_state_keys(model)  # the layers' parts: their weights are the entries above
    for k, v in model.state_dict().items():
        if k not in entries and k not in quantized:
            entries[k] = (tuple(v.shape), v.dtype,
                          lambda r0, r1, v=v: (v.detach()[r0:r1] if v.dim() > 1 else v.detach()).cpu())
    _drop_tied(model.config, entries)
    label = Path(str(getattr(model.config, "_name_or_path", "") or type(model).__name__)).name
    return TensorSource(model.config, tokenizer, label, model, entries, schemes, qtensors)


def _from_folder(path: Path, tokenizer: Any) -> TensorSource:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from lowbit.io.safetensors_header import torch_dtype

    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not files:
        raise GGUFExportError(f"{path}: expected a Hugging Face folder with config.json and *.safetensors files")
    config = AutoConfig.from_pretrained(path)
    entries = {}
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                dt = torch_dtype(sl.get_dtype()) or torch.float32

                def get(r0: int, r1: int, f=f, k=k) -> torch.Tensor:
                    with safe_open(f, "pt") as h2:
                        sl = h2.get_slice(k)
                        return sl[r0:r1] if len(sl.get_shape()) > 1 else sl[:]

                entries[k] = (tuple(sl.get_shape()), dt, get)
    _drop_tied(config, entries)
    if tokenizer is None and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return TensorSource(config, tokenizer, path.name, None, entries)


def open_source(model: nn.Module | str | os.PathLike, tokenizer: Any = None) -> TensorSource:
    """A model or a Hugging Face safetensors folder as a :class:`TensorSource`.

    >>> open_source("tiny-llama").shape("model.embed_tokens.weight")   # a Hugging Face folder, read lazily
    (300, 256)
    """
    if isinstance(model, nn.Module):
        if getattr(model, "config", None) is None:
            raise GGUFExportError(f"{type(model).__name__} has no transformers config: cannot name its tensors")
        return _from_model(model, tokenizer)
    return _from_folder(Path(model), tokenizer)

"""Where exported weights come from, and how they go back into a model.

* :func:`open_source` — a transformers model (float, or with lowbit's QLinear/QEmbedding, dequantized on
  demand) or a Hugging Face safetensors folder read tensor by tensor, behind one small interface;
* :class:`Calibrator` — walks the model's blocks in order, collecting each block's input statistics and then
  running the block with the weights just written, so the next block sees the quantized model's activations;
* :func:`read_gguf_weights` / :func:`load_gguf_into` — a GGUF file's tensors dequantized with lowbit's own
  block code (no float copy on disk), mapped back to Hugging Face names and layouts.

>>> sd = load_gguf_into(model, "smollm2-q4km.gguf")   # model now computes what the file stores
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError
from lowbit.io.gguf.blocks import BLOCK_TYPES
from lowbit.io.gguf.writer import GGUFExportError, arch_spec, gguf_names, qk_heads, unpermute_qk
from lowbit.methods.registry import LayerStats


@dataclass
class TensorSource:
    """Named tensors with lazy access. ``names`` in source order; shapes in torch order."""

    config: Any
    tokenizer: Any
    label: str
    model: nn.Module | None
    entries: dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[int, int], torch.Tensor]]]
    schemes: dict[str, Scheme] = field(default_factory=dict)  # quantized layers' weights

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
    for n, m in model.named_modules():
        if isinstance(m, QLinear | QEmbedding):
            if isinstance(m, QLinear) and (m.act_scheme or m.input_scale is not None):
                raise GGUFExportError(f"layer {n}: quantized activations ({m.act_scheme or 'input scale'}) have "
                                      f"no GGUF form; export the weight-only model")
            q = m.qweight
            entries[f"{n}.weight"] = (tuple(q.shape), q.dtype, _rows_of_qtensor(q))
            schemes[f"{n}.weight"] = q.scheme
    quantized = quantized_state_keys(model)  # the layers' parts: their weights are the entries above
    for k, v in model.state_dict().items():
        if k not in entries and k not in quantized:
            entries[k] = (tuple(v.shape), v.dtype,
                          lambda r0, r1, v=v: (v.detach()[r0:r1] if v.dim() > 1 else v.detach()).cpu())
    _drop_tied(model.config, entries)
    label = Path(str(getattr(model.config, "_name_or_path", "") or type(model).__name__)).name
    return TensorSource(model.config, tokenizer, label, model, entries, schemes)


def _from_folder(path: Path, tokenizer: Any) -> TensorSource:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not files:
        raise GGUFExportError(f"{path}: expected a Hugging Face folder with config.json and *.safetensors files")
    config = AutoConfig.from_pretrained(path)
    entries = {}
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(sl.get_dtype(),
                                                                                            torch.float32)

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

    >>> open_source("path/to/hf-folder").shape("model.embed_tokens.weight")
    (49152, 576)
    """
    if isinstance(model, nn.Module):
        if getattr(model, "config", None) is None:
            raise GGUFExportError(f"{type(model).__name__} has no transformers config: cannot name its tensors")
        return _from_model(model, tokenizer)
    return _from_folder(Path(model), tokenizer)


class Calibrator:
    """Block-by-block statistics for export: block i's stats come from inputs produced by blocks < i running
    with the weights already encoded (recorded with :meth:`record`), as GPTQ's sequential mode wants.

    >>> cal = Calibrator(model, windows, want_xtx=True)
    >>> st = cal.stats("model.layers.0.self_attn.q_proj")   # LayerStats with xtx, sq_mean
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, want_xtx: bool, batch_size: int = 8):
        from lowbit.model.arch import arch_for, blocks_of
        from lowbit.model.calibrate import capture_block_inputs

        self.blocks_name, self.blocks = blocks_of(model, arch_for(model))
        self.want_xtx = want_xtx
        self.inputs = capture_block_inputs(model, self.blocks[0], windows.long(), batch_size)
        self.current = -1
        self._stats: dict[str, LayerStats] = {}
        self._quant: dict[str, torch.Tensor] = {}

    def _block_index(self, layer: str) -> int | None:
        prefix = f"{self.blocks_name}."
        if not layer.startswith(prefix):
            return None
        return int(layer[len(prefix):].split(".", 1)[0])

    def _advance(self) -> None:
        from lowbit.model.calibrate import collect_stats, run_block

        if self.current >= 0:
            block = self.blocks[self.current]
            saved = {}
            prefix = f"{self.blocks_name}.{self.current}."
            for layer, w_hat in self._quant.items():
                m = block.get_submodule(layer[len(prefix):])
                if not isinstance(m, nn.Linear):
                    continue  # lowbit's QLinear already computes with its quantized weight
                saved[m] = m.weight.data
                m.weight.data = w_hat.to(m.weight.dtype)
            try:
                self.inputs = run_block(block, self.inputs)
            finally:
                for m, old in saved.items():
                    m.weight.data = old
        self.current += 1
        block = self.blocks[self.current]
        prefix = f"{self.blocks_name}.{self.current}."
        layers = {prefix + n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        self._stats = collect_stats(block, self.inputs, layers, set(layers) if self.want_xtx else set())
        self._quant = {}

    def stats(self, layer: str) -> LayerStats | None:
        """Statistics of a module (full name); None outside the blocks (embeddings, head)."""
        i = self._block_index(layer)
        if i is None:
            return None
        if i < self.current:
            raise LowbitError(f"calibration: layer {layer} asked for after block {self.current}")
        while self.current < i:
            self._advance()
        return self._stats.get(layer)

    def record(self, layer: str, w_hat: torch.Tensor) -> None:
        """The weight just encoded for ``layer`` (HF layout), used when this block's outputs are recomputed."""
        if self._block_index(layer) == self.current:
            self._quant[layer] = w_hat

    def close(self) -> None:
        self.inputs, self._stats, self._quant = [], {}, {}


# -- reading back ----------------------------------------------------------------------------------------
def read_gguf_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file (GGUF names), dequantized to float32 with lowbit's block code.

    >>> read_gguf_weights("model.gguf")["blk.0.attn_q.weight"].shape
    torch.Size([576, 576])
    """
    from gguf.constants import GGMLQuantizationType

    from lowbit.io.inspect import read_gguf_index

    idx = read_gguf_index(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for t in idx.tensors:
        name = GGMLQuantizationType(t.ggml_type).name
        if name not in BLOCK_TYPES:
            raise LowbitError(f"{path}: tensor {t.name} has type {name}, which lowbit cannot dequantize")
        bt = BLOCK_TYPES[name]
        data = torch.from_numpy(np.array(raw[t.offset:t.offset + t.nbytes])).reshape(-1, bt.type_size)
        out[t.name] = bt.dequantize(data).reshape(t.shape)
    return out


def load_gguf_into(model: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Overwrite ``model``'s weights with a GGUF file's (dequantized, Q/K rows back in HF order).

    Every tensor of the model must be in the file (a tied head takes the embedding). Returns the HF state dict.
    """
    spec = arch_spec(model.config)
    weights = read_gguf_weights(path)
    sd = model.state_dict()
    names = gguf_names(spec, model.config, [k for k in sd if not k.startswith("lm_head") or
                                            not getattr(model.config, "tie_word_embeddings", False)])
    new = {}
    for hf, g in names.items():
        if g not in weights:
            raise LowbitError(f"{path}: no tensor {g} for {hf}")
        w = weights[g]
        heads = qk_heads(spec, model.config, hf)
        new[hf] = (w if heads is None else unpermute_qk(w, heads)).to(sd[hf].dtype)
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in sd:
        new["lm_head.weight"] = new["model.embed_tokens.weight"]
    missing = set(sd) - set(new)
    if missing:
        raise LowbitError(f"{path}: the file lacks {sorted(missing)[:3]} …")
    model.load_state_dict(new)
    return new

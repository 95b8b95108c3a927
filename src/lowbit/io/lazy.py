"""A lazily loaded float model: the skeleton from the config, the transformer blocks left on ``meta``.

Embeddings, final norm, head (and tied weights) are read for real; each block's parameters stay shapes
only, with their safetensors file and key recorded in a :class:`~lowbit.model.streaming.StreamedWeights`
that ``quantize_model`` uses to load one block at a time. Buffers (rotary ``inv_freq`` …) are built
for real by the model's constructor, as in a normal load.

A folder whose weights cannot be streamed (no ``model.safetensors`` or index, checkpoint keys that do not
match the model's, an architecture without a block table) raises :class:`NotStreamable`; the caller then
loads the model whole.

>>> from transformers import AutoConfig
>>> model = load_lazy("tiny-llama", AutoConfig.from_pretrained("tiny-llama"))
>>> model.model.embed_tokens.weight.is_meta, model.model.layers[0].self_attn.q_proj.weight.is_meta
(False, True)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from lowbit.errors import LowbitError, WeightsFileError
from lowbit.io.safetensors_header import TensorEntry, read_safetensors_header, torch_dtype
from lowbit.model.arch import arch_for, blocks_of
from lowbit.model.shape import auto_model_class
from lowbit.model.streaming import ATTR, StreamedWeights

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class NotStreamable(LowbitError):
    """This model's weights cannot be loaded block by block (the message says why)."""


def weight_files(folder: Path) -> dict[str, Path] | None:
    """Checkpoint key -> the safetensors file holding it (sharded index or single file); None if neither exists."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {k: folder / f for k, f in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        return dict.fromkeys(read_safetensors_header(folder / SINGLE_FILE).tensors, folder / SINGLE_FILE)
    return None


# -- reading safetensors without a memory map ---------------------------------------------------------
# safetensors' own reader memory-maps the file and hands out tensors backed by the map: a page once read
# stays in the process's resident memory until every tensor from that file is freed, which for a file
# holding the (always loaded) embeddings is never, so streaming the blocks would end with the whole file
# resident. Plain reads into a fresh tensor cost exactly the tensor.


def read_safetensors_tensors(file: str, keys: Sequence[str]) -> Iterator[torch.Tensor]:
    """The tensors ``keys`` of a safetensors file, in that order, each read into new memory (no memory map).

    >>> [t.shape for t in read_safetensors_tensors("tiny-llama/model.safetensors", ["model.norm.weight"])]
    [torch.Size([256])]
    """
    header = read_safetensors_header(file)
    with open(file, "rb", buffering=0) as f:
        for key in keys:
            if key not in header:
                raise WeightsFileError(f"{file}: no tensor {key!r}")
            yield _read_tensor(f, file, header.data_start, header[key])


def _read_tensor(f: BinaryIO, file: str, data_start: int, t: TensorEntry) -> torch.Tensor:
    dtype = torch_dtype(t.dtype)
    if dtype is None:
        raise WeightsFileError(f"{file}: tensor {t.name!r} has dtype {t.dtype}, which lowbit cannot stream")
    out = torch.empty(t.shape, dtype=dtype)
    buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # the header reader checked len == t.nbytes
    f.seek(data_start + t.begin)
    done = 0
    while done < len(buf):  # raw reads may return less than asked
        got = f.readinto(buf[done:])
        if not got:
            raise WeightsFileError(f"{file}: tensor {t.name!r} ends early (file truncated since it was opened?)")
        done += got
    return out  # little-endian, as the format stores it


def hub_folder(repo_id: str) -> Path | None:
    """The local snapshot folder holding a hub model's safetensors files (fetched if missing and online)."""
    from huggingface_hub import hf_hub_download

    try:
        index = Path(hf_hub_download(repo_id, INDEX_FILE))
    except Exception:  # missing file, offline cache miss, gated repo …: the hub raises many types
        index = None
    try:
        if index is None:
            return Path(hf_hub_download(repo_id, SINGLE_FILE)).parent
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            hf_hub_download(repo_id, shard)
        return index.parent
    except Exception:
        return None


def _checkpoint_key(name: str, keys: dict[str, Path], base_prefix: str) -> str | None:
    """The checkpoint key of the model's ``name``: itself, or with the base model prefix added or removed
    (a ``BertModel`` checkpoint loaded as ``BertForMaskedLM`` and back)."""
    if name in keys:
        return name
    if base_prefix:
        alt = name[len(base_prefix) + 1 :] if name.startswith(base_prefix + ".") else f"{base_prefix}.{name}"
        if alt in keys:
            return alt
    return None


def load_lazy(ref: str | Path, config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build ``config``'s model with its blocks on meta and everything else loaded from ``ref`` (a folder or
    hub id). Raises :class:`NotStreamable` when the weights cannot be streamed."""
    from accelerate import init_empty_weights

    from lowbit.io.loaders import _dtype_kwarg

    folder = Path(ref) if Path(ref).is_dir() else hub_folder(str(ref))
    files = None if folder is None else weight_files(folder)
    if files is None:
        raise NotStreamable(f"no {SINGLE_FILE} or {INDEX_FILE}")
    # parameters on meta, buffers real; accelerate re-creates every registered parameter, which unties tied
    # ones: tie_weights() below ties them again once the real tensors are in
    with init_empty_weights(include_buffers=False):
        model = auto_model_class(config).from_config(config, **_dtype_kwarg(dtype))
    try:
        blocks_name, blocks = blocks_of(model, arch_for(model))
    except LowbitError as e:
        raise NotStreamable(str(e)) from None
    prefixes = tuple(f"{blocks_name}.{i}." for i in range(len(blocks)))
    locations, missing = {}, []
    for name, t in model.state_dict(keep_vars=True).items():
        key = _checkpoint_key(name, files, getattr(model, "base_model_prefix", ""))
        if key is not None:
            locations[name] = (str(files[key]), key)
        elif t.is_meta:
            missing.append(name)
    stream = StreamedWeights(prefixes, locations, read_safetensors_tensors)
    buffers = {n for n, _ in model.named_buffers()}
    # now: everything outside the blocks, and any buffer the checkpoint holds (a normal load reads them too)
    stream.load(model, [n for n in locations if not n.startswith(prefixes) or n in buffers])
    if missing:
        model.tie_weights()
        missing = [n for n in missing if model.get_parameter(n).is_meta]
        if missing:
            raise NotStreamable(f"{len(missing)} weights not found under the model's names in the checkpoint "
                                f"(first: {missing[0]!r})")
    _load_generation_config(model, folder)
    setattr(model, ATTR, stream)
    return model


def _load_generation_config(model: nn.Module, folder: Path) -> None:
    if not (folder / "generation_config.json").is_file() or getattr(model, "generation_config", None) is None:
        return  # as in a normal load: only models that generate read it
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except Exception:  # an invalid generation config: from_pretrained keeps the default one too
        pass

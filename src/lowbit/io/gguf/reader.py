"""The one GGUF reader: header, metadata and tensor table (validated), each tensor's stored bytes, and the
tensors dequantized with lowbit's own block code.

:func:`read_gguf_index` parses the header without materialising long arrays (vocabularies) and checks it
against the file before anything trusts it: magic and version, header counts a file of this size can hold,
string and array lengths inside the file, known value and tensor types, unique keys and tensor names, a
power-of-two alignment, whole blocks, aligned offsets, every tensor inside the file and no two
overlapping. Each failure is one line naming the file (:class:`~lowbit.errors.WeightsFileError`).

>>> idx = read_gguf_index("model.gguf")
>>> idx.metadata["general.architecture"], len(idx.tensors), idx.tensors[0].type_name
('llama', 21, 'Q4_K')
>>> info, raw = next(iter_gguf_tensors("model.gguf"))   # raw: uint8, as stored
>>> info.name, raw.numel() == info.nbytes
('token_embd.weight', True)
>>> w = read_gguf_weights("model.gguf")["token_embd.weight"]
>>> w.dtype, w.shape
(torch.float32, torch.Size([300, 256]))
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError, WeightsFileError
from lowbit.io.gguf.writer import arch_spec, gguf_names, qk_heads, unpermute_qk
from lowbit.layouts.ggml import BLOCK_TYPES

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_MAX_DIMS = 8  # ggml itself uses 4; more than 8 is a corrupt entry


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file. ``shape`` is in PyTorch order (GGUF stores ne0 = the fastest dim first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset of the tensor data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        from gguf.constants import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name


@dataclass(frozen=True)
class GGUFIndex:
    """A GGUF file's metadata (scalars, strings and short arrays; long arrays as their length) and tensors."""

    version: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]


# GGUF value type id -> struct format of one element (8 = string and 9 = array are handled apart)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_SHORT_ARRAY = 64  # arrays up to this length are kept in the metadata; longer ones (vocabularies) are skipped
_MAX_NESTING = 4  # arrays of arrays deeper than this are corrupt (and would exhaust the stack)
# the smallest metadata entry: key length (8) + empty key + value type (4) + a 1-byte value
_MIN_KV_BYTES = 13
# the smallest tensor entry: name length (8) + empty name + ndim (4) + type (4) + offset (8)
_MIN_TENSOR_BYTES = 24


class _Corrupt(Exception):
    """Raised inside the parser; read_gguf_index turns it into one WeightsFileError naming the file."""


class _Cursor:
    """Little-endian reads from a memory map; every length is checked against what is left of the file."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if size > self.left():
            raise _Corrupt("read past the end of the file")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise _Corrupt(f"{what} of {n} bytes runs past the end of the file")
        self.pos += n

    def string(self) -> str:
        n = self.take("<Q")
        start = self.pos
        self.skip(n, "string")
        return self.buf[start:self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= _MAX_NESTING:
                raise _Corrupt(f"arrays nested more than {_MAX_NESTING} deep")
            etype, count = self.take("<I"), self.take("<Q")
            _check_type(etype)
            if count > self.left():  # every element takes at least one byte
                raise _Corrupt(f"array of {count} elements runs past the end of the file")
            if count > _SHORT_ARRAY:  # skip without building Python objects for every element
                self._skip_array(etype, count, depth + 1)
                return {"array_length": count}
            return [self.value(etype, depth + 1) for _ in range(count)]
        _check_type(vtype)
        return self.take(_GGUF_SCALARS[vtype])

    def _skip_array(self, etype: int, count: int, depth: int) -> None:
        if etype in _GGUF_SCALARS:
            self.skip(count * struct.calcsize(_GGUF_SCALARS[etype]), "array")
        else:
            for _ in range(count):
                if etype == _STRING:
                    self.skip(self.take("<Q"), "string")
                else:
                    self.value(etype, depth)


def _check_type(vtype: int) -> None:
    if vtype not in _GGUF_SCALARS and vtype not in (_STRING, _ARRAY):
        raise _Corrupt(f"unknown metadata value type {vtype}")


def read_gguf_index(path: str | os.PathLike) -> GGUFIndex:
    """Parse a GGUF header (metadata + tensor table) and check it against the file (see the module docstring).

    ~50× faster than ``gguf.GGUFReader`` on a model with a 50k-token vocabulary, because long arrays
    are skipped rather than materialised.

    >>> idx = read_gguf_index("model.gguf")
    >>> idx.metadata["general.architecture"], len(idx.tensors)
    ('llama', 21)
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise WeightsFileError(f"{p}: no such file") from None
    if size < 24:
        raise WeightsFileError(f"{p}: truncated GGUF file ({size} bytes)")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != GGUF_MAGIC:
            raise WeightsFileError(f"{p}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        c = _Cursor(buf)
        c.pos = 4
        try:
            version = c.take("<I")
            if version not in (2, 3):
                raise WeightsFileError(f"{p}: GGUF version {version} is not supported (big-endian or corrupt file?)")
            n_tensors, n_kv = c.take("<Q"), c.take("<Q")
            if n_tensors * _MIN_TENSOR_BYTES + n_kv * _MIN_KV_BYTES > c.left():
                raise _Corrupt(f"{n_tensors} tensors and {n_kv} metadata keys cannot fit in {size} bytes")
            meta, raw = _parse_tables(c, n_kv, n_tensors)
        except _Corrupt as e:
            raise WeightsFileError(f"{p}: truncated or corrupt GGUF header ({e})") from None
        header_end = c.pos
    return GGUFIndex(version, meta, _tensor_infos(p, size, meta, raw, header_end))


def _parse_tables(c: _Cursor, n_kv: int, n_tensors: int) -> tuple[dict[str, Any], list]:
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        if key in meta:
            raise _Corrupt(f"metadata key {key!r} appears twice")
        meta[key] = c.value(c.take("<I"))
    raw, names = [], set()
    for _ in range(n_tensors):
        name = c.string()
        if name in names:
            raise _Corrupt(f"tensor {name!r} appears twice")
        names.add(name)
        ndim = c.take("<I")
        if ndim > GGUF_MAX_DIMS:
            raise _Corrupt(f"tensor entry {name!r} has {ndim} dims")
        dims = [c.take("<Q") for _ in range(ndim)]
        raw.append((name, dims, c.take("<I"), c.take("<Q")))
    return meta, raw


def _tensor_infos(p: Path, size: int, meta: dict[str, Any], raw: list, header_end: int) -> tuple[GGUFTensorInfo, ...]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    align = meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if type(align) is not int or align <= 0 or align & (align - 1):
        raise WeightsFileError(f"{p}: corrupt GGUF header (general.alignment {align!r} is not a power of two)")
    data_start = -(-header_end // align) * align  # round up to the alignment
    tensors = []
    for name, dims, gtype, offset in raw:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            raise WeightsFileError(f"{p}: tensor {name!r} has unknown GGML type {gtype}") from None
        numel = 1
        for d in dims:
            numel *= d
        if numel % block:
            raise WeightsFileError(f"{p}: tensor {name!r} has {numel} elements, not whole blocks of {block}")
        if offset % align:
            raise WeightsFileError(f"{p}: tensor {name!r} starts at data offset {offset}, not a multiple of the "
                                   f"alignment {align}")
        nbytes = numel // block * block_bytes
        start = data_start + offset
        if start + nbytes > size:
            raise WeightsFileError(f"{p}: tensor {name!r} is truncated (needs byte {start + nbytes}, file has {size})")
        tensors.append(GGUFTensorInfo(name, tuple(int(d) for d in reversed(dims)), gtype, start, nbytes))
    prev = None
    for t in sorted((t for t in tensors if t.nbytes), key=lambda t: t.offset):
        if prev is not None and t.offset < prev.offset + prev.nbytes:
            raise WeightsFileError(f"{p}: tensors {prev.name!r} and {t.name!r} overlap in the file")
        prev = t
    return tuple(tensors)


def iter_gguf_tensors(path: str | os.PathLike, index: GGUFIndex | None = None
                      ) -> Iterator[tuple[GGUFTensorInfo, torch.Tensor]]:
    """Each tensor's stored bytes, in file order: ``(info, uint8 tensor of info.nbytes)``, a copy of the file's.

    >>> info, raw = next(iter_gguf_tensors("model.gguf"))
    >>> raw.dtype, raw.numel() == info.nbytes
    (torch.uint8, True)
    """
    idx = read_gguf_index(path) if index is None else index
    if not idx.tensors:
        return
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    for t in idx.tensors:
        data = np.array(raw[t.offset:t.offset + t.nbytes])
        if data.size != t.nbytes:
            raise WeightsFileError(f"{path}: tensor {t.name!r} ends early (file truncated since it was read?)")
        yield t, torch.from_numpy(data)


def read_gguf_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file (GGUF names), dequantized to float32 with lowbit's block code.

    >>> read_gguf_weights("model.gguf")["blk.0.attn_q.weight"].shape
    torch.Size([256, 256])
    """
    out = {}
    for t, data in iter_gguf_tensors(path):
        name = t.type_name
        if name not in BLOCK_TYPES:
            raise LowbitError(f"{path}: tensor {t.name} has type {name}, which lowbit cannot dequantize")
        bt = BLOCK_TYPES[name]
        out[t.name] = bt.dequantize(data.reshape(-1, bt.type_size)).reshape(t.shape)
    return out


def load_gguf_into(model: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Overwrite ``model``'s weights with a GGUF file's (dequantized, Q/K rows back in HF order).

    Every tensor of the model must be in the file (a tied head takes the embedding). Returns the HF state dict.

    >>> sd = load_gguf_into(model, "model.gguf")   # model now computes what the file stores
    >>> torch.equal(model.model.layers[0].mlp.down_proj.weight, sd["model.layers.0.mlp.down_proj.weight"])
    True
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

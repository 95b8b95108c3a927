"""What is inside a weights file: one row per tensor (name, shape, storage format, bits per weight, bytes).

Reads headers only, never tensor data, so it is instant on multi-gigabyte files. Four kinds of input:

* a lowbit checkpoint written by :func:`lowbit.save_tensors` — format = scheme name (``int4-g128``);
* a folder holding ``model.safetensors`` (a lowbit output directory or an HF model folder; sharded
  ``*.safetensors`` are read in name order);
* plain safetensors — format = dtype name (``float32``);
* GGUF — format = GGML type name (``Q4_1``), bpw from the type's block size and block bytes.

>>> rows = inspect_path("SmolLM2-135M-Instruct.Q4_1.gguf")
>>> rows[0]
TensorRow(name='token_embd.weight', shape=(49152, 576), format='Q8_0', bpw=8.5, nbytes=30081024)
>>> summarize(rows)[0]
134515008
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.core.scheme import Scheme
from lowbit.errors import SchemeError, WeightsFileError
from lowbit.io.safetensors_header import (
    SafetensorsHeader,
    TensorEntry,
    dtype_bits,
    dtype_name,
    read_safetensors_header,
    torch_dtype,
)

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32

# inspect's errors are the file readers' errors: one class whichever kind of file failed
InspectError = WeightsFileError


@dataclass(frozen=True)
class TensorRow:
    """One stored tensor. ``bpw`` = 8 × nbytes / numel (codes + scales + zero-points for quantized ones)."""

    name: str
    shape: tuple[int, ...]
    format: str
    bpw: float
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def summarize(rows: list[TensorRow]) -> tuple[int, int, float]:
    """``(total_params, total_bytes, mean_bpw)``; mean_bpw is weighted by element count (8 × bytes / params).

    >>> summarize([TensorRow("a", (2, 32), "Q8_0", 8.5, 68)])
    (64, 68, 8.5)
    """
    params = sum(r.numel for r in rows)
    nbytes = sum(r.nbytes for r in rows)
    return params, nbytes, (8 * nbytes / params if params else 0.0)


def inspect_path(path: str | os.PathLike) -> list[TensorRow]:
    """Rows for every tensor in a lowbit checkpoint, safetensors file, model folder or GGUF file.

    >>> [r.format for r in inspect_path("out/model.safetensors")][:2]
    ['int4-g128', 'float32']
    """
    p = Path(path)
    if not p.exists():
        raise InspectError(f"{p}: no such file or directory")
    if p.is_dir():
        files = [p / "model.safetensors"] if (p / "model.safetensors").is_file() else sorted(p.glob("*.safetensors"))
        if not files:
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) != 1:
                raise InspectError(f"{p}: folder holds no model.safetensors (nor exactly one .gguf file)")
            files = ggufs
        return [row for f in files for row in inspect_path(f)]
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return _gguf_rows(p)
    if p.suffix == ".safetensors":
        return _safetensors_rows(p)
    raise InspectError(f"{p}: unknown file type (expected .safetensors, .gguf or a model folder)")


# -- safetensors --------------------------------------------------------------------------------------


def _plain_row(t: TensorEntry) -> TensorRow:
    dt, bits = torch_dtype(t.dtype), dtype_bits(t.dtype)
    bpw = float(bits) if bits else (8 * t.nbytes / t.numel if t.numel else 0.0)  # unknown dtype: from its bytes
    return TensorRow(t.name, t.shape, t.dtype.lower() if dt is None else dtype_name(dt), bpw, t.nbytes)


def _safetensors_rows(p: Path) -> list[TensorRow]:
    header = read_safetensors_header(p)
    if "lowbit" not in header.metadata:
        return [_plain_row(t) for t in header.tensors.values()]
    try:
        doc = json.loads(header.metadata["lowbit"])
        entries = doc["tensors"]
        rows = [_lowbit_row(header, name, entry) for name, entry in entries.items()]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InspectError(f"{p}: corrupt lowbit header ({type(e).__name__}: {e})") from None
    except SchemeError as e:
        raise InspectError(f"{p}: {e}") from None
    return rows


def _lowbit_row(header: SafetensorsHeader, name: str, entry: dict[str, Any]) -> TensorRow:
    if entry.get("kind") == "tensor":
        return _plain_row(header.tensors[name])
    scheme = Scheme.from_dict(entry["scheme"])
    shape = tuple(int(d) for d in entry["shape"])
    # bytes actually stored for this QTensor: its codes, scales and zero-points parts
    nbytes = sum(header.tensors[f"{name}.{part}"].nbytes for part in ("codes", "scales", "zeros")
                 if f"{name}.{part}" in header.tensors)
    numel = math.prod(shape)
    return TensorRow(name, shape, scheme.name, 8 * nbytes / numel if numel else 0.0, nbytes)


# -- GGUF ---------------------------------------------------------------------------------------------


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
_SHORT_ARRAY = 64  # arrays up to this length are kept in the metadata; longer ones (vocabularies) are skipped


class _Cursor:
    """Little-endian reads from a memory map, raising IndexError past the end."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise IndexError("read past the end of the file")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise IndexError("string runs past the end of the file")
        s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.take("<I"), self.take("<Q")
            if count > _SHORT_ARRAY:  # skip without building Python objects for every element
                if etype == 8:
                    for _ in range(count):
                        n = self.take("<Q")
                        self.pos += n
                else:
                    self.pos += count * struct.calcsize(_GGUF_SCALARS[etype])
                return {"array_length": count}
            return [self.value(etype) for _ in range(count)]
        return self.take(_GGUF_SCALARS[vtype])


def read_gguf_index(path: str | os.PathLike) -> GGUFIndex:
    """Parse a GGUF header (metadata + tensor table) and check that every tensor lies inside the file.

    ~50× faster than ``gguf.GGUFReader`` on a model with a 50k-token vocabulary, because long arrays
    are skipped rather than materialised.

    >>> idx = read_gguf_index("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> idx.metadata["general.architecture"], len(idx.tensors)
    ('llama', 272)
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    p = Path(path)
    size = p.stat().st_size
    if size < 24:
        raise InspectError(f"{p}: truncated GGUF file ({size} bytes)")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != GGUF_MAGIC:
            raise InspectError(f"{p}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        c = _Cursor(buf)
        c.pos = 4
        try:
            version = c.take("<I")
            if version not in (2, 3):
                raise InspectError(f"{p}: GGUF version {version} is not supported (big-endian or corrupt file?)")
            n_tensors, n_kv = c.take("<Q"), c.take("<Q")
            if n_tensors > size or n_kv > size:
                raise InspectError(f"{p}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata keys)")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = c.string()
                meta[key] = c.value(c.take("<I"))
            raw = []
            for _ in range(n_tensors):
                name = c.string()
                ndim = c.take("<I")
                if ndim > 8:
                    raise InspectError(f"{p}: corrupt GGUF tensor entry {name!r} ({ndim} dims)")
                dims = [c.take("<Q") for _ in range(ndim)]
                raw.append((name, dims, c.take("<I"), c.take("<Q")))
        except (IndexError, KeyError, struct.error) as e:
            raise InspectError(f"{p}: truncated or corrupt GGUF header ({e})") from None
        align = int(meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        data_start = -(-c.pos // align) * align  # round up to the alignment
    tensors = []
    for name, dims, gtype, offset in raw:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            raise InspectError(f"{p}: tensor {name!r} has unknown GGML type {gtype}") from None
        numel = 1
        for d in dims:
            numel *= d
        if numel % block:
            raise InspectError(f"{p}: tensor {name!r} has {numel} elements, not whole blocks of {block}")
        nbytes = numel // block * block_bytes
        start = data_start + offset
        if start + nbytes > size:
            raise InspectError(f"{p}: tensor {name!r} is truncated (needs byte {start + nbytes}, file has {size})")
        tensors.append(GGUFTensorInfo(name, tuple(int(d) for d in reversed(dims)), gtype, start, nbytes))
    return GGUFIndex(version, meta, tuple(tensors))


def _gguf_rows(p: Path) -> list[TensorRow]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    rows = []
    for t in read_gguf_index(p).tensors:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
        rows.append(TensorRow(t.name, t.shape, t.type_name, 8 * block_bytes / block, t.nbytes))
    return rows

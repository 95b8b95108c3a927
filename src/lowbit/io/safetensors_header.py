"""The one safetensors header reader (validated) and the one safetensors dtype table.

A safetensors file is ``<u64 little-endian n><n bytes of JSON header><data>``; the header maps each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data) plus an optional
``__metadata__`` of strings. :func:`read_safetensors_header` checks everything it can without reading the
data: the length fits the file, the JSON is an object, every entry is well formed, every byte range lies
inside the data, no two ranges overlap, and a known dtype times the shape gives the range's length. Each
failure is one line naming the file (:class:`~lowbit.errors.WeightsFileError`).

>>> h = read_safetensors_header("model.safetensors")
>>> t = h.tensors["lm_head.weight"]
>>> t.dtype, t.shape, t.nbytes, torch_dtype(t.dtype)
('F32', (300, 256), 307200, torch.float32)
>>> safetensors_dtype(torch.bfloat16), dtype_name(torch.bfloat16), dtype_from_name("bfloat16")
('BF16', 'bfloat16', torch.bfloat16)
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.core.jsonio import JSONFileError, parse_json
from lowbit.errors import WeightsFileError

# safetensors dtype name -> torch dtype: the only such table in lowbit
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {dt: name for name, dt in SAFETENSORS_DTYPES.items()}
METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000  # what the safetensors library itself accepts


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``); None if unknown."""
    return SAFETENSORS_DTYPES.get(name)


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise WeightsFileError(f"{dtype} has no safetensors dtype") from None


def dtype_bits(name: str) -> int | None:
    """Bits per element of a safetensors dtype (``BOOL``: 8, as stored); None if unknown."""
    dt = SAFETENSORS_DTYPES.get(name)
    return None if dt is None else dt.itemsize * 8


def dtype_name(dtype: torch.dtype) -> str:
    """torch's own name of a dtype, as lowbit's JSON headers store it (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


_BY_NAME = {dtype_name(dt): dt for dt in SAFETENSORS_DTYPES.values()}


def dtype_from_name(name: str) -> torch.dtype | None:
    """Inverse of :func:`dtype_name` for the dtypes safetensors stores (``"float16"`` -> ``torch.float16``)."""
    return _BY_NAME.get(name) if isinstance(name, str) else None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header. ``begin``/``end``: byte offsets into the data (after the header)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in header order, the metadata, where the data starts in the file."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # 8 + header length
    data_len: int

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorEntry:
        return self.tensors[name]


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """The header of a safetensors file, validated against the file (see the module docstring).

    >>> read_safetensors_header("model.safetensors").tensors["lm_head.weight"].dtype
    'F32'
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsFileError(f"{p}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise WeightsFileError(f"{p}: truncated or corrupt safetensors header (says {n} bytes, "
                                       f"file has {size})")
            raw = f.read(n)
    except FileNotFoundError:
        raise WeightsFileError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise WeightsFileError(f"{p}: is a folder, not a safetensors file") from None
    try:
        header = parse_json(raw, p)
    except JSONFileError as e:
        raise WeightsFileError(f"{p}: corrupt safetensors header ({str(e).removeprefix(f'{p}: ')})") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{p}: corrupt safetensors header (not a JSON object)")
    meta = header.pop(METADATA_KEY, None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WeightsFileError(f"{p}: corrupt safetensors header ({METADATA_KEY} is not an object of strings)")
    data_len = size - 8 - n
    tensors = {name: _entry(p, name, info, data_len) for name, info in header.items()}
    _check_overlaps(p, tensors.values())
    return SafetensorsHeader(p, tensors, meta, 8 + n, data_len)


def _entry(p: Path, name: str, info: object, data_len: int) -> TensorEntry:
    bad = WeightsFileError(f"{p}: corrupt safetensors entry for tensor {name!r}")
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise bad
    offsets, shape = info.get("data_offsets"), info.get("shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not isinstance(shape, list):
        raise bad
    if not all(type(v) is int and v >= 0 for v in (*offsets, *shape)):  # type(): JSON true is no size
        raise bad
    t = TensorEntry(name, info["dtype"], tuple(shape), offsets[0], offsets[1])
    if t.end < t.begin:
        raise WeightsFileError(f"{p}: corrupt safetensors entry for tensor {name!r} (bytes {t.begin}..{t.end})")
    if t.end > data_len:
        raise WeightsFileError(f"{p}: tensor {name!r} is truncated (needs byte {t.end}, file has {data_len})")
    bits = dtype_bits(t.dtype)
    if bits is not None and t.numel * bits != 8 * t.nbytes:
        raise WeightsFileError(f"{p}: tensor {name!r} has {t.nbytes} bytes, but {t.dtype} with shape "
                               f"{list(t.shape)} needs {t.numel * bits // 8}")
    return t


def _check_overlaps(p: Path, entries) -> None:
    prev: TensorEntry | None = None
    for t in sorted((t for t in entries if t.nbytes), key=lambda t: t.begin):
        if prev is not None and t.begin < prev.end:
            raise WeightsFileError(f"{p}: tensors {prev.name!r} and {t.name!r} overlap (bytes {t.begin}..{prev.end})")
        prev = t

"""What is inside a weights file: one row per tensor (name, shape, storage format, bits per weight, bytes).

Reads headers only, never tensor data, so it is instant on multi-gigabyte files. Four kinds of input:

* a lowbit checkpoint written by :func:`lowbit.save_tensors` — format = scheme name (``int4-g128``);
* a folder holding ``model.safetensors`` (a lowbit output directory or an HF model folder; sharded
  ``*.safetensors`` are read in name order);
* plain safetensors — format = dtype name (``float32``);
* GGUF — format = GGML type name (``Q4_1``), bpw from the type's block size and block bytes.

>>> rows = inspect_path("model.gguf")
>>> rows[0]
TensorRow(name='token_embd.weight', shape=(300, 256), format='Q4_K', bpw=4.5, nbytes=43200)
>>> summarize(rows)[0]   # parameters
1137920
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.core.scheme import Scheme
from lowbit.errors import SchemeError, WeightsFileError
from lowbit.io.gguf.reader import GGUF_MAGIC, GGUFIndex, GGUFTensorInfo, read_gguf_index
from lowbit.io.safetensors_header import (
    SafetensorsHeader,
    TensorEntry,
    dtype_bits,
    dtype_name,
    read_safetensors_header,
    torch_dtype,
)

# inspect's errors are the file readers' errors: one class whichever kind of file failed
InspectError = WeightsFileError
# the GGUF index lives with the GGUF reader; these names stay importable from here
__all__ = ["GGUF_MAGIC", "GGUFIndex", "GGUFTensorInfo", "InspectError", "TensorRow", "inspect_path",
           "read_gguf_index", "summarize"]


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

    >>> [r.format for r in inspect_path("out/model.safetensors")][:2]   # in name order: lm_head (int8), the layers
    ['int8', 'int4-g128']
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


def _gguf_rows(p: Path) -> list[TensorRow]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    rows = []
    for t in read_gguf_index(p).tensors:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
        rows.append(TensorRow(t.name, t.shape, t.type_name, 8 * block_bytes / block, t.nbytes))
    return rows

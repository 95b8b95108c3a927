"""The lowbit tensor checkpoint: safetensors + a JSON header in its metadata.

Each QTensor ``name`` is stored as ``name.codes`` / ``name.scales`` / ``name.zeros``; a plain tensor
as ``name``. The safetensors metadata holds one key, ``lowbit``, a JSON document::

    {"format": "lowbit", "version": 1,
     "tensors": {"w": {"kind": "qtensor", "shape": [..], "dtype": "float32", "scheme": {..},
                       "crc32": {"codes": .., "scales": ..}}}}

Loading validates the version, every part's byte size against its scheme, and a CRC32 of every
part, so a truncated or tampered file is rejected with an error naming the tensor. No pickle.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.core.jsonio import JSONFileError, field, parse_json
from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme
from lowbit.errors import CheckpointError, LowbitError, WeightsFileError
from lowbit.io.atomic import atomic_file
from lowbit.io.safetensors_header import (
    SafetensorsHeader,
    dtype_from_name,
    dtype_name,
    read_safetensors_header,
    torch_dtype,
)

CHECKPOINT_VERSION = 1
PARTS = ("codes", "scales", "zeros")


# what a part's checksum covers: its dtype and shape as the safetensors header states them, then its bytes; a
# file without this marker (written before lowbit 0.1.1) has checksums of the bytes only
CHECKSUM = "crc32:dtype,shape,bytes"


def _crc(t: torch.Tensor, header: bool = True) -> int:
    start = zlib.crc32(f"{dtype_name(t.dtype)}:{list(t.shape)}".encode()) if header else 0
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), start)


def save_tensors(path: str | os.PathLike, tensors: dict[str, QTensor | torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> None:
    """Write ``{name: QTensor | Tensor}`` to ``path`` atomically (temporary file, then rename). Tensors on any
    device are written from CPU copies, so the file does not depend on where the model ran.

    >>> q = quantize_tensor(torch.randn(64, 64), "int4-g32")
    >>> save_tensors("w.safetensors", {"w": q, "bias": torch.zeros(64)})
    >>> back = load_tensors("w.safetensors")
    >>> torch.equal(back["w"].codes, q.codes), back["w"].scheme == q.scheme, back["bias"].shape
    (True, True, torch.Size([64]))
    """
    flat: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {}
    for name, t in tensors.items():
        if any(name.endswith(f".{p}") for p in PARTS):
            raise LowbitError(f"tensor name {name!r} ends in a reserved suffix ({', '.join(PARTS)})")
        if isinstance(t, QTensor):
            entry: dict[str, Any] = {
                "kind": "qtensor", "shape": list(t.shape), "dtype": dtype_name(t.dtype),
                "scheme": t.scheme.to_dict(), "crc32": {},
            }
            for part in PARTS:
                v = getattr(t, part)
                if v is not None:
                    flat[f"{name}.{part}"] = v.detach().cpu().contiguous()
                    entry["crc32"][part] = _crc(flat[f"{name}.{part}"])
            header[name] = entry
        elif isinstance(t, torch.Tensor):
            flat[name] = t.detach().cpu().contiguous()
            header[name] = {"kind": "tensor", "crc32": _crc(flat[name])}
        else:
            raise LowbitError(f"tensor {name!r}: cannot save a {type(t).__name__} (QTensor or torch.Tensor)")
    doc = {"format": "lowbit", "version": CHECKPOINT_VERSION, "checksum": CHECKSUM, "tensors": header,
           "meta": metadata or {}}
    with atomic_file(path) as tmp:
        save_file(flat, str(tmp), metadata={"lowbit": json.dumps(doc)})


def _read_header(path: Path) -> SafetensorsHeader:
    """The safetensors header, validated against the file (byte ranges, overlaps, dtype × shape sizes)."""
    try:
        return read_safetensors_header(path)
    except WeightsFileError as e:
        raise CheckpointError(str(e)) from None


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, QTensor | torch.Tensor]:
    """Read a file written by :func:`save_tensors`, validating it; returns ``{name: QTensor | Tensor}``.

    Every field of the lowbit header is checked for its type, every part against its scheme (bytes and dtype)
    and its checksum (which also covers the part's dtype and shape in the safetensors header).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    header = _read_header(p)
    if "lowbit" not in header.metadata:
        raise CheckpointError(f"{p}: not a lowbit checkpoint (no 'lowbit' metadata)")
    where = f"{p}: lowbit header"
    try:
        doc = parse_json(header.metadata["lowbit"], where)
        if not isinstance(doc, dict) or doc.get("format") != "lowbit":
            raise CheckpointError(f"{p}: not a lowbit checkpoint")
        version = field(doc, "version", int, where)
        if version != CHECKPOINT_VERSION:
            raise CheckpointError(f"{p}: checkpoint version {version} is not supported (this lowbit reads "
                                  f"{CHECKPOINT_VERSION})")
        entries = field(doc, "tensors", dict, where)
        with_header = field(doc, "checksum", (str, type(None)), where, default=None) == CHECKSUM
    except JSONFileError as e:
        raise CheckpointError(str(e)) from None
    for name, t in header.tensors.items():  # safe_open would refuse these with its own message
        if torch_dtype(t.dtype) is None:
            raise CheckpointError(f"{p}: tensor {name!r} has dtype {t.dtype!r}, which no lowbit checkpoint stores")
    out: dict[str, QTensor | torch.Tensor] = {}
    try:
        f = safe_open(str(p), framework="pt", device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{p}: unreadable safetensors file ({e})") from None
    stored = set(f.keys())
    for name, entry in entries.items():
        try:
            out[name] = _load_entry(f, stored, name, entry, with_header, where)
        except JSONFileError as e:
            raise CheckpointError(str(e)) from None
        except CheckpointError as e:
            raise CheckpointError(f"{p}: {e}") from None
        except (LowbitError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{p}: tensor {name!r} is invalid ({e})") from None
    return out


def _check(f, stored: set[str], key: str, crc: int | None, tensor_name: str, with_header: bool) -> torch.Tensor:
    if key not in stored:
        raise CheckpointError(f"tensor {tensor_name!r}: part {key!r} is missing")
    t = f.get_tensor(key)
    if crc is not None and _crc(t, with_header) != crc:
        raise CheckpointError(f"tensor {tensor_name!r}: checksum mismatch in {key!r} (file corrupted or tampered)")
    return t


def _load_entry(f, stored: set[str], name: str, entry: Any, with_header: bool, where: str) -> QTensor | torch.Tensor:
    what = f"tensor {name!r}: "
    kind = field(entry, "kind", str, where, what=what)
    if kind == "tensor":
        return _check(f, stored, name, field(entry, "crc32", int, where, None, what), name, with_header)
    if kind != "qtensor":
        raise CheckpointError(f"tensor {name!r}: unknown kind {kind!r}")
    scheme = Scheme.from_dict(field(entry, "scheme", dict, where, what=what))
    shape = field(entry, "shape", list, where, what=what)
    if not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"tensor {name!r}: shape {shape} is not a list of sizes")
    dtype = dtype_from_name(field(entry, "dtype", str, where, what=what))
    if dtype is None:
        raise CheckpointError(f"tensor {name!r}: unknown dtype {entry['dtype']!r}")
    crcs = field(entry, "crc32", dict, where, {}, what)
    for part, crc in crcs.items():
        if part not in PARTS or type(crc) is not int:
            raise CheckpointError(f"tensor {name!r}: crc32 entry {part!r}: {crc!r} is not a part's checksum")
    parts = {part: _check(f, stored, f"{name}.{part}", crcs.get(part), name, with_header) if part in crcs else None
             for part in PARTS}
    q = QTensor(parts["codes"], parts["scales"], parts["zeros"], tuple(shape), dtype, scheme)
    expected = q.expected_nbytes()
    dtypes = q.expected_dtypes()
    for part, nbytes in expected.items():
        t = parts[part]
        have = 0 if t is None else t.numel() * t.element_size()
        if have != nbytes:
            raise CheckpointError(
                f"tensor {name!r}: {part} has {have} bytes, "
                f"scheme {scheme.name} with shape {list(shape)} needs {nbytes}"
            )
        if t is not None and t.dtype != dtypes[part]:  # same bytes, other numbers (a F16 -> BF16 edit)
            raise CheckpointError(f"tensor {name!r}: {part} is stored as {dtype_name(t.dtype)}, scheme "
                                  f"{scheme.name} stores {dtype_name(dtypes[part])}")
    for part in PARTS:
        if parts[part] is not None and part not in expected:
            raise CheckpointError(f"tensor {name!r}: unexpected {part} for scheme {scheme.name}")
    return q

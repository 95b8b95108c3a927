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

from lowbit.core.qtensor import QTensor
from lowbit.core.scheme import Scheme
from lowbit.errors import CheckpointError, LowbitError, WeightsFileError
from lowbit.io.atomic import atomic_file
from lowbit.io.safetensors_header import SafetensorsHeader, dtype_from_name, dtype_name, read_safetensors_header

CHECKPOINT_VERSION = 1
PARTS = ("codes", "scales", "zeros")


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


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
    doc = {"format": "lowbit", "version": CHECKPOINT_VERSION, "tensors": header, "meta": metadata or {}}
    with atomic_file(path) as tmp:
        save_file(flat, str(tmp), metadata={"lowbit": json.dumps(doc)})


def _read_header(path: Path) -> SafetensorsHeader:
    """The safetensors header, validated against the file (byte ranges, overlaps, dtype × shape sizes)."""
    try:
        return read_safetensors_header(path)
    except WeightsFileError as e:
        raise CheckpointError(str(e)) from None


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, QTensor | torch.Tensor]:
    """Read a file written by :func:`save_tensors`, validating it; returns ``{name: QTensor | Tensor}``."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    meta = _read_header(p).metadata
    if "lowbit" not in meta:
        raise CheckpointError(f"{p}: not a lowbit checkpoint (no 'lowbit' metadata)")
    try:
        doc = json.loads(meta["lowbit"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: corrupt lowbit header ({e})") from None
    if doc.get("format") != "lowbit" or not isinstance(doc.get("tensors"), dict):
        raise CheckpointError(f"{p}: not a lowbit checkpoint")
    if doc.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint version {doc.get('version')} is not supported (this lowbit reads {CHECKPOINT_VERSION})"
        )
    out: dict[str, QTensor | torch.Tensor] = {}
    try:
        f = safe_open(str(p), framework="pt", device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{p}: unreadable safetensors file ({e})") from None
    stored = set(f.keys())
    for name, entry in doc["tensors"].items():
        try:
            out[name] = _load_entry(f, stored, name, entry)
        except CheckpointError:
            raise
        except (LowbitError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{p}: tensor {name!r} is invalid ({e})") from None
    return out


def _check(f, stored: set[str], key: str, crc: int | None, tensor_name: str) -> torch.Tensor:
    if key not in stored:
        raise CheckpointError(f"tensor {tensor_name!r}: part {key!r} is missing")
    t = f.get_tensor(key)
    if crc is not None and _crc(t) != crc:
        raise CheckpointError(f"tensor {tensor_name!r}: checksum mismatch in {key!r} (file corrupted or tampered)")
    return t


def _load_entry(f, stored: set[str], name: str, entry: dict[str, Any]) -> QTensor | torch.Tensor:
    if entry.get("kind") == "tensor":
        return _check(f, stored, name, entry.get("crc32"), name)
    if entry.get("kind") != "qtensor":
        raise CheckpointError(f"tensor {name!r}: unknown kind {entry.get('kind')!r}")
    scheme = Scheme.from_dict(entry["scheme"])
    shape = tuple(int(d) for d in entry["shape"])
    dtype = dtype_from_name(entry["dtype"])
    if dtype is None:
        raise CheckpointError(f"tensor {name!r}: unknown dtype {entry['dtype']!r}")
    crcs = entry.get("crc32", {})
    parts = {part: _check(f, stored, f"{name}.{part}", crcs.get(part), name) if part in crcs else None
             for part in PARTS}
    q = QTensor(parts["codes"], parts["scales"], parts["zeros"], shape, dtype, scheme)
    for part, nbytes in q.expected_nbytes().items():
        t = parts[part]
        have = 0 if t is None else t.numel() * t.element_size()
        if have != nbytes:
            raise CheckpointError(
                f"tensor {name!r}: {part} has {have} bytes, "
                f"scheme {scheme.name} with shape {list(shape)} needs {nbytes}"
            )
    for part in PARTS:
        if parts[part] is not None and part not in q.expected_nbytes():
            raise CheckpointError(f"tensor {name!r}: unexpected {part} for scheme {scheme.name}")
    return q

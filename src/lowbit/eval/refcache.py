"""On-disk cache of a reference model's per-position predictions on a set of token windows.

Full distributions do not fit (40 windows × 512 × 49152 floats is 4 GB), so the cache keeps per window
and position: the reference's NLL of the next token (float64, exact perplexity), its argmax (exact top-1
agreement) and its ``k`` most likely tokens with their log-probs (KL over top-k + an "other" bucket, a
lower bound of the exact KL; see :func:`lowbit.eval.metrics.kl_topk`).

Files are ``<cache_dir>/reference/<key>.safetensors``; the key hashes the reference's identity (its
``name_or_path``, the names/shapes/dtypes of all parameters and buffers, a strided sample and a
checksum of every bit of each), the window tokens and ``k``. The cache directory is ``$LOWBIT_CACHE`` or
``~/.cache/lowbit``.

Size: n × (L-1) × (8 k + 12) bytes, 42 MB for 40 windows of 512 at k = 256.

>>> key = cache_key(model, windows, k=256)    # model: the reference
>>> print(load_reference(default_cache_dir(), key, windows, k=256))  # None on a miss
None
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lowbit.io.atomic import atomic_file

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass
class ReferenceEntry:
    """Reference predictions for ``n`` windows of ``L`` tokens (positions 0..L-2 predict 1..L-1)."""

    tokens: torch.Tensor  # (n, L) int64
    nll: torch.Tensor  # (n, L-1) float64
    argmax: torch.Tensor  # (n, L-1) int64
    topk_idx: torch.Tensor  # (n, L-1, k) int32
    topk_logp: torch.Tensor  # (n, L-1, k) float32


def default_cache_dir() -> Path:
    """``$LOWBIT_CACHE`` if set, else ``~/.cache/lowbit``."""
    env = os.environ.get("LOWBIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"


def model_identity(model: torch.nn.Module) -> str:
    """A hex digest naming this model's weights (name_or_path + every tensor's name, shape, dtype, a strided
    sample and a checksum of all its bits)."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    h = hashlib.sha256(f"{type(model).__name__}|{name}".encode())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for n, t in tensors:
            h.update(f"|{n}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float64).cpu()
            h.update(sample.numpy().tobytes())
            h.update(_bits_checksum(flat))
    return h.hexdigest()


def _bits_checksum(flat: torch.Tensor) -> bytes:
    """Wrapping integer sum of the raw bits: covers every element, exact, independent of thread count."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(flat.element_size())
    if ints is None:
        return b""
    acc = torch.int64 if ints is torch.int64 else torch.int32
    return flat.contiguous().view(ints).sum(dtype=acc).cpu().numpy().tobytes()


def cache_key(model: torch.nn.Module, tokens: torch.Tensor, k: int) -> str:
    """Key of one (reference model, windows, top-k) combination."""
    h = hashlib.sha256(f"lowbit-ref-v{CACHE_VERSION}|k={k}|{model_identity(model)}".encode())
    h.update(str(tuple(tokens.shape)).encode())
    h.update(tokens.to(torch.int64).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "reference" / f"{key}.safetensors"


def load_reference(cache_dir: Path, key: str, tokens: torch.Tensor, k: int) -> ReferenceEntry | None:
    """The cached entry for ``key``, or None when absent or unusable (a corrupt file is logged and ignored)."""
    p = cache_path(cache_dir, key)
    if not p.is_file():
        return None
    try:
        with safe_open(str(p), framework="pt") as f:
            t = {name: f.get_tensor(name) for name in f.keys()}
        n, L = tokens.shape
        entry = ReferenceEntry(
            t["tokens"].long(), t["nll"].to(torch.float64), t["argmax"].long(), t["topk_idx"].to(torch.int32),
            t["topk_logp"].float(),
        )
        ok = (
            torch.equal(entry.tokens, tokens.cpu().long())
            and entry.nll.shape == (n, L - 1)
            and entry.argmax.shape == (n, L - 1)
            and entry.topk_idx.shape == (n, L - 1, k)
            and entry.topk_logp.shape == (n, L - 1, k)
        )
    except (SafetensorError, OSError, KeyError, RuntimeError, ValueError) as e:
        log.warning("ignoring unreadable reference cache %s (%s)", p, e)
        return None
    if not ok:
        log.warning("ignoring reference cache %s: it does not match these windows", p)
        return None
    return entry


def save_reference(cache_dir: Path, key: str, entry: ReferenceEntry, meta: dict | None = None) -> Path | None:
    """Write ``entry`` atomically; returns the path, or None (logged) when the folder is not writable."""
    p = cache_path(cache_dir, key)
    tensors = {
        "tokens": entry.tokens.to(torch.int32).contiguous(),
        "nll": entry.nll.to(torch.float64).contiguous(),
        "argmax": entry.argmax.to(torch.int32).contiguous(),
        "topk_idx": entry.topk_idx.to(torch.int32).contiguous(),
        "topk_logp": entry.topk_logp.to(torch.float32).contiguous(),
    }
    doc = {"format": "lowbit-reference", "version": CACHE_VERSION, **(meta or {})}
    try:
        with atomic_file(p) as tmp:
            save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"lowbit": json.dumps(doc)})
    except OSError as e:
        log.warning("could not write reference cache %s (%s)", p, e)
        return None
    return p

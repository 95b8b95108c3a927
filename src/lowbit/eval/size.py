"""Bytes a model holds: quantized weights (codes + scales + zero-points) and everything else.

A module with a ``qweight`` attribute holding a :class:`~lowbit.core.qtensor.QTensor` (lowbit's QLinear,
QEmbedding) counts ``qweight.nbytes`` for its weight; every other parameter and buffer counts its own
bytes. Storage shared between tensors (tied embeddings, buffers that alias a QTensor's parts) counts once.

>>> info = model_size(torch.nn.Linear(64, 32))
>>> info.total_bytes, info.bpw_quantized
(8320, None)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lowbit.core.qtensor import QTensor


@dataclass(frozen=True)
class SizeInfo:
    """``total_bytes`` = ``quantized_bytes`` + ``float_bytes``; ``bpw_quantized`` = 8 × bytes / weights of
    the quantized tensors (None when nothing is quantized)."""

    total_bytes: int
    quantized_numel: int
    quantized_bytes: int
    bpw_quantized: float | None
    float_bytes: int
    float_numel: int = 0

    @property
    def bpw_total(self) -> float:
        """8 × all bytes / all stored values (quantized weights + float parameters and buffers)."""
        n = self.quantized_numel + self.float_numel
        return 8 * self.total_bytes / n if n else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "bpw_total": self.bpw_total}


def _storage_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's memory: (storage pointer, offset, shape) — tied tensors share it."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta / exotic tensors
        ptr = id(t)
    return ptr, t.storage_offset(), tuple(t.shape), t.dtype


def _qtensor_parts(q: QTensor) -> list[torch.Tensor]:
    return [t for t in (q.codes, q.scales, q.zeros) if t is not None]


def model_size(model: torch.nn.Module) -> SizeInfo:
    """Walk ``model``'s modules and count the bytes of quantized and float tensors (tied weights once).

    >>> lin = torch.nn.Linear(128, 64, bias=False)
    >>> lin.qweight = lowbit.quantize_tensor(lin.weight.detach(), "int4-g32")
    >>> model_size(lin).bpw_quantized
    4.625
    """
    seen: set[tuple] = set()
    q_numel = q_bytes = f_numel = f_bytes = 0
    qweight_owners: set[int] = set()
    # pass 1: QTensors, so that buffers aliasing their parts are not counted again
    for mod in model.modules():
        q = getattr(mod, "qweight", None)
        if not isinstance(q, QTensor):
            continue
        qweight_owners.add(id(mod))
        parts = _qtensor_parts(q)
        keys = {_storage_key(t) for t in parts}
        if keys <= seen:  # the same QTensor shared by two modules (tied quantized weights)
            continue
        seen |= keys
        q_numel += q.numel
        q_bytes += q.nbytes
    # pass 2: every parameter and buffer once
    for mod in model.modules():
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for name, t in tensors:
            if t is None:
                continue
            if id(mod) in qweight_owners and name == "weight":
                continue  # a float copy kept beside its QTensor is not what the model stores
            key = _storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            f_numel += t.numel()
            f_bytes += t.numel() * t.element_size()
    bpw = 8 * q_bytes / q_numel if q_numel else None
    return SizeInfo(q_bytes + f_bytes, q_numel, q_bytes, bpw, f_bytes, f_numel)

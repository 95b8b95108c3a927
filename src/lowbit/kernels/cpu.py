"""What this CPU can do fast, read once: the facts kernels declare they need."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has(*flags: str) -> bool:
    return all(f in cpu_flags() for f in flags)


def native_bf16() -> bool:
    """bf16 matrix arithmetic in hardware (AVX512-BF16 or AMX-BF16): bf16 GEMMs beat fp32 ones."""
    return has("avx512_bf16") or has("amx_bf16")

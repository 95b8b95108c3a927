"""What this CPU can do fast, read once: the facts kernels declare they need."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=4)
def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of Linux's /proc/cpuinfo (None elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo is not)."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_name() -> str:
    """This CPU's model name (the platform's processor string where /proc/cpuinfo is not)."""
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine()


def has(*flags: str) -> bool:
    return all(f in cpu_flags() for f in flags)


def native_bf16() -> bool:
    """bf16 matrix arithmetic in hardware (AVX512-BF16 or AMX-BF16): bf16 GEMMs beat fp32 ones."""
    return has("avx512_bf16") or has("amx_bf16")

"""lowbit's own C++ CPU kernels (``csrc/gemv.cpp``): built at first use, once per machine, or not at all.

The source ships in the package and is compiled with ``torch.utils.cpp_extension`` (gcc or clang, ninja)
into ``<cache>/kernels/<hash>/`` (:func:`lowbit.io.loaders.cache_dir`; the hash covers the sources, the
flags, torch's and Python's versions), so later processes only load it. Two processes building at once
each build into a temporary folder and rename the result into place: the last rename wins, both are the
same library. One build runs on any x86-64 CPU with AVX2 and FMA: the kernels are compiled for AVX2 and
for AVX512-VNNI, and each call names its path (:func:`isas` lists the ones this CPU runs, best last;
``LOWBIT_CPP_ISA=avx2`` makes :func:`best_isa` take AVX2 where AVX-512 is there too).

Before a process first loads a build on a CPU, a child process loads it and checks each path's products
against float32 (:func:`lowbit.isolate.run_isolated`: a crash there is one warning, not a dead interpreter).
On a CPU other than x86-64 with AVX2 and FMA (as /proc/cpuinfo lists them), or with
``LOWBIT_CPP_KERNELS=off``, nothing is built and nothing warns. No compiler, or a failed build or check:
one warning naming why. Either way :func:`library` is None, the C++ kernels serve nothing and torch's
kernels run.

>>> lib = library()   # doctest: +SKIP
>>> lib is None or best_isa() in isas()   # doctest: +SKIP
True
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import torch

from lowbit.kernels.base import HUGE_ACTIVATION, split_dominant

NAME = "lowbit_gemv"
SOURCES = ("gemv.cpp", "gemv_isa.h", "gemm_tiles.h", "layer.h")
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")  # fp-contract off: every path rounds the same floats
LDFLAGS = ("-fopenmp",)
ISAS = ("avx2", "avx512vnni")  # the C++ side's Isa numbers, in order
ENV = "LOWBIT_CPP_KERNELS"
MAX_TOKENS = 16  # the GEMVs take 1..16 tokens (passes of 4 over cache-sized blocks of rows)
GEMM_MIN_TOKENS = 9  # the tiled prefill GEMMs from 9: at 9..16 both serve, and the measured choice picks (at 8
# tokens the GEMV ran a 4096×4096 int4 layer in 4.8 ms, the GEMM at 9 in 12.4, float32 in 12.5: bench/RESULTS.md)
TILE_BYTES = 1 << 20  # the prefill kernels' float32 tile (rows × in × 4 bytes): half this machine's 2 MiB L2


def enabled() -> bool:
    return os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def source_dir() -> Path:
    return Path(__file__).with_name("csrc")


def build_key() -> str:
    """The hash naming this build: sources, flags, torch, Python and the machine's architecture."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (source_dir() / name).read_bytes() + b"\0")
    h.update(repr((CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:2], platform.machine())).encode())
    return h.hexdigest()[:16]


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(target: Path) -> None:
    """Compile the sources into ``target`` (a temporary build folder, renamed into place)."""
    from torch.utils import cpp_extension

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    path = os.environ.get("PATH", "")
    try:
        if shutil.which("ninja") is None:  # the `ninja` wheel's binary, in a virtual env not activated
            try:
                import ninja

                os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{path}"
            except ImportError:
                pass  # cpp_extension then says "Ninja is required …"
        cpp_extension.load(NAME, [str(source_dir() / "gemv.cpp")], extra_cflags=list(CFLAGS),
                           extra_ldflags=list(LDFLAGS), extra_include_paths=[str(source_dir())],
                           build_directory=str(tmp), verbose=False, is_python_module=True)
        built = tmp / f"{NAME}.so"
        part = tmp / f"{NAME}.so.part"
        shutil.copyfile(built, part)
        os.replace(part, target)  # atomic: a reader sees no library or a whole one
    finally:
        os.environ["PATH"] = path
        shutil.rmtree(tmp, ignore_errors=True)


def _self_check(path: str) -> list[str]:
    """Load the library at ``path`` and run each of its paths on a small product, against float32 (in a child
    process: a crash there is an error here, not a dead interpreter). Returns the paths it ran."""
    lib = _import(Path(path))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=g)
    codes = torch.randint(0, 16, (40, 128), generator=g)
    scale, minv = torch.rand(40, 2, generator=g) + 0.5, torch.randn(40, 2, generator=g)
    w4 = codes.float() * scale.repeat_interleave(64, 1) + minv.repeat_interleave(64, 1)
    w8 = torch.randint(-127, 128, (40, 128), generator=g, dtype=torch.int8)
    s8 = torch.rand(40, generator=g) + 0.5
    s16, m16 = torch.rand(40, 8, generator=g) + 0.5, torch.randn(40, 8, generator=g)
    wg = w8.float() * s16.repeat_interleave(16, 1) + m16.repeat_interleave(16, 1)
    for isa in lib.isas():
        i = ISAS.index(isa)
        y4 = lib.q4_gemv(x, pack_int4(codes), scale, minv, 64, None, HUGE_ACTIVATION, i)
        y8 = lib.q8_gemv(x, w8, s8, 64, None, HUGE_ACTIVATION, i)
        yg = lib.g8_gemv(x, w8, s16, m16, 16, None, HUGE_ACTIVATION, i)
        for y, w in ((y4, w4), (y8, w8.float() * s8[:, None]), (yg, wg)):
            ref = x @ w.T
            if not torch.allclose(y, ref, rtol=0.02, atol=0.02 * float(ref.abs().max())):
                raise ArithmeticError(f"the {isa} path computes wrong products (max error "
                                      f"{float((y - ref).abs().max()):.3g})")
    return list(lib.isas())


def _load() -> ModuleType:
    from lowbit.io.loaders import cache_dir
    from lowbit.isolate import run_isolated
    from lowbit.kernels.cpu import cpu_name

    target = cache_dir() / "kernels" / build_key() / f"{NAME}.so"
    checked = target.with_name(f"checked-{hashlib.sha256(cpu_name().encode()).hexdigest()[:12]}")
    if not target.exists():
        _build(target)
    if not checked.exists():  # first use on this CPU: run it once in a child process
        if multiprocessing.current_process().daemon:  # already one (run_isolated's): it cannot fork another
            _self_check(str(target))
        else:
            run_isolated(_self_check, str(target), what="lowbit's C++ kernels' self-check", timeout=300)
        checked.touch()
    return _import(target)


@functools.lru_cache(maxsize=1)
def library() -> ModuleType | None:
    """The compiled kernels, built at the first call on this machine; None when disabled or unavailable
    (then once a warning names why)."""
    from lowbit.kernels.cpu import has

    if not enabled() or platform.machine().lower() not in ("x86_64", "amd64") or not has("avx2", "fma"):
        return None  # off, or a CPU they do not run on (Linux x86-64 with AVX2 + FMA): nothing to warn about
    try:
        lib = _load()
    except Exception as e:  # no compiler, no ninja, a failed build or load: torch's kernels run instead
        warnings.warn(f"lowbit's C++ kernels are off: {type(e).__name__}: {str(e).strip()[:500]} "
                      f"(set {ENV}=off to silence this)", RuntimeWarning, stacklevel=2)
        return None
    if not lib.isas():
        return None  # an x86-64 CPU without AVX2 + FMA: nothing to run
    return lib


def isas() -> list[str]:
    """The instruction-set paths this CPU runs, worst first (empty without the library)."""
    lib = library()
    return [] if lib is None else list(lib.isas())


def best_isa() -> str:
    """The path the kernels take: the best this CPU runs, or ``$LOWBIT_CPP_ISA`` where it runs that one."""
    have = isas()
    want = os.environ.get("LOWBIT_CPP_ISA", "").strip().lower()
    return want if want in have else have[-1]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``(out, in)`` in [0, 15] as the C++ kernels read them ``(out, in / 2)`` uint8: per 32 columns,
    byte j holds code j in its low nibble and code j + 16 in its high one.

    >>> pack_int4(torch.arange(32).remainder(16).reshape(1, 32))[0, :3].tolist()  # (0 | 0<<4), (1 | 1<<4), …
    [0, 17, 34]
    """
    rows, cols = codes.shape
    c = codes.to(torch.uint8).reshape(rows, cols // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(rows, cols // 2).contiguous()


def tile_shape(out: int, inp: int, threads: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of the prefill kernels' float32 tiles (``q4_gemm``, ``q8_gemm``): about ``TILE_BYTES``.
    As many rows as fit with the whole row (multiples of 16, at most an equal share of ``out`` per thread)
    when that is 256 or more; else 256 rows and the columns split into equal chunks (multiples of 128, so of
    every group) that fit: sgemm repacks x's panel per call, so a tile needs many rows (measured:
    bench/RESULTS.md, "prefill GEMM").

    >>> tile_shape(576, 576, 1), tile_shape(576, 576, 2), tile_shape(1536, 1536, 1), tile_shape(4096, 11008, 1)
    ((448, 576), (288, 576), (256, 768), (256, 1024))
    """
    def ceil(a: int, b: int) -> int:
        return (a + b - 1) // b

    threads = torch.get_num_threads() if threads is None else threads
    fit = TILE_BYTES // (4 * max(1, inp)) // 16 * 16
    share = ceil(ceil(out, max(1, threads)), 16) * 16
    rows = max(16, min(fit if fit >= 256 else 256, share))
    chunks = ceil(4 * rows * inp, TILE_BYTES)
    cols = inp if chunks <= 1 else ceil(ceil(inp, chunks), 128) * 128
    return rows, min(cols, inp)


def run_tiled(x: torch.Tensor, out: int, call) -> torch.Tensor:
    """``call(x2, rows, cols)`` (a prefill kernel: float32 ``(tokens, in)`` → ``(tokens, out)``, bias included) for
    ``x`` ``(..., in)`` of any float dtype, computed in float32, returned in x's dtype and leading shape."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    y = call(x2, *tile_shape(out, x2.shape[1])).view(*x.shape[:-1], out)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def run_split(x: torch.Tensor, out: int, call, columns, bias: torch.Tensor | None) -> torch.Tensor:
    """``call(x)`` (the C++ kernel, bias included: float32 ``(..., in)`` → ``(..., out)``) in x's dtype and shape.
    ``call`` returns an empty tensor when a row holds a huge activation (``|x| > HUGE_ACTIVATION``, or inf or
    NaN): those columns are then taken apart (:func:`split_dominant`) and multiplied in float32 with the stored
    weight's ``columns(cols)`` ``(out, n)``, the rest goes through ``call`` again; a NaN left over makes the
    whole product float32 (the reference's arithmetic)."""
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    y = call(xf)  # the common case: one call
    if y.numel() == 0 and out > 0:
        x2 = xf.reshape(-1, x.shape[-1])
        rest, dominant = split_dominant(x2)
        y = call(rest.contiguous()) if dominant is not None else y
        if y.numel() == 0:  # NaN in the input
            y = x2 @ columns(torch.arange(x2.shape[1])).T
            y = y if bias is None else y + bias
        else:
            cols, values = dominant
            y = y.addmm_(values, columns(cols).T)
        y = y.view(*x.shape[:-1], out)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def affine_gemv(entry: str):
    """``gemv(state, out, cols_of)`` -> ``x -> y`` through the library's ``entry`` (``q4_gemv``, ``g8_gemv``) for
    an affine group weight's state ``(codes, scale, minv, group, bias, isa)`` (huge inputs: :func:`run_split`)."""
    def gemv(state, out: int, cols_of):
        codes, scale, minv, g, bias, isa = state
        fn = getattr(library(), entry)

        def run(x: torch.Tensor) -> torch.Tensor:
            return run_split(x, out, lambda x2: fn(x2, codes, scale, minv, g, bias, HUGE_ACTIVATION, isa), cols_of,
                             bias)

        return run

    return gemv


def affine_tiled(entry: str):
    """A prefill kernel's ``run(module, state, x)`` through the library's tiled GEMM ``entry`` (``q4_gemm``,
    ``g8_gemm``) on the same affine group state as :func:`affine_gemv`."""
    def run(m, state, x: torch.Tensor) -> torch.Tensor:
        codes, scale, minv, g, bias, _ = state
        fn = getattr(library(), entry)
        return run_tiled(x, m.out_features, lambda x2, rows, cols: fn(x2, codes, scale, minv, g, bias, rows, cols))

    return run


def fuse_affine(mods, states, name: str, gemv, columns):
    """``Kernel.fuse`` for affine group states (:func:`affine_gemv`): one GEMV over the layers' rows stacked when
    they share the group and the path, else None; ``columns(m, cols)`` a layer's float columns."""
    if len({(s[3], s[5], s[2].shape[1] == 0) for s in states}) != 1:  # one group, path, and minv or none
        return None
    return stack_states(mods, states, name, (0, 1, 2), 4, gemv, columns)


def stack_states(mods, states, name: str, rows: tuple[int, ...], bias_at: int, gemv, columns):
    """The C++ GEMV over several layers' rows at once (``Kernel.fuse`` of ``int4-cpp`` and ``int8-cpp``):
    the tensors at ``rows`` of the layers' packed ``states`` (each ``(out_i, …)``) and their biases
    (zeros where a layer has none) are concatenated along the rows, and each layer's own state in
    ``m._kernel_state[name]`` is replaced by views of its rows of those, so the stacked weight is held
    once. Returns ``gemv(stacked state, Σ out_i, cols_of)``: ``x -> cat([m(x) for m in mods], -1)``, with
    ``cols_of(cols)`` the stacked float columns (for huge activations) from ``columns(m, cols)`` per layer."""
    outs = [m.out_features for m in mods]
    stacked = list(states[0])
    for i in rows:
        stacked[i] = torch.cat([s[i] for s in states], 0)
    biases = [s[bias_at] for s in states]
    stacked[bias_at] = (None if all(b is None for b in biases) else
                        torch.cat([torch.zeros(o) if b is None else b for b, o in zip(biases, outs, strict=True)]))
    off = 0
    for m, s, o in zip(mods, states, outs, strict=True):
        own = list(s)
        for i in rows:
            own[i] = stacked[i][off:off + o]
        if s[bias_at] is not None:
            own[bias_at] = stacked[bias_at][off:off + o]
        own = tuple(own)
        for k, v in list(m._kernel_state.items()):  # kernels sharing this state (the prefill GEMMs) follow it
            if v is s:
                m._kernel_state[k] = own
        m._kernel_state[name] = own
        off += o
    run = gemv(tuple(stacked), off, lambda cols: torch.cat([columns(m, cols) for m in mods], 0))
    run.state = (name, tuple(stacked))  # what lowbit.runtime's one-call decoder layer reads (layer.h)
    return run


__all__ = ["GEMM_MIN_TOKENS", "HUGE_ACTIVATION", "MAX_TOKENS", "TILE_BYTES", "affine_gemv", "affine_tiled", "best_isa",
           "fuse_affine", "isas", "library", "pack_int4", "run_split", "run_tiled", "stack_states", "tile_shape"]

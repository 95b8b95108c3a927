"""llama.cpp itself on a GGUF file, through llama-cpp-python, each call in a child process.

llama.cpp is native code that can crash on a machine it was built wrongly for (its AMX matmul segfaults
on some Sapphire Rapids CPUs): every call here runs in :func:`lowbit.isolate.run_isolated`, so a crash is
one :class:`~lowbit.isolate.ChildFailed` error naming the file and the signal, never a dead process.

>>> lp = logprobs("model.gguf", [1, 2, 3])  # (T, vocab) float64 log-softmax
>>> lp.shape, lp.dtype
((3, 300), dtype('float64'))
>>> from lowbit.io.gguf import export_gguf
>>> _ = export_gguf(model, tok, "model-f32.gguf", "F32")
>>> quantize("model-f32.gguf", "model-q4km.gguf", "Q4_K_M")  # llama-quantize itself
>>> from lowbit.io.gguf.reader import read_gguf_index
>>> sorted({t.type_name for t in read_gguf_index("model-q4km.gguf").tensors})
['F32', 'Q4_K', 'Q5_0', 'Q6_K', 'Q8_0']
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.isolate import run_isolated

INSTALL_HINT = ("pip install llama-cpp-python (it compiles llama.cpp; on Sapphire Rapids build it with "
                "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AMX_INT8=OFF\", see README)")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise LowbitError(f"running llama.cpp needs llama-cpp-python: {INSTALL_HINT}") from e
    return llama_cpp


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _open(path: str, n_ctx: int, threads: int, f32_cache: bool, **kw):
    kv = {"type_k": 0, "type_v": 0} if f32_cache else {}  # 0 = GGML_TYPE_F32
    return _llama_cpp().Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, verbose=False, seed=0, **kv, **kw)


# -- the child-side bodies (module level, so the fork server can import them) ---------------------------
def _logprobs(path: str, ids: list[int], f32_cache: bool, threads: int) -> np.ndarray:
    llm = _open(path, max(64, len(ids) + 8), threads, f32_cache, logits_all=True)
    llm.reset()
    llm.eval(ids)
    out = _log_softmax(np.array(llm.scores[: len(ids)], dtype=np.float64))
    llm.close()
    return out


def _tokenize(path: str, text: str, add_bos: bool, special: bool) -> list[int]:
    llm = _llama_cpp().Llama(model_path=path, vocab_only=True, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=add_bos, special=special)
    llm.close()
    return ids


def _chat(path: str, messages: list[dict], max_tokens: int, threads: int) -> str:
    llm = _open(path, 512, threads, False)
    out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
    llm.close()
    return out["choices"][0]["message"]["content"]


def _quantize(src: str, dst: str, ftype: int, threads: int) -> int:
    lc = _llama_cpp()
    p = lc.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.allow_requantize = ftype, threads, True
    return lc.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))


def _quantize_rows(x: np.ndarray, ggml_type: int, row_bytes: int) -> np.ndarray:
    lc = _llama_cpp()
    lib = ctypes.CDLL(os.path.join(os.path.dirname(lc.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], row_bytes), dtype=np.uint8)
    lib.ggml_quantize_chunk(ggml_type, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    return out


# -- the public calls ---------------------------------------------------------------------------------
def logprobs(path: str | Path, ids: list[int], *, f32_cache: bool = True, threads: int = 1,
             timeout: float = 600.0) -> np.ndarray:
    """llama.cpp's next-token log-probabilities (T, vocab), float64, for token ids ``ids`` at batch 1.

    ``f32_cache``: keep the KV cache in float32 (as lowbit's torch evaluation does), not llama.cpp's f16.
    """
    return run_isolated(_logprobs, str(path), list(ids), f32_cache, threads, timeout=timeout,
                        what=f"llama.cpp evaluating {path}")


def tokenize(path: str | Path, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
    """Token ids of ``text`` as llama.cpp's tokenizer (from the file's metadata) makes them."""
    return run_isolated(_tokenize, str(path), text, add_bos, special, what=f"llama.cpp tokenizing with {path}")


def chat(path: str | Path, messages: list[dict], *, max_tokens: int = 32, threads: int = 1,
         timeout: float = 600.0) -> str:
    """Greedy chat completion in llama.cpp, with the file's own chat template."""
    return run_isolated(_chat, str(path), messages, max_tokens, threads, timeout=timeout,
                        what=f"llama.cpp chatting with {path}")


def quantize(src: str | Path, dst: str | Path, ftype: str, *, threads: int = 1, timeout: float = 600.0) -> None:
    """llama-quantize (through llama.cpp's C API) to ``ftype``: F32, F16 or a type or mix (Q8_0, Q4_K_M, …)."""
    from lowbit.io.gguf.mixes import MIXES

    if ftype not in MIXES:
        raise LowbitError(f"llama-quantize type {ftype!r}: not known (known: {', '.join(MIXES)})")
    rc = run_isolated(_quantize, str(src), str(dst), int(MIXES[ftype][1]), threads, timeout=timeout,
                      what=f"llama-quantize {src} -> {ftype}")
    if rc != 0:
        raise LowbitError(f"llama-quantize {src} -> {ftype}: failed (status {rc})")


def quantize_rows(x: np.ndarray, type_name: str) -> np.ndarray:
    """llama.cpp's own quantizer for GGML type ``type_name`` (what llama-quantize runs without an
    imatrix) on float rows ``x`` (rows, n): the raw blocks (rows, n / block × type size) as uint8."""
    import gguf

    t = gguf.GGMLQuantizationType[type_name]
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    if x.shape[1] % bs:
        raise LowbitError(f"{type_name}: rows of {x.shape[1]} do not fill blocks of {bs}")
    return run_isolated(_quantize_rows, np.asarray(x), int(t), x.shape[1] // bs * ts,
                        what=f"llama.cpp's {type_name} quantizer")


@dataclass(frozen=True)
class RuntimeCheck:
    """What llama.cpp computed on a file: tokens evaluated, perplexity of the text, a greedy continuation."""

    path: str
    tokens: int
    perplexity: float
    continuation: str

    def to_dict(self) -> dict:
        return {"path": self.path, "tokens": self.tokens, "perplexity": self.perplexity,
                "continuation": self.continuation}


CHECK_TEXT = ("The city stands on the banks of a wide river. Its old town, with narrow streets and stone houses, "
              "grew around a market square where traders met for centuries. Today the city is known for")


def _check(path: str, text: str, n_new: int, threads: int) -> tuple[int, float, str]:
    ids = _tokenize(path, text, False, False)[:400]
    llm = _open(path, len(ids) + n_new + 8, threads, False, logits_all=True)
    llm.reset()
    llm.eval(ids)
    lp = _log_softmax(np.array(llm.scores[: len(ids)], dtype=np.float64))
    nll = -float(np.mean([lp[i, ids[i + 1]] for i in range(len(ids) - 1)]))
    new = []
    for _ in range(n_new):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if tok == llm.token_eos():
            break
        new.append(tok)
        llm.eval([tok])
    cont = llm.detokenize(new).decode("utf-8", errors="replace")
    llm.close()
    return len(ids), math.exp(nll), cont


def check(path: str | Path, text: str = CHECK_TEXT, *, n_new: int = 16, threads: int = 1,
          timeout: float = 600.0) -> RuntimeCheck:
    """Load ``path`` in llama.cpp, evaluate ``text`` (perplexity) and continue it greedily by ``n_new`` tokens."""
    n, ppl, cont = run_isolated(_check, str(path), text, n_new, threads, timeout=timeout,
                                what=f"llama.cpp running {path}")
    if not math.isfinite(ppl):
        raise LowbitError(f"{path}: llama.cpp computes non-finite log-probabilities (perplexity {ppl})")
    return RuntimeCheck(str(path), n, ppl, cont)

"""``lowbit bench``: prefill and decode speed of a quantized model against float, in the same run.

For each thread count: prefill tokens/s of one forward over ``L`` tokens (batch 1, building the KV cache) for
each ``L`` in ``prefill``, and decode tokens/s (greedy, one token at a time on a KV cache of ``context``
tokens); the median of ``repeats`` runs each, after an untimed warm-up. The inputs are seeded random token
ids: speed does not depend on what the tokens say. Memory is what the model holds: parameters, buffers and
the kernels' packed weights (after the timed runs), besides the process's peak RSS.

>>> r = bench(qmodel, model, prefill=(32,), context=16, new_tokens=4, threads=(1,), repeats=1)
>>> [row.label for row in r.rows], r.rows[0].threads
(['quantized', 'float'], 1)
>>> r.decode_ratio(1) > 0 and r.prefill_ratio(1, 32) > 0
True
"""

from __future__ import annotations

import collections
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from lowbit.errors import LowbitError
from lowbit.eval.speed import _device, decode_ms_per_token, peak_rss_bytes
from lowbit.kernels.cpu import cpu_name
from lowbit.threads import torch_threads


@dataclass
class BenchRow:
    label: str
    threads: int
    prefill_tokens_per_s: dict[int, float]
    decode_tokens_per_s: float | None
    memory_bytes: int  # parameters + buffers + packed kernel weights
    kernels_decode: dict[str, int] = field(default_factory=dict)  # quantized layers per kernel at 1 token
    kernels_prefill: dict[str, int] = field(default_factory=dict)  # … at the longest prefill


@dataclass
class BenchResult:
    rows: list[BenchRow]
    context: int
    new_tokens: int
    peak_rss_bytes: int
    load_avg: float | None
    cpu: str

    def _row(self, label: str, threads: int) -> BenchRow | None:
        return next((r for r in self.rows if r.label == label and r.threads == threads), None)

    def decode_ratio(self, threads: int) -> float | None:
        """Quantized decode speed ÷ float's at ``threads`` (None without a float row)."""
        q, f = self._row("quantized", threads), self._row("float", threads)
        if q is None or f is None or not q.decode_tokens_per_s or not f.decode_tokens_per_s:
            return None
        return q.decode_tokens_per_s / f.decode_tokens_per_s

    def prefill_ratio(self, threads: int, tokens: int) -> float | None:
        q, f = self._row("quantized", threads), self._row("float", threads)
        if q is None or f is None or tokens not in q.prefill_tokens_per_s:
            return None
        return q.prefill_tokens_per_s[tokens] / f.prefill_tokens_per_s[tokens]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratios"] = {str(t): {"decode": self.decode_ratio(t),
                                **{f"prefill_{n}": self.prefill_ratio(t, n)
                                   for n in (self.rows[0].prefill_tokens_per_s if self.rows else {})}}
                       for t in sorted({r.threads for r in self.rows})}
        return d


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes the model holds: parameters and buffers (each tensor once) and the kernels' packed weights."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen and not t.is_meta:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        for state in getattr(m, "_kernel_state", {}).values():
            for t in state if isinstance(state, tuple) else (state,):
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def _kernels_used(model: torch.nn.Module) -> dict[str, int]:
    from lowbit.model.qmodules import QLinear

    c = collections.Counter(m._kernel.name for m in model.modules() if isinstance(m, QLinear) and m._kernel)
    return dict(sorted(c.items()))


@torch.inference_mode()
def _prefill_s(model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=True)
    return time.perf_counter() - t0


def _measure(model, label: str, threads: int, prefill: Sequence[int], context: int, new_tokens: int,
             repeats: int, vocab: int, seed: int) -> BenchRow:
    g = torch.Generator().manual_seed(seed)
    dev = _device(model)
    longest = max([*prefill, context])
    ids = torch.randint(0, vocab, (1, longest), generator=g).to(dev)
    rates: dict[int, float] = {}
    kp: dict[str, int] = {}
    with torch_threads(threads):
        for n in prefill:
            _prefill_s(model, ids[:, :n])  # warm-up (and the kernels' packing)
            rates[n] = n / statistics.median(_prefill_s(model, ids[:, :n]) for _ in range(repeats))
            kp = _kernels_used(model)
        prompt = ids[0, :context]
        decode_ms_per_token(model, prompt, 2)  # warm-up
        per_token = statistics.median(decode_ms_per_token(model, prompt, new_tokens) for _ in range(repeats)) / 1000
        kd = _kernels_used(model)
    return BenchRow(label, threads, rates, 1.0 / per_token, model_bytes(model), kd, kp)


def bench(model: torch.nn.Module, reference: torch.nn.Module | bool = True, *, prefill: Sequence[int] = (128, 512),
          context: int = 128, new_tokens: int = 32, threads: Sequence[int] = (1, 2), repeats: int = 3,
          seed: int = 0) -> BenchResult:
    """Time ``model`` and its float counterpart in the same run on a causal LM's prefill and decode, at each
    thread count; see the module docstring for what is measured.

    ``reference``: the float model (e.g. the one ``model`` was quantized from); True (default): a float
    twin of ``model`` (its quantized layers dequantized back into float32 ones, see
    :func:`lowbit.model.convert.float_twin`); False: time ``model`` alone."""
    if reference is True:
        from lowbit.model.convert import float_twin

        reference = float_twin(model)
    elif reference is False:
        reference = None
    if not prefill or min(prefill) < 1 or context < 1 or new_tokens < 1 or repeats < 1 or not threads:
        raise LowbitError("bench: prefill lengths, context, new tokens, repeats and threads must be positive")
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None or not hasattr(model, "generate"):
        raise LowbitError("bench: the model is not a causal language model (prefill/decode need one)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    models = [(model, "quantized")] + ([(reference, "float")] if reference is not None else [])
    states = [(m, m.training) for m, _ in models]
    rows = []
    try:
        for m, _ in models:
            m.eval()
        for t in threads:
            for m, label in models:
                rows.append(_measure(m, label, t, prefill, context, new_tokens, repeats, vocab, seed))
    finally:
        for m, was in states:
            m.train(was)
    return BenchResult(rows, context, new_tokens, peak_rss_bytes(), load, cpu_name())


def format_bench(r: BenchResult) -> str:
    """The table ``lowbit bench`` prints: one row per model and thread count, ratios to float."""
    from rich.console import Console
    from rich.table import Table

    lens = list(r.rows[0].prefill_tokens_per_s) if r.rows else []
    t = Table(box=None, pad_edge=False)
    for c in ["model", "threads", *[f"prefill {n} tok/s" for n in lens], f"decode tok/s @{r.context}", "memory MB",
              "kernels (decode / prefill)"]:
        t.add_column(c, justify="left" if c in ("model", "kernels (decode / prefill)") else "right")
    for row in r.rows:
        cells = []
        for n in lens:
            ratio = r.prefill_ratio(row.threads, n) if row.label == "quantized" else None
            cells.append(f"{row.prefill_tokens_per_s[n]:.0f}" + (f" (×{ratio:.2f})" if ratio else ""))
        dr = r.decode_ratio(row.threads) if row.label == "quantized" else None
        dec = f"{row.decode_tokens_per_s:.1f}" + (f" (×{dr:.2f})" if dr else "")
        ks = ", ".join(f"{k} {v}" for k, v in row.kernels_decode.items()) or "-"
        kp = ", ".join(f"{k} {v}" for k, v in row.kernels_prefill.items()) or "-"
        t.add_row(row.label, str(row.threads), *cells, dec, f"{row.memory_bytes / 1e6:.1f}", f"{ks} / {kp}")
    con = Console(width=200, record=True, file=open(os.devnull, "w"))
    con.print(t)
    load = f", load average {r.load_avg:.1f} before timing" if r.load_avg is not None else ""
    return (con.export_text().rstrip() + f"\n{r.cpu}; medians of runs after a warm-up; peak RSS "
            f"{r.peak_rss_bytes / 1e9:.2f} GB{load}")

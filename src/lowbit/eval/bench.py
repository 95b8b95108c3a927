"""``lowbit bench``: prefill and decode speed of a quantized model against float, in the same run.

For each thread count and runtime: prefill tokens/s of one forward over ``L`` tokens (batch 1, building the
KV cache, the next token's logits only) for each ``L`` in ``prefill``, and decode tokens/s (greedy, one token
at a time on a KV cache of ``context`` tokens); the median of ``repeats`` runs each, after an untimed
warm-up. The inputs are seeded random token ids: speed does not depend on what the tokens say. Memory is
what the model holds: parameters, buffers and the kernels' packed weights (after the timed runs), besides
the process's peak RSS.

Runtimes: ``"lowbit"`` (:class:`lowbit.runtime.Decoder`, where it runs the model) and ``"transformers"`` (the
model's own forward with its KV cache). Both models run in each, so every ratio is quantized ÷ float **in
the same runtime** (:meth:`BenchResult.decode_ratio`); :meth:`BenchResult.ratio` also divides across runtimes
(e.g. lowbit's quantized model ÷ the float model in transformers, what a user had before).

>>> r = bench(qmodel, model, prefill=(32,), context=16, new_tokens=4, threads=(1,), repeats=1)
>>> [(row.label, row.runtime) for row in r.rows], r.rows[0].threads
([('quantized', 'lowbit'), ('float', 'lowbit'), ('quantized', 'transformers'), ('float', 'transformers')], 1)
>>> r.decode_ratio(1) > 0 and r.prefill_ratio(1, 32) > 0
True
"""

from __future__ import annotations

import collections
import inspect
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.eval.speed import _device, decode_ms_per_token, peak_rss_bytes
from lowbit.kernels.cpu import cpu_name
from lowbit.runtime.decoder import Decoder, unsupported
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
    runtime: str = "transformers"  # "lowbit" (lowbit.runtime.Decoder) or "transformers" (the model's forward)


@dataclass
class BenchResult:
    rows: list[BenchRow]
    context: int
    new_tokens: int
    peak_rss_bytes: int
    load_avg: float | None
    cpu: str

    def runtimes(self) -> list[str]:
        return list(dict.fromkeys(r.runtime for r in self.rows))

    def _row(self, label: str, threads: int, runtime: str | None = None) -> BenchRow | None:
        runtime = runtime or (self.runtimes() or [None])[0]
        return next((r for r in self.rows if r.label == label and r.threads == threads and r.runtime == runtime),
                    None)

    def ratio(self, threads: int, what: str = "decode", runtime: str | None = None,
              float_runtime: str | None = None) -> float | None:
        """Quantized speed in ``runtime`` ÷ float's in ``float_runtime`` at ``threads`` (defaults: the first
        runtime measured, the same for both); ``what``: ``"decode"`` or ``"prefill_N"``. None where a row or
        figure is missing."""
        q = self._row("quantized", threads, runtime)
        f = self._row("float", threads, float_runtime or runtime)
        if q is None or f is None:
            return None
        if what == "decode":
            a, b = q.decode_tokens_per_s, f.decode_tokens_per_s
        else:
            n = int(what.removeprefix("prefill_"))
            a, b = q.prefill_tokens_per_s.get(n), f.prefill_tokens_per_s.get(n)
        return a / b if a and b else None

    def decode_ratio(self, threads: int, runtime: str | None = None) -> float | None:
        """Quantized decode speed ÷ float's at ``threads``, both in ``runtime`` (default: the first measured)."""
        return self.ratio(threads, "decode", runtime)

    def prefill_ratio(self, threads: int, tokens: int, runtime: str | None = None) -> float | None:
        return self.ratio(threads, f"prefill_{tokens}", runtime)

    def to_dict(self) -> dict:
        d = asdict(self)
        lens = list(self.rows[0].prefill_tokens_per_s) if self.rows else []
        whats = ["decode", *[f"prefill_{n}" for n in lens]]
        ths = sorted({r.threads for r in self.rows})
        # the first runtime's (lowbit's where it ran), quantized ÷ float in it; then every runtime's
        d["ratios"] = {str(t): {w: self.ratio(t, w) for w in whats} for t in ths}
        d["ratios_by_runtime"] = {str(t): {rt: {w: self.ratio(t, w, rt) for w in whats} for rt in self.runtimes()}
                                  for t in ths}
        if "lowbit" in self.runtimes() and "transformers" in self.runtimes():
            d["ratios_lowbit_vs_transformers_float"] = {
                str(t): {w: self.ratio(t, w, "lowbit", "transformers") for w in whats}
                for t in ths}
        return d


RUNTIMES = ("lowbit", "transformers")


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes the model holds: parameters and buffers (each tensor once) and the kernels' packed weights."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:  # each storage once (stacked kernel states are views of one)
        nonlocal total
        if t.is_meta:
            return
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    for m in model.modules():
        for state in getattr(m, "_kernel_state", {}).values():
            for t in state if isinstance(state, tuple) else (state,):
                if isinstance(t, torch.Tensor):
                    add(t)
    return total


def _kernels_used(model: torch.nn.Module) -> dict[str, int]:
    from lowbit.model.qmodules import QLinear

    c = collections.Counter(m._kernel.name for m in model.modules() if isinstance(m, QLinear) and m._kernel)
    return dict(sorted(c.items()))


def _keeps_last(model) -> dict:
    """``logits_to_keep=1`` where the model's forward takes it (prefill needs the next token's logits only)."""
    try:
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    except (TypeError, ValueError):
        return {}


@torch.inference_mode()
def _prefill_s(model, ids: torch.Tensor) -> float:
    extra = _keeps_last(model) if not isinstance(model, Decoder) else {}
    t0 = time.perf_counter()
    if isinstance(model, Decoder):
        model.prefill(ids)
    else:
        model(input_ids=ids, use_cache=True, **extra)
    return time.perf_counter() - t0


def _kernels_of(model) -> dict[str, int]:
    return model.kernels() if isinstance(model, Decoder) else _kernels_used(model)


def _one_round(model, ids: torch.Tensor, prefill: Sequence[int], context: int, new_tokens: int
               ) -> tuple[dict[int, float], float, dict[str, int], dict[str, int]]:
    """One timed round of a row: seconds per prefill length, ms per decoded token, the kernels each ran."""
    secs, kp = {}, {}
    for n in prefill:
        secs[n] = _prefill_s(model, ids[:, :n])
        kp = _kernels_of(model)
    ms = decode_ms_per_token(model, ids[0, :context], new_tokens)
    return secs, ms, kp, _kernels_of(model)


def _measure_all(runners: list[tuple[Any, str]], threads: int, prefill: Sequence[int], context: int,
                 new_tokens: int, repeats: int, vocab: int, seed: int) -> list[BenchRow]:
    """Rows for ``runners`` (a torch model — transformers' forward — or a :class:`~lowbit.runtime.Decoder`, with
    its label). The rounds are interleaved (round r of every row, then round r + 1), so a machine that slows
    down or speeds up mid-run moves every row alike; round 0 is the untimed warm-up (the kernels' packing)."""
    g = torch.Generator().manual_seed(seed)
    first = runners[0][0]
    dev = _device(first.model if isinstance(first, Decoder) else first)
    ids = torch.randint(0, vocab, (1, max([*prefill, context])), generator=g).to(dev)
    rounds: list[list] = [[] for _ in runners]
    with torch_threads(threads):
        for r in range(repeats + 1):
            for i, (m, _) in enumerate(runners):
                got = _one_round(m, ids, prefill, context, new_tokens if r else 2)
                if r:
                    rounds[i].append(got)
    rows = []
    for (m, label), got in zip(runners, rounds, strict=True):
        rates = {n: n / statistics.median(x[0][n] for x in got) for n in prefill}
        per_token = statistics.median(x[1] for x in got) / 1000
        torch_model = m.model if isinstance(m, Decoder) else m
        rows.append(BenchRow(label, threads, rates, 1.0 / per_token, model_bytes(torch_model), got[-1][3], got[-1][2],
                             "lowbit" if isinstance(m, Decoder) else "transformers"))
    return rows


def bench(model: torch.nn.Module, reference: torch.nn.Module | bool = True, *, prefill: Sequence[int] = (128, 512),
          context: int = 128, new_tokens: int = 32, threads: Sequence[int] = (1, 2), repeats: int = 3,
          seed: int = 0, runtimes: Sequence[str] | None = None) -> BenchResult:
    """Time ``model`` and its float counterpart in the same run on a causal LM's prefill and decode, at each
    thread count; see the module docstring for what is measured.

    ``reference``: the float model (e.g. the one ``model`` was quantized from); True (default): a float
    twin of ``model`` (its quantized layers dequantized back into float32 ones, see
    :func:`lowbit.model.convert.float_twin`); False: time ``model`` alone. ``runtimes``: any of ``"lowbit"``,
    ``"transformers"`` (default: both where lowbit's runtime runs the model, else transformers)."""
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
    runs_lowbit = unsupported(model) is None and (reference is None or unsupported(reference) is None)
    if runtimes is None:
        runtimes = ("lowbit", "transformers") if runs_lowbit else ("transformers",)
    for rt in runtimes:
        if rt not in RUNTIMES:
            raise LowbitError(f"bench: unknown runtime {rt!r} (known: {', '.join(RUNTIMES)})")
        if rt == "lowbit" and not runs_lowbit:
            why = unsupported(model) or unsupported(reference)
            raise LowbitError(f"bench: lowbit's runtime does not run this model: {why}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    models = [(model, "quantized")] + ([(reference, "float")] if reference is not None else [])
    states = [(m, m.training) for m, _ in models]
    rows = []
    try:
        for m, _ in models:
            m.eval()
        decoders = {id(m): Decoder(m) for m, _ in models} if "lowbit" in runtimes else {}
        runners = [(decoders[id(m)] if rt == "lowbit" else m, label) for rt in runtimes for m, label in models]
        for t in threads:
            rows += _measure_all(runners, t, prefill, context, new_tokens, repeats, vocab, seed)
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
    for c in ["model", "runtime", "threads", *[f"prefill {n} tok/s" for n in lens], f"decode tok/s @{r.context}",
              "memory MB", "kernels (decode / prefill)"]:
        t.add_column(c, justify="left" if c in ("model", "runtime", "kernels (decode / prefill)") else "right")
    for row in r.rows:
        cells = []
        for n in lens:
            ratio = r.prefill_ratio(row.threads, n, row.runtime) if row.label == "quantized" else None
            cells.append(f"{row.prefill_tokens_per_s[n]:.0f}" + (f" (×{ratio:.2f})" if ratio else ""))
        dr = r.decode_ratio(row.threads, row.runtime) if row.label == "quantized" else None
        dec = f"{row.decode_tokens_per_s:.1f}" + (f" (×{dr:.2f})" if dr else "")
        ks = ", ".join(f"{k} {v}" for k, v in row.kernels_decode.items()) or "-"
        kp = ", ".join(f"{k} {v}" for k, v in row.kernels_prefill.items()) or "-"
        t.add_row(row.label, row.runtime, str(row.threads), *cells, dec, f"{row.memory_bytes / 1e6:.1f}",
                  f"{ks} / {kp}")
    con = Console(width=220, record=True, file=open(os.devnull, "w"))
    con.print(t)
    lines = [con.export_text().rstrip(), "(×: quantized ÷ float in the same runtime)"]
    if "lowbit" in r.runtimes() and "transformers" in r.runtimes():
        for th in sorted({row.threads for row in r.rows}):
            parts = [f"decode ×{r.ratio(th, 'decode', 'lowbit', 'transformers') or 0:.2f}"] + [
                f"prefill {n} ×{r.ratio(th, f'prefill_{n}', 'lowbit', 'transformers') or 0:.2f}" for n in lens]
            lines.append(f"quantized in lowbit's runtime ÷ float in transformers, {th} thread(s): " + ", ".join(parts))
    load = f", load average {r.load_avg:.1f} before timing" if r.load_avg is not None else ""
    lines.append(f"{r.cpu}; medians of runs after a warm-up; peak RSS {r.peak_rss_bytes / 1e9:.2f} GB{load}")
    return "\n".join(lines)

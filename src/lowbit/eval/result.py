"""``EvalResult``: what :func:`lowbit.eval.evaluate` measured, as a plain dataclass → dict / table rows.

>>> r = EvalResult(label="m", kind="causal", n_windows=2, window_len=8, positions=14, perplexity=12.5)
>>> r.row()["ppl"]
'12.50'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.eval.size import SizeInfo
from lowbit.eval.speed import SpeedInfo

DASH = "–"


@dataclass
class WorstWindow:
    index: int  # window number in the evaluation set
    kl_mean: float  # mean KL over the window's positions
    snippet: str  # the window's first tokens, decoded

    def to_dict(self) -> dict:
        return {"index": self.index, "kl_mean": self.kl_mean, "snippet": self.snippet}


@dataclass
class EvalResult:
    """Quality, size and speed of one model. Fields that do not apply (KL without a reference, cosine for a
    causal LM) are None. ``kl_exact`` is False when KL came from the cached top-k reference (a lower bound).
    ``positions``: predicted tokens (causal) or non-padding tokens (encoder); ``n_windows`` counts sentences
    for encoders. ``forward_speedup`` / ``decode_speedup``: > 1 means faster than the reference."""

    label: str
    kind: str  # "causal" | "encoder"
    n_windows: int
    window_len: int
    positions: int
    perplexity: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    kl_exact: bool | None = None
    top1: float | None = None
    window_kl: list[float] = field(default_factory=list)
    worst: list[WorstWindow] = field(default_factory=list)
    cos_mean: float | None = None
    cos_min: float | None = None
    nn_agreement: float | None = None
    size: SizeInfo | None = None
    speed: SpeedInfo | None = None
    forward_speedup: float | None = None
    decode_speedup: float | None = None
    peak_rss_bytes: int | None = None
    elapsed_s: float | None = None
    reference: EvalResult | None = None
    kl_positions: torch.Tensor | None = field(default=None, repr=False)  # (positions,) float64, not in to_dict

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (per-position KL values left out; per-window means kept)."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if k == "kl_positions":
                continue
            if k == "worst":
                v = [w.to_dict() for w in v]
            elif isinstance(v, (SizeInfo, SpeedInfo, EvalResult)):
                v = v.to_dict()
            out[k] = v
        return out

    @property
    def delta_ppl(self) -> float | None:
        """Relative perplexity change vs the reference (0.01 = +1%)."""
        ref = self.reference
        if self.perplexity is None or ref is None or ref.perplexity is None:
            return None
        return self.perplexity / ref.perplexity - 1.0

    def row(self) -> dict[str, str]:
        """This model's formatted table cells, keyed by column name."""
        size = self.size
        bpw = None if size is None else (size.bpw_quantized if size.bpw_quantized is not None else size.bpw_total)
        cells = {"model": self.label, "size": _fmt_bytes(size.total_bytes if size else None),
                 "bpw": _fmt(bpw, "{:.2f}")}
        if self.kind == "causal":
            cells.update({
                "ppl": _fmt(self.perplexity, "{:.2f}"),
                "Δppl": _fmt(None if self.delta_ppl is None else 100 * self.delta_ppl, "{:+.2f}%"),
                "KL mean": ("" if self.kl_exact in (None, True) else "≥") + _fmt_kl(self.kl_mean),
                "KL p99": _fmt_kl(self.kl_p99),
                "top-1": _fmt(None if self.top1 is None else 100 * self.top1, "{:.1f}%"),
            })
        else:
            cells.update({
                "cos mean": _fmt(self.cos_mean, "{:.5f}"),
                "cos min": _fmt(self.cos_min, "{:.5f}"),
                "NN agree": _fmt(None if self.nn_agreement is None else 100 * self.nn_agreement, "{:.1f}%"),
            })
        cells["tok/s"] = _fmt(None if self.speed is None else self.speed.tokens_per_s, "{:.0f}")
        cells["×ref"] = _fmt(self.forward_speedup, "{:.2f}")
        if self.kind == "causal":
            cells["decode ms"] = _fmt(None if self.speed is None else self.speed.decode_ms_per_token, "{:.1f}")
            cells["decode ×ref"] = _fmt(self.decode_speedup, "{:.2f}")
        return cells

    def rows(self) -> list[dict[str, str]]:
        """The reference's row (when there is one) then this model's."""
        return ([self.reference.row()] if self.reference is not None else []) + [self.row()]

    def summary_line(self) -> str:
        """``40 windows × 512 tokens`` (causal) or ``256 sentences`` (encoder)."""
        if self.kind == "causal":
            line = f"{self.n_windows} windows × {self.window_len} tokens"
            sp = self.speed
            if sp is not None and sp.decode_runtime:
                where = "lowbit's runtime" if sp.decode_runtime == "lowbit" else "transformers"
                line += f" · speed at {sp.threads} thread(s), decode in {where}"
            return line
        return f"{self.n_windows} sentences ({self.positions} tokens)"

    def worst_line(self, n: int | None = None) -> str:
        """``<label> worst windows: #17 (KL 0.123) "…", …`` (the first ``n``), or '' when there are none."""
        if not self.worst:
            return ""
        parts = [f'#{w.index} (KL {_fmt_kl(w.kl_mean)}) "{w.snippet}"' for w in self.worst[:n]]
        return f"{self.label} worst windows: " + ", ".join(parts)


def _fmt(v: float | None, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    return spec.format(v)


def _fmt_kl(v: float | None) -> str:
    """4 decimals, or 3 significant digits below 0.001 (so a small KL never reads as 0.0000)."""
    if v is None or v == 0 or abs(v) >= 1e-3:
        return _fmt(v, "{:.4f}")
    return f"{v:.2e}"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return DASH
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"

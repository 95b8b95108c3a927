"""Mixed precision under a budget: a sensitivity table + a budget -> a Plan, as a pure function.

A budget is bits per weight (``3.5bpw``: every stored byte of the linear layers — the units, and an untied head
— over their weights, as ``QuantReport.linear_bpw`` counts them), bytes (``60MB``, ``4GB``, ``512MiB``: the whole
checkpoint, fixed layers and float tensors included) or a quality bound (``kl<=0.05``: the smallest plan whose
summed predicted ΔKL stays within it).

:func:`allocation` solves the multiple-choice knapsack exactly by dynamic programming over bytes (in bins of
1/``BINS`` of the table's byte span, each candidate's bytes rounded *up* to whole bins, so the plan never exceeds
the budget, and a larger budget never gives a higher predicted KL); greedy Δcost/Δbytes on convex hulls is the
usual approximation of this, the DP is as cheap here (a few hundred units × a few candidates).

>>> parse_budget("3.5bpw"), parse_budget("60MB").value, parse_budget("kl<=0.05").kind
(Budget(kind='bpw', value=3.5, text='3.5bpw'), 60000000.0, 'kl')
>>> from lowbit.model.sensitivity import measure_sensitivity
>>> table = measure_sensitivity(model, windows, method="gptq", schemes=("int8", "int4-g64", "int2-g64"))
>>> a = allocation(table, parse_budget("4.5bpw"))
>>> a.linear_bpw <= 4.5, a.plan.rules[0].pattern, sorted(set(a.choices))
(True, '*', ['int2-g64', 'int4-g64'])
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.errors import LowbitError
from lowbit.methods.registry import MethodConfig
from lowbit.model.plan import Plan, Rule
from lowbit.model.sensitivity_table import SensitivityTable

BINS = 100_000
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_NUM = r"([0-9]+(?:\.[0-9]*)?(?:e-?[0-9]+)?|\.[0-9]+(?:e-?[0-9]+)?)"


@dataclass(frozen=True)
class Budget:
    kind: str  # "bpw" | "bytes" | "kl"
    value: float
    text: str


def parse_budget(text: str) -> Budget:
    """``3.5bpw`` / ``60MB`` / ``4GB`` / ``512MiB`` / ``kl<=0.05`` as a Budget; anything else is one error."""
    t = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(_NUM + r"bpw", t)
    if m and float(m.group(1)) > 0:
        return Budget("bpw", float(m.group(1)), text)
    m = re.fullmatch(_NUM + r"(b|kb|mb|gb|tb|kib|mib|gib|tib)", t)
    if m and float(m.group(1)) > 0:
        return Budget("bytes", float(m.group(1)) * _UNITS[m.group(2)], text)
    m = re.fullmatch(r"kl<=?" + _NUM, t)
    if m and float(m.group(1)) >= 0:
        return Budget("kl", float(m.group(1)), text)
    raise LowbitError(f"--budget {text!r}: expected bits per weight (3.5bpw), bytes (60MB, 4GB, 512MiB) or a "
                      f"bound on the predicted KL (kl<=0.05)")


def parse_schemes(text: str | None, option: str = "--schemes") -> list[str] | None:
    """``int8,int4-g64`` as a list of scheme names (None when not given); a bad name is one error."""
    from lowbit.core.scheme import parse_scheme

    if not text:
        return None
    names = [t.strip() for t in text.replace(" ", ",").split(",") if t.strip()]
    try:
        return [parse_scheme(n).name for n in names]
    except LowbitError as e:
        raise LowbitError(f"{option}: {e}") from None


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate per unit, the Plan, and what it promises (bytes of the checkpoint, linear bpw,
    predicted KL)."""

    budget: Budget
    choices: tuple[str, ...]  # candidate per unit, in table order
    plan: Plan
    bytes: int
    linear_bpw: float
    kl: float

    def summary(self) -> dict[str, Any]:
        """What the plan JSON carries beside its rules (ignored when the plan is read back)."""
        return {"budget": self.budget.text, "promised_bytes": self.bytes, "promised_linear_bpw": self.linear_bpw,
                "predicted_kl": self.kl, "units": dict(Counter(self.choices))}


def _options(table: SensitivityTable) -> list[list[tuple[str, int, float]]]:
    """Per unit, its candidates (name, bytes, kl) by bytes, without dominated ones (more bytes, no less KL)."""
    out = []
    for u in table.units:
        if not u.costs:
            raise LowbitError(f"sensitivity table: no candidate scheme fits unit {', '.join(u.layers)}")
        opts = sorted(((k, c.bytes, c.kl) for k, c in u.costs.items()), key=lambda o: (o[1], o[2]))
        kept: list[tuple[str, int, float]] = []
        for o in opts:
            if not kept or o[2] < kept[-1][2]:
                kept.append(o)
        out.append(kept)
    return out


def _figures(table: SensitivityTable, unit_bytes: float) -> tuple[float, float]:
    """(checkpoint bytes, linear bpw) of a plan whose units take ``unit_bytes``."""
    lw, lb = table.fixed_linear
    return table.fixed_bytes + unit_bytes, 8 * (unit_bytes + lb) / max(table.unit_weights + lw, 1)


def _cap(table: SensitivityTable, budget: Budget) -> float:
    """The bytes the units may take under a bpw or bytes budget."""
    if budget.kind == "bpw":
        lw, lb = table.fixed_linear
        return math.floor(budget.value * (table.unit_weights + lw) / 8) - lb
    return math.floor(budget.value) - table.fixed_bytes


def _dp(opts: list[list[tuple[str, int, float]]], cap_bins: int, cost: list[list[int]]
        ) -> tuple[np.ndarray, list[np.ndarray]]:
    """dp[c] = least summed KL with extra cost ≤ c bins; one argmin array per unit for the way back."""
    dp = np.zeros(cap_bins + 1)
    args = []
    for u, ks in enumerate(opts):
        new = np.full(cap_bins + 1, np.inf)
        arg = np.zeros(cap_bins + 1, dtype=np.int16)
        for k, (_, _, kl) in enumerate(ks):
            c = cost[u][k]
            if c > cap_bins:
                continue
            cand = np.full(cap_bins + 1, np.inf)
            cand[c:] = dp[: cap_bins + 1 - c] + kl
            better = cand < new
            new[better], arg[better] = cand[better], k
        dp = new
        args.append(arg)
    return dp, args


def allocation(table: SensitivityTable, budget: Budget, bins: int = BINS) -> Allocation:
    """The least-predicted-KL choice per unit within a bpw/bytes ``budget`` (the fewest bytes within a KL
    bound), and its Plan; an infeasible budget is one error naming the figure these candidates can reach."""
    opts = _options(table)
    lo = [ks[0][1] for ks in opts]
    span = sum(ks[-1][1] for ks in opts) - sum(lo)
    step = max(1, math.ceil(span / bins))
    cost = [[math.ceil((b - lo[u]) / step) for _, b, _ in ks] for u, ks in enumerate(opts)]
    if budget.kind == "kl":
        dp, args = _dp(opts, sum(c[-1] for c in cost), cost)
        if dp[-1] > budget.value:
            raise LowbitError(f"--budget {budget.text}: these candidates reach a predicted KL of {dp[-1]:.4g} at "
                              f"best (every unit at its widest); raise the bound or add a wider --schemes candidate")
        c = int(np.argmax(dp <= budget.value))
    else:
        room = _cap(table, budget) - sum(lo)
        if room < 0:
            b, bpw = _figures(table, sum(lo))
            least = f"{bpw:.3f}bpw" if budget.kind == "bpw" else f"{b / 1e6:.2f}MB ({b} bytes)"
            raise LowbitError(f"--budget {budget.text}: the smallest plan these candidates allow is {least} "
                              f"(every unit at its narrowest); raise the budget or add a narrower --schemes "
                              f"candidate")
        c = min(int(room // step), sum(cs[-1] for cs in cost))
        dp, args = _dp(opts, c, cost)
    picks = [0] * len(opts)
    for u in range(len(opts) - 1, -1, -1):
        picks[u] = int(args[u][c])
        c -= cost[u][picks[u]]
    chosen = [opts[u][k] for u, k in enumerate(picks)]
    unit_bytes = sum(o[1] for o in chosen)
    total, bpw = _figures(table, unit_bytes)
    names = tuple(o[0] for o in chosen)
    return Allocation(budget, names, budget_plan(table, names), int(total), bpw, float(sum(o[2] for o in chosen)))


def allocate(table: SensitivityTable, budget: Budget | str) -> Plan:
    """The Plan of :func:`allocation` (``budget`` a Budget or its text)."""
    return allocation(table, budget if isinstance(budget, Budget) else parse_budget(budget)).plan


def budget_plan(table: SensitivityTable, choices: tuple[str, ...]) -> Plan:
    """``*`` at the scheme holding most weights, one exact-name rule per layer that differs (at the type a GGML
    candidate falls back to on that layer, so the plan says what is stored), then the fixed layers (embeddings,
    head) at their schemes by RTN: a Plan that reads and edits by hand."""
    per_layer: dict[str, str] = {}
    weight = Counter[str]()
    for u, c in zip(table.units, choices, strict=True):
        schemes = u.costs[c].schemes or (c,) * len(u.layers)
        for n, s in zip(u.layers, schemes, strict=True):
            per_layer[n] = s
            weight[s] += u.weights / len(u.layers)
    base = weight.most_common(1)[0][0] if weight else "int8"
    rules = [Rule("*", base, table.method, table.config, kind="linear")]
    rules += [Rule(n, s, table.method, table.config) for n, s in per_layer.items() if s != base]
    for n, s in table.fixed.items():
        rules.append(Rule(n, s, "rtn", MethodConfig()) if s is not None else Rule(n, None))
    return Plan(tuple(rules))

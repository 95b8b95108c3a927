"""``--budget`` on ``quantize``, ``plan`` and the exporters that quantize first: check the flags before the model
loads, then measure (or reuse) the sensitivity table and allocate the schemes (:func:`lowbit.plan_budget`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lowbit
from lowbit.errors import LowbitError
from lowbit.model.budget import Allocation, parse_budget
from lowbit.model.budget import parse_schemes as schemes_of

BUDGET_HELP = ("mixed precision under a budget: bits per weight of the linear layers (3.5bpw), bytes of the whole "
               "checkpoint (60MB, 4GB) or a bound on the predicted KL (kl<=0.05); each unit of layers (q/k/v, o, "
               "gate/up, down of a block) gets the candidate that costs least predicted KL (needs --calib)")


def add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", help=BUDGET_HELP)
    p.add_argument("--table", metavar="FILE", help="sensitivity table JSON for --budget: read when it exists "
                   "(for this model and method), else measured and written there")
    p.add_argument("--schemes", metavar="A,B,...", help="--budget's candidate schemes, comma-separated (default "
                   "int8,int6,int5,int4-g128,int4-g64,int3-g64,int2-g64)")


def check_budget_args(args: argparse.Namespace) -> None:
    """Everything about --budget that can be checked before the model loads."""
    if not getattr(args, "budget", None):
        if getattr(args, "table", None) or getattr(args, "schemes", None):
            raise LowbitError("--table / --schemes choose --budget's candidates: pass --budget too (e.g. 3.5bpw)")
        return
    parse_budget(args.budget)
    schemes_of(args.schemes)
    if getattr(args, "plan", None):
        raise LowbitError("--budget and --plan both choose the layers' schemes: pass one of them")
    if not args.calib and not (args.table and Path(args.table).is_file()):
        raise LowbitError("--budget needs calibration text to measure each layer's sensitivity: pass --calib FILE "
                          "(or --table FILE with a measured table)")
    if args.table and Path(args.table).is_dir():
        raise LowbitError(f"--table {args.table}: a folder, not a table file")


def budget_allocation(args: argparse.Namespace, model: Any, tok: Any, table: str | None = None,
                      err: Any = None) -> Allocation | None:
    """The allocation ``--budget`` asks for (None without one), its table read from / written to ``--table``
    (else ``table``); one summary line on ``err``."""
    if not getattr(args, "budget", None):
        return None
    from lowbit.api import budget_candidates, check_budget
    from lowbit.cli.commands import _config

    path = args.table or table
    reuse = bool(path and Path(path).is_file())
    cands = budget_candidates(schemes_of(args.schemes))
    if not reuse:
        check_budget(model, args.budget, args.method, cands)  # an unreachable budget fails before the measurement
    if err is not None and reuse:
        err.print(f"sensitivity   reusing {path}")
    elif err is not None:
        err.print(f"sensitivity   measuring {len(cands)} candidate schemes per unit of layers on "
                  f"{args.calib_windows} windows × {args.window_len} tokens of {args.calib}")

    a = lowbit.plan_budget(model, tok, args.budget, args.calib, method=args.method, config=_config(args),
                           schemes=schemes_of(args.schemes), windows=args.calib_windows, window_len=args.window_len,
                           table=path, progress=None if not getattr(args, "json", False) else False)
    if err is not None:
        err.print(budget_line(a) + (f"; table {path}" if path else ""), markup=False)
    return a


def budget_line(a: Allocation) -> str:
    """``budget 3.5bpw → 3.498 bpw, 71.20 MB, predicted KL 0.0912 (int4-g64 ×80, int3-g64 ×40 …)``."""
    counts = ", ".join(f"{k} ×{v}" for k, v in sorted(a.summary()["units"].items(), key=lambda kv: -kv[1]))
    return (f"budget {a.budget.text} → {a.linear_bpw:.3f} bpw in linear layers, {a.bytes / 1e6:.2f} MB of "
            f"weights, predicted KL {a.kl:.4g} (units: {counts})")

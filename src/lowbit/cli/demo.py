"""``lowbit demo``: the main job on the embedded default model and text, start to finish."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.save import is_lowbit_dir
from lowbit.methods.registry import MethodConfig, method_names


def best_method() -> str:
    """The best calibrated method this install has."""
    for m in ("gptq", "rtn"):
        if m in method_names():
            return m
    return "rtn"


def generate(model, tok, prompt: str, max_new_tokens: int = 40) -> str:
    """The greedy answer to ``prompt`` (through the chat template when the tokenizer has one)."""
    from lowbit.eval.tasks import greedy

    return tok.decode(greedy(model, tok, prompt, max_new_tokens), skip_special_tokens=True).strip()


def _texts(args: argparse.Namespace) -> tuple[str, str, str]:
    from lowbit.eval import read_text

    if args.calib and args.data:
        if Path(args.calib).resolve() == Path(args.data).resolve():
            raise LowbitError("--calib and --data are the same file: evaluate on text the model was not calibrated on")
        return read_text(args.calib), read_text(args.data), f"{args.calib} / {args.data}"
    from lowbit.cli.assets import demo_texts

    calib, held = demo_texts()
    calib = read_text(args.calib) if args.calib else calib
    held = read_text(args.data) if args.data else held
    return calib, held, "Wikipedia articles from gensim's test data (calibration and evaluation disjoint)"


def run_demo(args: argparse.Namespace, out: Console, err: Console) -> dict[str, Any] | None:
    from lowbit.eval import format_table

    t0 = time.perf_counter()
    method = args.method or best_method()
    lowbit.parse_scheme(args.scheme)
    dest = Path(args.out)
    if dest.exists() and not is_lowbit_dir(dest):
        raise LowbitError(f"{dest}: exists and is not a lowbit model directory; choose another -o")
    if args.model:
        source = args.model
    else:
        from lowbit.cli.assets import smollm2_gguf

        source = str(smollm2_gguf())
    err.print(f"model         {source}")
    model, tok = lowbit.load(source)
    if tok is None:
        raise LowbitError(f"{source}: no tokenizer found")
    calib, held, what = _texts(args)
    err.print(f"text          {what}")
    err.print(f"quantizing    {args.scheme} with {method}, "
              f"{args.calib_windows} calibration windows × {args.window_len}")
    config = MethodConfig(observer="mse") if method == "rtn" else MethodConfig()
    qmodel, report = lowbit.quantize(model, tok, scheme=args.scheme, method=method, calib=calib,
                                     windows=args.calib_windows, window_len=args.window_len, config=config)
    saved = lowbit.save(qmodel, dest, tokenizer=tok, plan=qmodel.lowbit_plan, report=report, force=dest.exists())
    err.print(f"evaluating    {args.windows} held-out windows × {args.window_len} tokens, against the float model")
    res = lowbit.evaluate(qmodel, reference=model, tokenizer=tok, text=held, windows=args.windows,
                          window_len=args.window_len, label=f"{args.scheme} {method}")
    answer_ref = generate(model, tok, args.prompt)
    answer_q = generate(qmodel, tok, args.prompt)
    doc = {"model": source, "scheme": args.scheme, "method": method, "quantize_seconds": report.seconds,
           "eval": res.to_dict(), "prompt": args.prompt, "answer_float": answer_ref, "answer_quantized": answer_q,
           "saved": str(saved), "seconds": time.perf_counter() - t0}
    if args.json:
        return doc
    out.print(format_table([res], worst=False))
    out.print(f"\nprompt: {args.prompt}")
    out.print(f"  float32   : {answer_ref}")
    out.print(f"  {args.scheme:<10}: {answer_q}")
    out.print(f"\nquantized in {report.seconds:.0f} s · saved {saved} "
              f"({sum(f.stat().st_size for f in saved.iterdir()) / 1e6:.1f} MB) · total {doc['seconds']:.0f} s")
    out.print("your own model and text: lowbit demo --model DIR_OR_GGUF --calib calib.txt --data held_out.txt")
    return None

"""The CLI verbs. Each returns a JSON-able dict (printed with --json) and prints its tables otherwise."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import lowbit
from lowbit.api import scheme_plan
from lowbit.cli.budget import budget_allocation, check_budget_args
from lowbit.errors import LowbitError
from lowbit.io.exporters import Exporter, ExportOptions
from lowbit.methods.registry import MethodConfig, method_spec
from lowbit.model.device import parse_device
from lowbit.model.plan import Plan
from lowbit.model.quantize import QuantReport
from lowbit.threads import torch_threads

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _whole_model_method(args: argparse.Namespace) -> bool:
    """The method needs the whole float model in memory at once (qat's end-to-end step, ``--option steps=N``)."""
    from lowbit.methods.registry import method_spec

    steps = _config(args).options.get("steps", 0)
    return bool(args.method) and method_spec(args.method).trains and isinstance(steps, int) and steps > 0


def _config(args: argparse.Namespace) -> MethodConfig:
    from lowbit.methods.registry import option_items

    options: dict[str, Any] = option_items(list(getattr(args, "option", [])))
    if getattr(args, "act", None):
        options["act"] = args.act
    if getattr(args, "act_observer", None):
        options["act_observer"] = args.act_observer
    if getattr(args, "alpha", None) is not None:
        if not 0.0 <= args.alpha <= 1.0:
            raise LowbitError(f"--alpha {args.alpha}: the migration strength must lie in [0, 1]")
        options["alpha"] = args.alpha
    return MethodConfig(observer=args.observer, importance=args.importance, options=options)


def _plan(args: argparse.Namespace, model) -> Plan | None:
    return Plan.from_json(args.plan) if args.plan else None


def _check_out(path: str, force: bool, source: str) -> None:
    o, s = Path(path).resolve(), Path(source).resolve()
    if o == s or s.is_relative_to(o):
        raise LowbitError(f"{path}: the output would overwrite the source model; choose another -o")
    if o.exists() and not force:
        raise LowbitError(f"{path}: already exists (pass --force to replace it)")
    for parent in o.parents:  # the first existing folder above the output must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise LowbitError(f"{path}: {parent} is a file, not a folder; choose another -o")
            break


def _needs_calib(args: argparse.Namespace) -> str | None:
    """What asks for calibration text, as the error names it; None when nothing does."""
    spec = method_spec(args.method)
    if spec.needs or spec.transform:
        return f"--method {args.method}"
    if args.importance:
        return "--importance"
    # From the built options: `--act int8-static` and `--option act=int8-static` are the same request.
    return "--act int8-static" if _config(args).options.get("act") == "int8-static" else None


def layer_table(report: QuantReport, limit: int = 12) -> Table:
    t = Table(title=None, box=None, pad_edge=False)
    for c in ("layer", "scheme", "method", "bpw", "rel. error", "loss", "note"):
        t.add_column(c, justify="right" if c in ("bpw", "rel. error", "loss") else "left")
    rows = report.layers
    shown = rows if len(rows) <= limit else rows[: limit // 2] + rows[-limit // 2 :]
    for i, r in enumerate(shown):
        if len(rows) > limit and i == limit // 2:
            t.add_row(f"… {len(rows) - limit} more layers", "", "", "", "", "", "")
        t.add_row(r.name, r.scheme, r.method, f"{r.bpw:.2f}", f"{r.rel_error:.4f}",
                  "" if r.loss is None else f"{r.loss:.3g}", r.note)
    return t


def _validate(args: argparse.Namespace, calibrated: bool = True) -> None:
    """Everything that can be checked before the (slow) model load."""
    from lowbit.io.gguf.mixes import is_mix
    from lowbit.methods.registry import get_method
    from lowbit.primitives.observers import get_observer

    if not is_mix(args.scheme):
        lowbit.parse_scheme(args.scheme)
    get_method(args.method)
    get_observer(args.observer)
    if args.plan:
        Plan.from_json(args.plan)
    Plan.default(args.scheme if not is_mix(args.scheme) else "int8").with_rules(args.rule, args.keep)
    if getattr(args, "act_observer", None) == "mse":
        raise LowbitError("--act-observer mse: a transformer's static activations take minmax, percentile or entropy "
                          "(mse is for the full-integer vision path)")
    method_spec(args.method).parse(_config(args))  # `--option damp=abc`: one line naming the option, before the load
    check_budget_args(args)
    why = _needs_calib(args)
    if why and not args.calib and calibrated:
        raise LowbitError(f"{why} needs calibration text: pass --calib FILE (or --calib random: statistics from "
                          f"random tokens, no data)")
    _check_calib(args)


def _check_calib(args: argparse.Namespace) -> None:
    """Read the calibration file once up front, so a bad path fails before the model loads."""
    from lowbit.eval.windows import is_random_calib, read_text

    if args.calib and not is_random_calib(args.calib):
        read_text(args.calib)


def resume_folder(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its block checkpoints: beside it, hidden, removed once ``out`` is written."""
    from lowbit.model.resume import folder_beside

    return folder_beside(out)


def _say_resuming(args: argparse.Namespace, resume: Path | None) -> None:
    done = [] if resume is None else list(resume.glob("block-*.json"))
    if done and not args.json:
        assert resume is not None
        e2e = " and the checkpointed end-to-end step" if (resume / "e2e.safetensors").exists() else ""
        err.print(f"resuming      {len(done)} finished block(s){e2e} in {resume} (restored if this is the same job)")


def _quantize(args: argparse.Namespace, model, tok, plan: Plan | None = None,
              resume: Path | None = None) -> tuple[Any, QuantReport]:
    if args.calib and not args.json:
        err.print(f"calibration   {args.calib_windows} windows × {args.window_len} tokens from {args.calib}")
    _say_resuming(args, resume)
    return lowbit.quantize(model, tok, scheme=args.scheme, method=args.method, calib=args.calib,
                           windows=args.calib_windows, window_len=args.window_len, plan=plan or _plan(args, model),
                           rules=args.rule, keep=args.keep, config=_config(args), inplace=True,
                           progress=None if not args.json else False, device=parse_device(args.device),
                           resume_dir=resume)


def _warn_unmatched(args: argparse.Namespace, model) -> None:
    """A --rule / --keep pattern that matches no layer is likely a typo: say so (the plan verb does too)."""
    given = Plan(()).with_rules(args.rule, args.keep)
    for pat in given.unmatched_patterns(model):
        err.print(f"[yellow]warning[/]: rule pattern {pat!r} matches no layer")


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any] | None:
    parse_device(args.device)  # before anything is loaded or written
    _validate(args)
    _check_out(args.out, args.force, args.source)
    t0 = time.perf_counter()
    # blocks are read one at a time as quantization reaches them; a budget's sensitivity needs the whole model
    if args.threads is not None and args.threads < 1:
        raise LowbitError(f"--threads {args.threads}: must be at least 1")
    model, tok = lowbit.load(args.source, lazy=not (args.budget or _whole_model_method(args)))
    with torch_threads(args.threads):
        alloc = budget_allocation(args, model, tok, err=None if args.json else err)
        resume = resume_folder(args.out) if args.calib else None
        qmodel, report = _quantize(args, model, tok, None if alloc is None else alloc.plan, resume)
    _warn_unmatched(args, qmodel)
    saved = lowbit.save(qmodel, args.out, tokenizer=tok, plan=qmodel.lowbit_plan, report=report, force=args.force)
    if resume is not None:
        shutil.rmtree(resume, ignore_errors=True)  # the output is written: nothing left to resume
    size = sum(f.stat().st_size for f in saved.iterdir())
    result = {"out": str(saved), "bytes_on_disk": size, "bpw": report.linear_bpw, "bpw_with_embeddings": report.bpw,
              "seconds": time.perf_counter() - t0,
              "report": report.to_dict()}
    if alloc is not None:
        result["budget"] = alloc.summary()
    if args.json:
        return result
    out.print(layer_table(report))
    for w in report.warnings:
        out.print(f"[yellow]warning[/]: {w}")
    for n in report.notes:
        out.print(n)
    if report.kept:
        out.print(f"kept in float: {', '.join(report.kept[:8])}{' …' if len(report.kept) > 8 else ''}")
    out.print(f"saved {saved} ({_mb(size)}; {report.linear_bpw:.2f} bpw in linear layers, {report.bpw:.2f} "
              f"with embeddings; plan in {saved / 'quantization.json'})")
    out.print(f"next: lowbit eval {saved} --reference {args.source} --data held_out.txt")
    return None


def cmd_eval(args: argparse.Namespace) -> dict[str, Any] | None:
    from lowbit.eval import format_table, read_text, write_report
    from lowbit.eval.generations import compare_generations, format_generations, read_prompts
    from lowbit.eval.tasks import TaskOptions, eval_tasks, format_tasks, load_task

    if args.images:
        from lowbit.cli.vision import eval_vision

        return eval_vision(args, out)
    device = parse_device(args.device)
    if not (args.data or args.task or args.generate):
        raise LowbitError("eval: nothing to evaluate on: pass --data FILE, --task FILE.jsonl, --generate PROMPTS or "
                          "--images DIR")
    text = read_text(args.data) if args.data else None
    tasks = [load_task(t) for t in args.task]  # every file checked before any model loads
    prompts = read_prompts(args.generate) if args.generate else None
    if prompts is not None and not args.reference:
        raise LowbitError("--generate compares two models: pass --reference FLOAT_MODEL")
    model, tok = lowbit.load(args.model)
    reference = None
    if args.reference:
        reference, rtok = lowbit.load(args.reference)
        tok = tok or rtok
    if tok is None:
        raise LowbitError(f"{args.model}: no tokenizer found (and no --reference to take one from)")
    label = Path(args.model).name
    for m in (model, reference):
        if m is not None and device is not None:
            m.to(device)
    show = None if not args.json else False
    doc: dict[str, Any] = {}
    res = None
    if text is not None:
        res = lowbit.evaluate(model, reference=reference, tokenizer=tok, text=text, windows=args.windows,
                              window_len=args.window_len, speed=not args.no_speed, label=label,
                              worst=max(args.show_worst, 2), progress=show, kernels=_kernel_mode(args.kernels))
        doc = res.to_dict()
    chat = False if args.no_chat_template else None
    opts = TaskOptions(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, chat=chat, match=args.match,
                       kernels=_kernel_mode(args.kernels), progress=not args.json and sys.stderr.isatty())
    task_results = eval_tasks(model, reference, tok, tasks, opts, label=label) if tasks else []
    gens = None if prompts is None else compare_generations(model, reference, tok, prompts, args.max_new_tokens, chat,
                                                            opts.kernels, opts.progress)
    if task_results:
        doc["tasks"] = [r.to_dict() for r in task_results]
    if gens is not None:
        doc["generations"] = gens.to_dict()
    if args.report:
        write_report([res] if res is not None else [], args.report, tasks=task_results, generations=gens)
    if args.json:
        return doc
    if res is not None:
        out.print(format_table([res], worst=bool(args.show_worst)), markup=False)
    if task_results:
        out.print(format_tasks(task_results), markup=False)
    if gens is not None:
        out.print(format_generations(gens, label), markup=False)
    if args.report:
        out.print(f"report: {args.report}")
    return None


def _kernel_mode(mode: str) -> str:
    from lowbit.kernels.base import check_mode

    check_mode(mode)  # unknown names: one line naming them
    return mode


def cmd_bench(args: argparse.Namespace) -> dict[str, Any] | None:
    from lowbit.eval.bench import bench, format_bench
    from lowbit.kernels import use_kernels
    from lowbit.model.qmodules import QModule

    mode = _kernel_mode(args.kernels)
    model, _ = lowbit.load(args.model)
    quantized = any(isinstance(m, QModule) for m in model.modules())
    reference: Any = True
    if args.reference:
        reference, _ = lowbit.load(args.reference)
    if args.scheme:
        if quantized:
            raise LowbitError(f"{args.model}: already quantized; --scheme is for a float model")
        qmodel, _ = lowbit.quantize(model, None, scheme=args.scheme, method="rtn")
        reference = reference if args.reference else model
        model = qmodel
    elif not quantized:
        raise LowbitError(f"{args.model}: a float model; give --scheme to quantize it for the benchmark "
                          f"(or a lowbit directory)")
    err.print(f"timing {args.model} ({'threads ' + ' '.join(map(str, args.threads))}; prefill "
              f"{' '.join(map(str, args.prefill))} tokens; decode {args.new_tokens} tokens at context {args.context})")
    with use_kernels(mode):
        r = bench(model, reference, prefill=args.prefill, context=args.context, new_tokens=args.new_tokens,
                  threads=args.threads, repeats=args.repeats, runtimes=args.runtime)
    if args.json:
        return r.to_dict()
    out.print(format_bench(r))
    return None


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any] | None:
    from lowbit.io.inspect import inspect_path, summarize

    rows = inspect_path(args.path)
    total_params, total_bytes, mean_bpw = summarize(rows)
    if args.json:
        return {"tensors": [r.__dict__ | {"shape": list(r.shape)} for r in rows], "params": total_params,
                "bytes": total_bytes, "bpw": mean_bpw}
    t = Table(box=None, pad_edge=False)
    for c in ("name", "shape", "format", "bpw", "bytes"):
        t.add_column(c, justify="right" if c in ("bpw", "bytes") else "left")
    shown = rows if args.all or len(rows) <= 40 else rows[:40]
    for r in shown:
        t.add_row(r.name, "×".join(map(str, r.shape)), r.format, f"{r.bpw:.2f}", f"{r.nbytes:,}")
    out.print(t)
    if len(shown) < len(rows):
        out.print(f"… {len(rows) - len(shown)} more tensors (--all to list them)")
    out.print(f"{len(rows)} tensors · {total_params / 1e6:.2f} M weights · {_mb(total_bytes)} · "
              f"{mean_bpw:.2f} bpw on average")
    return None


def cmd_size(args: argparse.Namespace) -> dict[str, Any] | None:
    from lowbit.model import sizecalc
    from lowbit.model.budget import parse_budget

    budgets = [parse_budget(b) for b in args.budget]  # before the config is read
    report = sizecalc.size_report(args.source, context=args.context, budgets=budgets)
    if args.json:
        return report.to_dict()
    out.print(sizecalc.format_report(report))
    return None


def cmd_plan(args: argparse.Namespace) -> dict[str, Any] | None:
    table = str(Path(args.out).with_suffix(".sensitivity.json")) if args.out and args.budget else None
    if args.budget and not args.table and table and Path(table).is_file():
        args.table = table  # the table a previous `lowbit plan -o` wrote beside the plan
    # a plan from a measured sensitivity table needs no calibration text: the table holds what it measured
    _validate(args, calibrated=not (args.budget and Path(args.table or table or "").is_file()))
    model, tok = lowbit.load(args.source)
    alloc = budget_allocation(args, model, tok, table, err=None if args.json else err)
    base = (alloc.plan if alloc is not None else None) or _plan(args, model) or scheme_plan(
        model, args.scheme, args.method, _config(args), calibrated=bool(args.calib))
    plan = base.with_rules(args.rule, args.keep, method=args.method, config=_config(args))
    for pat in plan.unmatched_patterns(model):
        err.print(f"[yellow]warning[/]: rule pattern {pat!r} matches no layer")
    resolved = {n: lp.to_dict() for n, lp in plan.resolve(model).items()}
    summary = {} if alloc is None else {"budget": alloc.summary()}
    doc = plan.to_dict() | summary | {"resolved": resolved}
    if args.out:
        import json

        from lowbit.io.atomic import atomic_file

        with atomic_file(args.out) as tmp:
            tmp.write_text(json.dumps(plan.to_dict() | summary, indent=2) + "\n")
        err.print(f"wrote {args.out} ({len(plan.rules)} rules, {len(resolved)} layers)")
        return None
    if args.json:
        return doc
    t = Table(box=None, pad_edge=False)
    for c in ("layer", "kind", "scheme", "method"):
        t.add_column(c)
    for n, lp in resolved.items():
        t.add_row(n, lp["kind"], lp["scheme"] or "keep (float)", lp["method"])
    out.print(t)
    return None


def _streamable_folder(source: str) -> Path | None:
    """The float safetensors folder behind ``source`` (a Hugging Face folder, or a GGUF file's float cache),
    when the export can stream from it; None for hub ids, lowbit-quantized folders and non-safetensors weights.
    A folder without tokenizer files streams too: the export then names the missing tokenizer, as it does for a
    loaded model."""
    from lowbit.io.loaders import SourceError, cached_float_dir, resolve_source
    from lowbit.io.save import is_lowbit_dir

    try:
        src = resolve_source(source)
    except SourceError:
        return None  # lowbit.load names the problem
    if src.kind == "gguf" and src.path is not None:
        folder = cached_float_dir(src.path)
    elif src.kind == "hf-dir" and src.path is not None and not is_lowbit_dir(src.path):
        folder = src.path
    else:
        return None
    return folder if any(folder.glob("*.safetensors")) else None


def option_flag(name: str) -> str:
    """The command-line flag of an exporter option: ``calib_windows`` -> ``--calib-windows``."""
    return "--" + name.replace("_", "-")


def option_dest(name: str) -> str:
    """Where argparse keeps an exporter option: apart from the quantize flags an exporter may also take."""
    return f"export_{name}"


def _export_options(exporter: Exporter, args: argparse.Namespace) -> ExportOptions:
    """The exporter's Options from its flags; a bad value is one line naming the flag."""
    from lowbit.io.exporters import OptionError, option_specs

    values = {s.name: getattr(args, option_dest(s.name)) for s in option_specs(exporter.Options)}
    try:
        return exporter.Options(**values)
    except OptionError as e:
        given = "" if e.value is None else f" {e.value}"
        raise LowbitError(f"{option_flag(e.option)}{given}: {e.problem}") from None


def _quantizes_first(exporter: Exporter, args: argparse.Namespace) -> bool:
    """For an exporter that takes the quantize flags: whether MODEL is a float model to quantize first (a lowbit
    directory is exported as it is). The quantize flags are checked here, before anything loads."""
    from lowbit.io.save import is_lowbit_dir

    if is_lowbit_dir(args.model):
        if args.scheme or args.plan or args.rule or args.keep or args.budget:
            raise LowbitError(f"{args.model}: already quantized by lowbit; drop --scheme/--plan/--rule/--keep/--budget "
                              f"(or give the float model to quantize it again)")
        return False
    if not (args.scheme or args.plan or args.budget):
        raise LowbitError(f"{args.model}: not a lowbit model directory: pass --scheme (e.g. int4-g128, int8; "
                          f"with --method/--calib as for quantize) to quantize it first")
    if exporter.weight_only and (args.act or args.method == "smoothquant"):
        raise LowbitError(f"--act / --method smoothquant quantize activations; the {exporter.name} export is "
                          f"weight-only")
    args.scheme = args.scheme or "int4-g128"  # with --plan alone the plan's rules decide
    _validate(args)
    return True


def cmd_export(args: argparse.Namespace) -> dict[str, Any] | None:
    """``lowbit export NAME``: every registered exporter through the same steps."""
    from lowbit.io.exporters import get_exporter

    exporter = get_exporter(args.format)
    options = _export_options(exporter, args)
    if getattr(options, "arch", None):  # a vision model: full-integer quantization on images, then the file
        from lowbit.cli.vision import export_vision

        return export_vision(args, exporter, options, out, _check_out)
    if exporter.quantizes_first and args.method is None:
        args.method = "rtn"
    if exporter.quantizes_first:
        parse_device(args.device)  # before anything is loaded or written
    quantize = exporter.quantizes_first and _quantizes_first(exporter, args)
    _check_out(args.out, args.force, args.model)
    exporter.preflight(options)
    folder = None if quantize or not exporter.streams(options) else _streamable_folder(args.model)
    if folder is not None:  # read the weights tensor by tensor, never the whole model
        model, tok = folder, None
    else:
        model, tok = lowbit.load(args.model)
    resume = resume_folder(args.out) if quantize and args.calib else None  # a rerun resumes the calibration
    if quantize:
        alloc = budget_allocation(args, model, tok, err=None if args.json else err)
        model, qreport = _quantize(args, model, tok, None if alloc is None else alloc.plan, resume)
        _warn_unmatched(args, model)
        if not args.json:
            out.print(layer_table(qreport))
    elif getattr(options, "calib", None):  # an exporter that calibrates itself (gguf) resumes in the same folder
        _say_resuming(args, resume_folder(args.out))
    report = exporter.export(model, args.out, tok, options, force=args.force,
                             progress=None if not args.json else False)
    if resume is not None:
        shutil.rmtree(resume, ignore_errors=True)  # the file is written: nothing left to resume
    if args.json:
        return report.to_dict()
    for w in report.warnings:
        out.print(f"[yellow]warning[/]: {w}")
    for line in exporter.summary(report, args.model):
        out.print(line, markup=False)
    return None


def cmd_demo(args: argparse.Namespace) -> dict[str, Any] | None:
    from lowbit.cli.demo import run_demo

    return run_demo(args, out, err)

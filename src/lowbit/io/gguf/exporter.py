"""``lowbit export gguf``: :func:`export_gguf` behind the exporter interface (:mod:`lowbit.io.exporters`).

>>> from lowbit.io.exporters import get_exporter
>>> exporter = get_exporter("gguf")
>>> options = GGUFOptions(type="Q4_K_M", calib="calib.txt", calib_windows=4, window_len=32, check=True)
>>> report = exporter.export(model, "tiny-q4km.gguf", tok, options)
>>> [(t.name, t.requested, t.ggml) for t in report.details.gguf.fallbacks]
[('blk.0.ffn_down.weight', 'Q4_K', 'Q5_0'), ('blk.1.ffn_down.weight', 'Q6_K', 'Q8_0')]
>>> report.details.check.tokens, round(report.details.check.perplexity, -1)  # llama.cpp ran it: a random model
(122, 330.0)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.exporters import Exporter, ExportOptions, ExportReport, option, register_exporter
from lowbit.io.gguf import llamacpp
from lowbit.io.gguf.export import DEFAULT_CALIBRATED, export_gguf
from lowbit.io.gguf.export import ExportReport as GGUFReport
from lowbit.io.gguf.mixes import ALIASES, MIXES, resolve_mix
from lowbit.methods.registry import MethodConfig, method_spec, option_items
from lowbit.model.resume import folder_beside


@dataclass(frozen=True)
class GGUFOptions(ExportOptions):
    """What :func:`export_gguf` takes, as options (``type=None``: the types of a quantized model's schemes)."""

    type: str | None = option(None, "llama.cpp type or mix: Q8_0 Q6_K Q5_K_M Q4_K_M Q4_0 Q3_K_M Q2_K IQ4_XS F16 "
                                    "BF16 … (default Q4_K_M; a lowbit model: its own types, blocks unchanged)")
    method: str | None = option(None, "any quantization method: rtn (the block search, E[x²]-weighted with "
                                      "--calib), gptq, awq, awq+gptq … (see `lowbit quantize --help`); default: "
                                      f"{DEFAULT_CALIBRATED} with --calib, else rtn")
    method_options: str | None = option(None, "the method's options, comma-separated KEY=VALUE as `lowbit quantize "
                                              "--option` takes them, e.g. 'init=awq+gptq,steps=64' for qat")
    calib: str | None = option(None, "calibration text file (importance statistics; required by --method gptq), or "
                                     "'random' for statistics from random tokens")
    calib_windows: int = option(128, "calibration windows", minimum=1)
    window_len: int = option(512, "tokens per calibration window", minimum=1)
    threads: int | None = option(None, "torch threads while encoding", minimum=1)
    budget: str | None = option(None, "mixed precision under a budget instead of --type: bits per weight of the "
                                      "linear layers (4.5bpw), bytes (60MB) or a predicted-KL bound (kl<=0.05); "
                                      "each unit of layers gets a GGML type by measured sensitivity (needs --calib)")
    table: str | None = option(None, "--budget's sensitivity table JSON: read when it exists, else written there")
    schemes: str | None = option(None, "--budget's candidate GGML types, comma-separated (default "
                                       "q8_0,q6_k,q5_k,q5_0,q4_k,q4_0,q3_k,q2_k)")
    check: bool = option(False, "load the written file in llama.cpp (llama-cpp-python, in a child process) and run "
                                "it on a short text: perplexity and a greedy continuation")

    def validate(self) -> None:
        if self.method is not None and self.method != "search":  # search: rtn's old name here
            try:
                spec = method_spec(self.method)
            except LowbitError as e:
                raise self.invalid("method", str(e)) from None
            if (spec.needs or spec.transform) and self.calib is None:
                raise self.invalid("calib", f"method {self.method!r} needs calibration text: a text file, or "
                                            f"'random' for statistics from random tokens")
            try:
                spec.parse(MethodConfig(options=self.method_config()))
            except LowbitError as e:
                raise self.invalid("method_options", str(e)) from None
        elif self.method_options:
            raise self.invalid("method_options", "options for which method? pass --method too")
        self._check_type()
        self._check_budget()

    def method_config(self) -> dict[str, Any]:
        """``method_options`` as a dict of typed values."""
        items = [x.strip() for x in (self.method_options or "").split(",") if x.strip()]
        return option_items(items, "--method-options")

    def _check_budget(self) -> None:
        if self.budget is None:
            if self.table or self.schemes:
                raise self.invalid("budget", "--table / --schemes choose --budget's types: pass --budget too")
            return
        from lowbit.model.budget import parse_budget, parse_schemes

        checks = (("budget", lambda: parse_budget(self.budget)), ("schemes", lambda: parse_schemes(self.schemes)))
        for name, check in checks:
            try:
                check()
            except LowbitError as e:
                raise self.invalid(name, str(e).split(": ", 1)[-1]) from None
        if self.type is not None:
            raise self.invalid("type", "--type and --budget both choose the tensors' types: pass one of them")
        if self.calib is None and not (self.table and Path(self.table).is_file()):
            raise self.invalid("calib", "--budget measures each layer's sensitivity on calibration text: pass "
                                        "--calib FILE (or --table FILE with a measured table)")

    def _check_type(self) -> None:
        if self.type is not None:
            try:
                resolve_mix(self.type)
            except LowbitError:
                raise self.invalid("type", f"not a llama.cpp type or mix (known: "
                                           f"{', '.join(list(MIXES) + list(ALIASES))})") from None


@dataclass
class GGUFDetails:
    """The GGUF export's own report: the per-tensor table, and llama.cpp's run of the file (``check=True``)."""

    gguf: GGUFReport
    check: llamacpp.RuntimeCheck | None = None
    allocation: Any = None  # --budget's Allocation (lowbit.model.budget)

    @property
    def warnings(self) -> list[str]:
        return self.gguf.warnings

    def to_dict(self) -> dict[str, Any]:
        d = self.gguf.to_dict() | ({"check": self.check.to_dict()} if self.check else {})
        return d | ({"budget": self.allocation.summary()} if self.allocation is not None else {})


def _windows(tokenizer: Any, options: GGUFOptions):
    # the calibration-text helpers live with the evaluation windows (one reader for every command)
    from lowbit.eval.windows import is_random_calib, random_windows, read_text, token_windows

    if tokenizer is None:
        raise LowbitError("calibration text needs the model's tokenizer")
    if is_random_calib(options.calib):
        return random_windows(tokenizer, options.calib_windows, options.window_len)
    return token_windows(tokenizer, read_text(options.calib), options.calib_windows, options.window_len)


@register_exporter
class GGUFExporter(Exporter):
    name = "gguf"
    help = "a GGUF file llama.cpp / Ollama load"
    description = "Export MODEL (anything `lowbit load` takes) as a GGUF file llama.cpp loads."
    out_help = "output .gguf file (must not exist unless --force)"
    Options = GGUFOptions

    def streams(self, options: GGUFOptions) -> bool:
        return options.calib is None and options.budget is None  # calibration runs the model: it must be loaded

    def preflight(self, options: GGUFOptions) -> None:
        from lowbit.eval.windows import is_random_calib, read_text

        if options.calib is not None and not is_random_calib(options.calib):
            read_text(options.calib)  # a bad path fails before the model loads

    def write(self, qmodel: Any, out: Path, tokenizer: Any, options: GGUFOptions, *, force: bool,
              progress: bool | None) -> GGUFDetails:
        calib = None if options.calib is None else _windows(tokenizer, options)
        from lowbit.model.qmodules import QEmbedding, QLinear

        quantized = isinstance(qmodel, nn.Module) and any(
            isinstance(m, QLinear | QEmbedding) for m in qmodel.modules())
        gtype = options.type or (None if quantized else "Q4_K_M")
        alloc = None
        if options.budget is not None:
            if quantized:
                raise LowbitError("--budget plans a float model's types; this model is already quantized")
            alloc = self._allocate(qmodel, tokenizer, calib, options, progress)
        resume = None if calib is None or quantized else folder_beside(out)  # a rerun resumes the calibration
        report = export_gguf(qmodel, tokenizer, out, gtype, calib=calib, method=options.method,
                             progress=progress, threads=options.threads, plan=None if alloc is None else alloc.plan,
                             options=options.method_config() or None, resume_dir=resume)
        if resume is not None:
            shutil.rmtree(resume, ignore_errors=True)  # the file is written: nothing left to resume
        check = None
        if options.check:  # llama.cpp in a child process: a crash there is a one-line error, the file stays written
            check = llamacpp.check(out, threads=options.threads or 1)
        return GGUFDetails(report, check, alloc)

    def _allocate(self, model: Any, tokenizer: Any, calib: Any, options: GGUFOptions, progress: bool | None) -> Any:
        """--budget's allocation over GGML types (sensitivity measured for the export's method)."""
        import lowbit
        from lowbit.model.budget import parse_schemes

        method = options.method if options.method not in (None, "search") else (
            DEFAULT_CALIBRATED if calib is not None else "rtn")
        return lowbit.plan_budget(model, tokenizer, options.budget, calib, method=method,
                                  schemes=parse_schemes(options.schemes), table=options.table, gguf=True,
                                  progress=progress)

    def summary(self, report: ExportReport, source: str) -> list[str]:
        d: GGUFDetails = report.details
        lines = []
        if d.gguf.method:
            o = report.options
            why = ("" if o.method is not None else
                   " (the default with calibration text: the best measured in bench/RESULTS.md)" if o.calib else
                   " (the block search; with --calib a calibrated method is the default)")
            lines.append(f"quantized with method {d.gguf.method}{why}")
            lines += d.gguf.notes
        if d.allocation is not None:
            from lowbit.cli.budget import budget_line

            lines.append(budget_line(d.allocation))
        lines += [f"wrote {report.path} ({report.bytes_written / 1e6:.1f} MB, {d.gguf.bpw:.2f} bpw, "
                 f"{len(d.gguf.fallbacks)} tensors fell back to another type because their rows do not fit the block)"]
        if d.check:
            lines.append(f"llama.cpp runs it: perplexity {d.check.perplexity:.2f} on {d.check.tokens} tokens of a "
                         f"built-in paragraph; it continues {d.check.continuation!r}")
        lines.append(f"next: lowbit eval {report.path} --reference {source} --data held_out.txt")
        return lines

"""``export_gguf``: a float or lowbit-quantized model (or a Hugging Face safetensors folder) to a GGUF file.

A layer quantized to a GGML type (``lowbit quantize --scheme Q4_K_M`` / ``q4_k`` …) is written as its stored
blocks, unchanged. A float model is first quantized by lowbit's one pipeline with the llama.cpp mix as a Plan
(:func:`lowbit.io.gguf.mixes.mix_plan`) — any registered method, onto the exact block grids, with llama.cpp's
fallbacks for rows the blocks do not fit — and then written the same way; the source model is never changed.
Layers quantized to lowbit's grouped schemes go to the nearest GGML type (searched onto its grid, noted).
The file appears atomically.

>>> report = export_gguf(model, tok, "tiny-q4km.gguf", "Q4_K_M")
>>> t = next(t for t in report.tensors if t.name == "blk.0.ffn_down.weight")
>>> t.requested, t.ggml, t.note
('Q4_K', 'Q5_0', "row length 384 is not a multiple of Q4_K's block of 256: Q5_0 instead")
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import LlamaFileType
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.scheme import parse_scheme
from lowbit.errors import LowbitError
from lowbit.io.gguf.mixes import (
    ALIASES,
    FLOAT_TYPES,
    MIXES,
    ModelFacts,
    choose_type,
    fallback,
    ggml_scheme,
    mix_plan,
    model_facts,
    resolve_mix,
    type_for_scheme,
)
from lowbit.io.gguf.source import TensorSource, open_source
from lowbit.io.gguf.writer import GGUFExportError, TensorSpec, arch_spec, gguf_names, permute_qk, qk_heads, write_gguf
from lowbit.layouts import layout_of
from lowbit.layouts.ggml import BLOCK_TYPES
from lowbit.methods.registry import LayerStats, MethodConfig, method_spec
from lowbit.model.quantize import quantize_model
from lowbit.threads import torch_threads

log = logging.getLogger(__name__)
CHUNK = 1 << 20  # weights encoded per step: big enough to amortise thread start-up, small enough for cache
# the method a calibrated export uses when none is named: the best measured (bench/RESULTS.md, GGUF table:
# SmolLM2 Q4_K_M KL 0.0145 with awq+gptq, 0.0174 with gptq, 0.0282 for llama-quantize + imatrix)
DEFAULT_CALIBRATED = "awq+gptq"


@dataclass
class TensorReport:
    name: str  # GGUF name
    source: str  # Hugging Face name
    shape: tuple[int, ...]
    ggml: str
    requested: str  # before any fallback
    method: str  # cast | search | search+imatrix | gptq
    bpw: float
    rel_error: float  # ‖W − Ŵ‖ / ‖W‖
    seconds: float = 0.0
    note: str = ""


@dataclass
class ExportReport:
    path: str
    mix: str
    method: str = ""  # the quantization method used ("" when nothing was quantized here)
    tensors: list[TensorReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what whole-model steps of the quantization did (qat's e2e)
    seconds: float = 0.0
    file_bytes: int = 0

    @property
    def fallbacks(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.ggml != t.requested]

    @property
    def bpw(self) -> float:
        """Bits per weight of the 2-D weights (what llama.cpp quantizes)."""
        mats = [t for t in self.tensors if len(t.shape) >= 2]
        n = sum(int(np.prod(t.shape)) for t in mats)
        return sum(t.bpw * int(np.prod(t.shape)) for t in mats) / n if n else 0.0

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.ggml] = out.get(t.ggml, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bpw"] = self.bpw
        return d


def _layer_of(name: str, n_layer: int) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    if m:
        return int(m.group(1))
    return -1 if name.startswith("token_embd") else n_layer


def _scheme_types(qmodel: nn.Module, kept: list[str]) -> dict[str, tuple[str, str]]:
    """HF tensor name -> (GGML type, note) of a quantized model: each quantized layer's own type (its
    blocks are written unchanged), float layers in the model's float type."""
    from lowbit.model.qmodules import QEmbedding, QLinear

    out: dict[str, tuple[str, str]] = {}
    for n, m in qmodel.named_modules():
        if isinstance(m, QLinear | QEmbedding):
            out[f"{n}.weight"] = type_for_scheme(m.qweight.scheme)
    for n in kept:
        w = getattr(qmodel.get_submodule(n), "weight", None)
        if isinstance(w, torch.Tensor):
            out[f"{n}.weight"] = ("F16" if w.dtype == torch.float16 else "F32", "")
    return out


def _is_quantized(model: Any) -> bool:
    from lowbit.model.qmodules import QEmbedding, QLinear

    return isinstance(model, nn.Module) and any(isinstance(m, QLinear | QEmbedding) for m in model.modules())


def _to_ggml_plan(plan: Any) -> Any:
    """A Plan whose grouped schemes become their nearest GGML types (int4-g32-sym -> q4_0 …)."""
    from lowbit.model.plan import Plan, Rule

    rules = []
    for r in plan.rules:
        if r.scheme is None or parse_scheme(r.scheme).block is not None:
            rules.append(r)
            continue
        t, _ = type_for_scheme(parse_scheme(r.scheme))
        rules.append(Rule(r.pattern, ggml_scheme(t), r.method, r.config, r.kind))
    return Plan(tuple(rules))


def export_gguf(model: nn.Module | str | os.PathLike, tokenizer: Any, path: str | os.PathLike,
                type: str | None = "Q4_K_M", plan: Any = None,
                stats: dict[str, LayerStats] | None = None, progress: bool | None = None, *,
                calib: torch.Tensor | None = None, method: str | None = None, pure: bool = False,
                batch_size: int = 8, name: str | None = None, threads: int | None = None,
                options: dict[str, Any] | None = None, resume_dir: str | os.PathLike | None = None) -> ExportReport:
    """Write ``model`` as a GGUF file llama.cpp loads; returns a per-tensor report.

    ``model``: a transformers model (float, or quantized by lowbit: its GGML-typed layers are written
    unchanged), or the path of a Hugging Face safetensors folder. ``type``: a llama.cpp mix or type
    (``F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q2_K_S Q3_K_S/M/L Q4_K_S/M Q5_K_S/M Q6_K IQ4_NL IQ4_XS``;
    ``Q4_K`` means ``Q4_K_M`` as in llama-quantize), with ``pure=True`` for that type everywhere; None takes
    the types from a quantized model. ``plan``: a lowbit Plan whose schemes pick per-layer types.

    A float model is quantized first by lowbit's one pipeline (:func:`lowbit.model.quantize.quantize_model`)
    with the mix as a Plan: ``method`` is any registered method (``rtn`` = the block search, importance-
    weighted by E[x²] with calibration; ``gptq``, ``awq``, ``awq+gptq`` …; ``search`` is rtn's old name),
    default :data:`DEFAULT_CALIBRATED` when ``calib`` windows ``(N, T)`` are given, else rtn. ``stats``:
    per-layer statistics (module name -> LayerStats) instead of calibration. ``options``: the method's
    options. ``threads``: torch threads while quantizing and encoding (restored after). ``resume_dir``: checkpoint
    the calibrated quantization there (:mod:`lowbit.model.resume`); the same call after a crash resumes it.

    >>> report = export_gguf(model, tok, "tiny-q4km.gguf", "Q4_K_M", calib=windows)
    >>> report.method, round(report.bpw, 2)
    ('awq+gptq', 5.13)
    """
    t_start = time.perf_counter()
    mix, base, ftype = resolve_mix(type or "F32")
    quant_mix = type is not None and base not in FLOAT_TYPES
    if method == "search":
        method = "rtn"
    method_used = method or (DEFAULT_CALIBRATED if calib is not None else "rtn")
    try:
        spec_m = method_spec(method_used)
    except LowbitError as e:
        raise GGUFExportError(f"GGUF export: {e}") from None
    if (spec_m.needs or spec_m.transform) and calib is None and not stats:
        raise GGUFExportError(f"method {method_used!r} needs calibration data (calib windows, or stats)")
    if calib is not None and not isinstance(model, nn.Module):
        raise GGUFExportError("calibration needs a loaded model (lowbit.load), not a folder path")
    if plan is not None and not isinstance(model, nn.Module):
        raise GGUFExportError("a Plan needs a loaded model (lowbit.load), not a folder path")
    if type is None and not _is_quantized(model):
        raise GGUFExportError("type=None takes the types from a quantized model's schemes, but this model "
                              "has no quantized layers: pass a GGUF type such as 'Q4_K_M'")
    quantize_here = (quant_mix or plan is not None) and not _is_quantized(model)
    report = ExportReport(str(path), "plan" if plan is not None else mix if type is not None else "schemes",
                          method=method_used if quantize_here else "")
    overrides: dict[str, tuple[str, str]] = {}
    quantized: dict[str, Any] = {}
    imatrix = calib is not None or bool(stats)
    with torch_threads(threads):
        work = model
        if quantize_here:
            if not isinstance(model, nn.Module):  # a safetensors folder: one float block in memory at a time
                from lowbit.io.loaders import load_float

                work, tok2 = load_float(model, lazy=True)
                tokenizer = tokenizer if tokenizer is not None else tok2
            else:
                work = copy.deepcopy(model)  # the source model is never changed
            cfg = MethodConfig(importance=method_used == "rtn" and imatrix, options=dict(options or {}))
            qplan = _to_ggml_plan(plan) if plan is not None else mix_plan(work, mix, method_used, cfg,
                                                                          has_imatrix=imatrix, pure=pure)
            try:
                qrep = quantize_model(work, qplan, calib, batch_size=batch_size, progress=progress, stats=stats,
                                      resume_dir=resume_dir)
            except GGUFExportError:
                raise
            except LowbitError as e:
                raise GGUFExportError(str(e)) from None
            report.warnings += qrep.warnings
            report.notes += qrep.notes
            if plan is not None:  # say where a grouped scheme became another format
                orig = plan.resolve(model if isinstance(model, nn.Module) else work)
                for r in qrep.layers:
                    why = type_for_scheme(orig[r.name].scheme)[1] if orig.get(r.name) is not None else ""
                    r.note = "; ".join(x for x in (why, r.note) if x)
            quantized = {f"{r.name}.weight": r for r in qrep.layers}
            weighted = {n for n, lp in qplan.resolve(work).items() if lp.config.importance}
            for r in qrep.layers:  # the block search weighted by E[x²] is llama.cpp's imatrix search
                if r.method == "rtn" and r.name in weighted and "saw no" not in r.note:
                    r.method = "search+imatrix"
            overrides = _scheme_types(work, qrep.kept)
        elif _is_quantized(model):
            overrides = _scheme_types(model, [])
        src = open_source(work, tokenizer)
        report.warnings += _write(report, src, path, mix, ftype, overrides, quantized, pure, name, progress,
                                  imatrix)
    report.file_bytes = Path(path).stat().st_size
    report.seconds = time.perf_counter() - t_start
    for wmsg in report.warnings:
        log.warning("%s", wmsg)
    return report


def _write(report: ExportReport, src: TensorSource, path: str | os.PathLike, mix: str, ftype: LlamaFileType,
           overrides: dict[str, tuple[str, str]], quantized: dict[str, Any], pure: bool, name: str | None,
           progress: bool | None, has_imatrix: bool) -> list[str]:
    """Assign every tensor its type, then stream the file: quantized layers' blocks as they are, the rest
    cast (or, from a model quantized to grouped schemes, searched onto the nearest GGML type's grid)."""
    config = src.config
    spec = arch_spec(config)
    if src.tokenizer is None:
        raise GGUFExportError("GGUF export needs the model's tokenizer: llama.cpp reads the vocabulary from the "
                              "file (pass the tokenizer lowbit.load returned, or a folder with tokenizer files)")
    names = gguf_names(spec, config, src.names)
    facts = model_facts(config, has_imatrix)
    order = sorted(names, key=lambda n: (_layer_of(names[n], facts.n_layer), names[n]))  # as llama-quantize
    specs, notes, requested = _assign_types(src, names, order, overrides, mix, facts, pure)
    for hf in order:  # the Plan's fallbacks, as the quantizer applied them: what was asked and why not
        r = quantized.get(hf)
        if r is not None and r.note and not notes[names[hf]]:
            notes[names[hf]] = r.note
        why = next((x for x in (r.note.split("; ") if r is not None else []) if x.startswith("row length")), "")
        if why:
            notes[names[hf]] = why
            requested[names[hf]] = why.split("'s block")[0].rsplit(" ", 1)[-1]
    warnings = _fallback_summary(specs, requested, notes)
    if mix == "Q2_K_S" and not facts.has_imatrix:
        warnings.append("Q2_K_S: llama.cpp insists on an importance matrix for this mix; without calibration "
                        "data lowbit weighs the search by weight magnitude only (pass calib= for better)")
    by_gguf = {names[hf]: hf for hf in order}
    if report.mix in ("plan", "schemes"):
        ftype = _file_type(specs)
    bar = tqdm(total=len(specs), desc="export gguf", disable=None if progress is None else not progress)

    def encode(t: TensorSpec) -> Iterator[np.ndarray]:
        t0 = time.perf_counter()
        hf = by_gguf[t.name]
        enc = _Encoder(src, hf, t.ggml, qk_heads(spec, config, hf))
        yield from enc.chunks()
        q = quantized.get(hf)
        stored = q is not None and enc.how == "stored"
        report.tensors.append(TensorReport(
            t.name, hf, t.shape, t.ggml, requested[t.name], _method_label(q) if stored else enc.how,
            BLOCK_TYPES[t.ggml].bits_per_weight(), q.rel_error if stored else enc.rel_error,
            time.perf_counter() - t0 + (q.seconds if stored else 0.0), notes[t.name]))
        bar.update(1)

    try:
        return warnings + write_gguf(path, spec, config, src.tokenizer, ftype, specs, encode, name=name or src.label)
    finally:
        bar.close()


def _method_label(r: Any) -> str:
    """The report's method column: the quantizer's method (rtn on a GGML type is its block search)."""
    return r.method if r.method != "rtn" else "search"


def _assign_types(src: TensorSource, names: dict[str, str], order: list[str], overrides: dict[str, tuple[str, str]],
                  mix: str, facts: ModelFacts, pure: bool) -> tuple[list[TensorSpec], dict[str, str], dict[str, str]]:
    """Tensor specs in file order, with each tensor's note and its type before any fallback."""
    specs, notes, requested = [], {}, {}
    for hf in order:
        g, shape = names[hf], src.shape(hf)
        if hf in overrides and len(shape) >= 2:
            t, note = overrides[hf]
            ch = fallback(g, shape[-1], t)
            ch_note = "; ".join(x for x in (note, ch.note) if x)
        else:
            ch = choose_type(g, shape, mix, facts, pure)
            ch_note = ch.note
        specs.append(TensorSpec(g, shape, ch.ggml))
        notes[g], requested[g] = ch_note, ch.requested
    return specs, notes, requested


def _fallback_summary(specs: list[TensorSpec], requested: dict[str, str], notes: dict[str, str]) -> list[str]:
    """One line for all fallbacks: how many tensors, which type changes, an example reason."""
    moved = [t for t in specs if requested[t.name] != t.ggml]
    if not moved:
        return []
    pairs: dict[str, int] = {}
    for t in moved:
        key = f"{requested[t.name]} -> {t.ggml}"
        pairs[key] = pairs.get(key, 0) + 1
    kinds = ", ".join(f"{k} x{v}" for k, v in pairs.items())
    return [f"{len(moved)} of {len(specs)} tensors fell back as llama.cpp does ({kinds}); e.g. {moved[0].name}: "
            f"{notes[moved[0].name]}"]


def _file_type(specs: list[TensorSpec]) -> LlamaFileType:
    """general.file_type of a per-layer mix: the type holding most weights, as its llama.cpp file type."""
    count: dict[str, int] = {}
    for t in specs:
        if len(t.shape) >= 2:
            count[t.ggml] = count.get(t.ggml, 0) + int(np.prod(t.shape))
    top = max(count, key=lambda k: count[k]) if count else "F32"
    top = ALIASES.get(top, top)
    return MIXES[top][1] if top in MIXES else LlamaFileType.GUESSED


class _Encoder:
    """Encodes one tensor in row chunks (q/k chunks hold whole heads), tracking ‖W − Ŵ‖ as it goes.

    A layer quantized to the tensor's own GGML type gives its stored blocks (rows permuted for q/k as
    llama.cpp wants them); anything else is cast, or searched onto the type's grid, one chunk of ``CHUNK``
    weights at a time.
    """

    def __init__(self, src: TensorSource, hf: str, ggml: str, heads: int | None):
        self.src, self.hf, self.ggml, self.heads = src, hf, ggml, heads
        self.how = "cast"
        self._err = self._ref = 0.0

    @property
    def rel_error(self) -> float:
        return (self._err / self._ref) ** 0.5 if self._ref > 0 else 0.0

    def _permute(self, w: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        if self.heads is None:
            return w
        shape = self.src.shape(self.hf)
        return permute_qk(w, self.heads if len(shape) < 2 else self.heads * (r1 - r0) // shape[0])

    def _rows(self, r0: int, r1: int) -> torch.Tensor:
        w = self.src.get(self.hf, r0, r1).to(torch.float32)
        if not bool(torch.isfinite(w).all()):  # a streamed folder is checked here, chunk by chunk
            raise GGUFExportError(f"{self.src.label}: tensor {self.hf} holds NaN or Inf values (rows {r0}-{r1})")
        return self._permute(w, r0, r1)

    def chunks(self) -> Iterator[np.ndarray]:
        shape = self.src.shape(self.hf)
        rows = shape[0] if len(shape) > 1 else 1
        cols = int(np.prod(shape)) // rows
        bt = BLOCK_TYPES[self.ggml]
        q = self.src.qtensors.get(self.hf)
        if q is not None and q.scheme.block is not None and q.scheme.block.ggml == self.ggml:
            self.how = "stored"
            yield self._permute(q.codes.reshape(rows, -1), 0, rows).numpy()
            return
        if self.ggml not in FLOAT_TYPES:
            self.how = "search"
        step = max(1, CHUNK // cols)
        if self.heads is not None and len(shape) > 1:
            per_head = rows // self.heads
            step = max(per_head, step // per_head * per_head)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            w = self._rows(r0, r1).reshape(r1 - r0, cols)
            if self.ggml in FLOAT_TYPES:
                data = bt.encode(w)
            else:  # the data-free block search of the type's layout
                sch = parse_scheme(self.ggml.lower())
                data = layout_of(sch).quantize(w, sch).codes.reshape(r1 - r0, -1)
            w_hat = w if self.ggml == "F32" else bt.dequantize(data.reshape(-1, bt.type_size)).reshape(w.shape)
            self._err += float((w_hat - w).double().square().sum())
            self._ref += float(w.double().square().sum())
            yield data.numpy()

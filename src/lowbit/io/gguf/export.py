"""``export_gguf``: a float or lowbit-quantized model (or a Hugging Face safetensors folder) to a GGUF file.

Per tensor: its GGML type comes from a llama.cpp mix (``Q4_K_M`` …), a lowbit Plan, or the schemes of an
already quantized model, then llama.cpp's fallback when its rows do not split into whole blocks. The numbers
in each block come from lowbit's searches on that type's stored grid — each weight counted by its magnitude
(as llama.cpp's k-quants do), times E[x²] of its input channel when calibration statistics are given — or
from GPTQ on that grid (``method="gptq"``). Tensors are encoded in row chunks while the file is written (a
safetensors folder is never loaded whole), and the file appears atomically.

>>> report = export_gguf(model, tok, "smollm2-q4km.gguf", "Q4_K_M")
>>> t = next(t for t in report.tensors if t.name == "blk.0.attn_q.weight")
>>> t.requested, t.ggml, t.note
('Q4_K', 'Q5_0', "row length 576 is not a multiple of Q4_K's block of 256: Q5_0 instead")
"""

from __future__ import annotations

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

from lowbit.io.gguf.blocks import BLOCK_TYPES
from lowbit.io.gguf.gptq import gptq_blocks
from lowbit.io.gguf.mixes import (
    ALIASES,
    FLOAT_TYPES,
    MIXES,
    ModelFacts,
    choose_type,
    fallback,
    resolve_mix,
    type_for_scheme,
)
from lowbit.io.gguf.search import saliency
from lowbit.io.gguf.source import Calibrator, TensorSource, open_source
from lowbit.io.gguf.writer import (
    GGUFExportError,
    TensorSpec,
    arch_spec,
    gguf_names,
    permute_qk,
    qk_heads,
    unpermute_qk,
    write_gguf,
)
from lowbit.methods.registry import LayerStats
from lowbit.threads import torch_threads

log = logging.getLogger(__name__)
CHUNK = 1 << 20  # weights encoded per step: big enough to amortise thread start-up, small enough for cache
METHODS = ("search", "gptq")


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
    tensors: list[TensorReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
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


def _plan_types(src: TensorSource, plan: Any, type_: str | None) -> dict[str, tuple[str, str]]:
    """HF tensor name -> (GGML type, note) from a Plan, or from a quantized model's schemes (type None)."""
    out: dict[str, tuple[str, str]] = {}
    if plan is not None:
        if src.model is None:
            raise GGUFExportError("a Plan needs a loaded model (lowbit.load), not a folder path")
        for mod_name, lp in plan.resolve(src.model).items():
            float_t = "F16" if src.dtype(f"{mod_name}.weight") == torch.float16 else "F32"
            out[f"{mod_name}.weight"] = type_for_scheme(lp.scheme, float_t)
    elif type_ is None:
        if not src.schemes:
            raise GGUFExportError("type=None takes the types from a quantized model's schemes, but this model "
                                  "has no quantized layers: pass a GGUF type such as 'Q4_K_M'")
        out = {n: type_for_scheme(s) for n, s in src.schemes.items()}
    return out


def export_gguf(model: nn.Module | str | os.PathLike, tokenizer: Any, path: str | os.PathLike,
                type: str | None = "Q4_K_M", plan: Any = None,
                stats: dict[str, LayerStats] | None = None, progress: bool | None = None, *,
                calib: torch.Tensor | None = None, method: str = "search", pure: bool = False,
                batch_size: int = 8, name: str | None = None, threads: int | None = None) -> ExportReport:
    """Write ``model`` as a GGUF file llama.cpp loads; returns a per-tensor report.

    ``model``: a transformers model (float or quantized by lowbit) or the path of a Hugging Face
    safetensors folder (streamed tensor by tensor, never loaded whole). ``type``: a llama.cpp mix or type
    (``F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q2_K_S Q3_K_S/M/L Q4_K_S/M Q5_K_S/M Q6_K``; ``Q4_K`` means
    ``Q4_K_M`` as in llama-quantize), with ``pure=True`` for that type everywhere; None takes the types from
    a quantized model's schemes. ``plan``: a lowbit Plan whose schemes pick per-layer types. ``stats``:
    per-layer calibration statistics (module name -> LayerStats); ``calib``: token windows ``(N, T)`` to
    collect them block by block (each block sees the quantized outputs of the blocks before it).
    ``method``: ``search`` (importance-weighted when statistics exist) or ``gptq`` (needs X^T X).
    ``threads``: torch threads while encoding (restored after; None leaves torch's setting). On a machine
    whose cores are busy with other work, 1 is many times faster than several spinning threads.

    >>> report = export_gguf(model, tok, "out.gguf", "Q8_0")
    >>> report.bpw
    8.5
    """
    t_start = time.perf_counter()
    if method not in METHODS:
        raise GGUFExportError(f"unknown GGUF export method {method!r} (known: {', '.join(METHODS)})")
    mix, _, ftype = resolve_mix(type or "F32")
    src = open_source(model, tokenizer)
    config = src.config
    spec = arch_spec(config)
    if src.tokenizer is None:
        raise GGUFExportError("GGUF export needs the model's tokenizer: llama.cpp reads the vocabulary from the "
                              "file (pass the tokenizer lowbit.load returned, or a folder with tokenizer files)")
    names = gguf_names(spec, config, src.names)
    n_layer = int(config.num_hidden_layers)
    facts = ModelFacts(n_layer, int(config.num_attention_heads),
                       int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
                       bool(getattr(config, "tie_word_embeddings", False)),
                       has_imatrix=bool(stats) or calib is not None,
                       is_70b=spec.gguf_arch == "llama" and n_layer == 80)
    overrides = _plan_types(src, plan, type)
    report = ExportReport(str(path), "plan" if plan is not None else mix if type is not None else "schemes")
    order = sorted(names, key=lambda n: (_layer_of(names[n], n_layer), names[n]))  # as llama-quantize writes
    specs, notes, requested = _assign_types(src, names, order, overrides, mix, facts, pure)
    report.warnings += _fallback_summary(specs, requested, notes)
    if mix == "Q2_K_S" and not facts.has_imatrix:
        report.warnings.append("Q2_K_S: llama.cpp insists on an importance matrix for this mix; without calibration "
                               "data lowbit weighs the search by weight magnitude only (pass calib= for better)")
    by_gguf = {names[hf]: hf for hf in order}
    if report.mix in ("plan", "schemes"):
        ftype = _file_type(specs)
    if method == "gptq" and calib is None and not any(s.xtx is not None for s in (stats or {}).values()):
        raise GGUFExportError("method 'gptq' needs calibration data (calib windows, or stats with xtx)")
    cal = None
    if calib is not None:
        if src.model is None:
            raise GGUFExportError("calibration needs a loaded model (lowbit.load), not a folder path")
        cal = Calibrator(src.model, calib, want_xtx=method == "gptq", batch_size=batch_size)
    bar = tqdm(total=len(specs), desc="export gguf", disable=None if progress is None else not progress)

    def encode(t: TensorSpec) -> Iterator[np.ndarray]:
        t0 = time.perf_counter()
        hf = by_gguf[t.name]
        layer = hf.rsplit(".", 1)[0]
        st = (stats or {}).get(layer) if cal is None else cal.stats(layer)
        enc = _Encoder(src, hf, t.ggml, qk_heads(spec, config, hf), st, method, keep=cal is not None)
        yield from enc.chunks()
        if cal is not None and enc.w_hat is not None:
            cal.record(layer, enc.w_hat)
        report.tensors.append(TensorReport(t.name, hf, t.shape, t.ggml, requested[t.name], enc.how,
                                           BLOCK_TYPES[t.ggml].bits_per_weight(), enc.rel_error,
                                           time.perf_counter() - t0, notes[t.name]))
        bar.update(1)

    try:
        with torch_threads(threads):
            report.warnings += write_gguf(path, spec, config, src.tokenizer, ftype, specs, encode,
                                          name=name or src.label)
    finally:
        bar.close()
        if cal is not None:
            cal.close()
    report.file_bytes = Path(path).stat().st_size
    report.seconds = time.perf_counter() - t_start
    for wmsg in report.warnings:
        log.warning("%s", wmsg)
    return report


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

    Only GPTQ needs the whole matrix at once; otherwise memory is one chunk of ``CHUNK`` weights.
    """

    def __init__(self, src: TensorSource, hf: str, ggml: str, heads: int | None, st: LayerStats | None,
                 method: str, keep: bool):
        self.src, self.hf, self.ggml, self.heads, self.st, self.method = src, hf, ggml, heads, st, method
        self.keep = keep  # assemble Ŵ (HF layout) for the calibration runner
        self.w_hat: torch.Tensor | None = None
        self.how = "cast"
        self._err = self._ref = 0.0

    @property
    def rel_error(self) -> float:
        return (self._err / self._ref) ** 0.5 if self._ref > 0 else 0.0

    def _rows(self, r0: int, r1: int) -> torch.Tensor:
        w = self.src.get(self.hf, r0, r1).to(torch.float32)
        if not bool(torch.isfinite(w).all()):  # a streamed folder is checked here, chunk by chunk
            raise GGUFExportError(f"{self.src.label}: tensor {self.hf} holds NaN or Inf values (rows {r0}-{r1})")
        if self.heads is None:
            return w
        shape = self.src.shape(self.hf)
        return permute_qk(w, self.heads if len(shape) < 2 else self.heads * (r1 - r0) // shape[0])

    def chunks(self) -> Iterator[np.ndarray]:
        shape = self.src.shape(self.hf)
        rows = shape[0] if len(shape) > 1 else 1
        cols = int(np.prod(shape)) // rows
        bt = BLOCK_TYPES[self.ggml]
        st = self.st
        if self.ggml not in FLOAT_TYPES and self.method == "gptq" and st is not None and st.xtx is not None:
            w = self._rows(0, rows)
            data, w_hat, _ = gptq_blocks(w, bt, st.xtx, st.tokens, st.sq_mean)
            self.how = "gptq"
            self._account(w, w_hat, 0, rows)
            yield data.numpy()
            return
        imp = None if st is None or st.sq_mean is None else st.sq_mean.float().reshape(1, cols)
        if self.ggml not in FLOAT_TYPES:
            self.how = "search" if imp is None else "search+imatrix"
        quant = self.ggml not in FLOAT_TYPES
        step = max(1, CHUNK // cols)
        if self.heads is not None and len(shape) > 1:
            per_head = rows // self.heads
            step = max(per_head, step // per_head * per_head)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            w = self._rows(r0, r1).reshape(r1 - r0, cols)
            elem = None
            if quant:  # per-weight importance: magnitude, times the input channel's E[x²] when calibrated
                elem = saliency(w.reshape(-1, bt.block_size)).reshape(w.shape)
                elem = elem if imp is None else elem.mul_(imp)
            data = bt.encode(w, elem)
            w_hat = w if self.ggml == "F32" else bt.dequantize(data).reshape(w.shape)
            self._account(w, w_hat, r0, rows)
            yield data.numpy()

    def _account(self, w: torch.Tensor, w_hat: torch.Tensor, r0: int, rows: int) -> None:
        self._err += float((w_hat - w).double().square().sum())
        self._ref += float(w.double().square().sum())
        if self.keep and self.ggml != "F32":
            if self.w_hat is None:
                self.w_hat = torch.empty(rows, w.shape[-1])
            part = w_hat if self.heads is None else unpermute_qk(w_hat, self.heads * w.shape[0] // rows)
            self.w_hat[r0:r0 + w.shape[0]] = part

"""The public model-level API: ``load``, ``quantize``, ``save``, ``evaluate``.

>>> model, tok = lowbit.load("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id (network)  # doctest: +SKIP
>>> model, tok = lowbit.load("tiny-llama")  # a Hugging Face folder (a tiny random Llama here), or a .gguf
>>> qmodel, report = lowbit.quantize(model, tok, scheme="int4-g128", method="gptq", calib="calib.txt",
...                                  windows=4, window_len=32)  # 4 windows of 32 tokens: a toy calibration
>>> lowbit.save(qmodel, "tiny-int4", tokenizer=tok, report=report)
PosixPath('tiny-int4')
>>> hf = lowbit.export_hf(qmodel, "tiny-int4-hf", tokenizer=tok)  # compressed-tensors, transformers loads it
>>> r = lowbit.evaluate(qmodel, reference=model, tokenizer=tok, text="held_out.txt", windows=2, window_len=64,
...                     speed=False)
>>> from lowbit.eval import format_table
>>> print(format_table([r]))  # toy model: ppl ≈ vocabulary; int4 row varies by CPU  # doctest: +ELLIPSIS
2 windows × 64 tokens
model       size      bpw    ppl     Δppl    KL mean   KL p99    top-1
reference   4.6 MB    32.00  316.49  –       –         –         –
tiny-llama  670.9 kB  4.68   ...%
tiny-llama worst windows: ...
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.hf_export import HFExportReport
from lowbit.io.hf_export import export_hf as _export_hf
from lowbit.io.save import is_lowbit_dir, load_quantized
from lowbit.io.save import save as _save
from lowbit.methods.registry import MethodConfig
from lowbit.model.arch import arch_for_type, resolve_path
from lowbit.model.budget import Allocation
from lowbit.model.plan import Plan
from lowbit.model.quantize import QuantReport, quantize_model
from lowbit.model.sensitivity_table import SensitivityTable


def load(source: str | os.PathLike, dtype: torch.dtype = torch.float32, *, lazy: bool = False,
         trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Load ``source`` as ``(model, tokenizer)``: a lowbit output dir (the quantized model), a Hugging Face
    model dir or hub id, or a ``.gguf`` file (dequantized to float).

    ``lazy=True`` (a float model, for ``quantize``) loads the embeddings and head but leaves each transformer
    block's weights on the ``meta`` device; ``quantize`` then reads one block at a time from the safetensors
    files, so memory holds one float block, never the whole model.

    >>> model, tok = lowbit.load("tiny-llama", lazy=True)
    >>> model.model.embed_tokens.weight.is_meta, model.model.layers[0].mlp.up_proj.weight.is_meta
    (False, True)
    >>> qmodel, report = lowbit.quantize(model, tok, scheme="int4-g64", inplace=True)
    >>> qmodel is model, any(t.is_meta for t in qmodel.state_dict().values())
    (True, False)

    Code shipped with a model (a folder's or hub repository's ``*.py``) runs only with ``trust_remote_code=True``.
    """
    if is_lowbit_dir(source):
        return load_quantized(source)
    from lowbit.io.loaders import load_float

    return load_float(source, dtype=dtype, lazy=lazy, trust_remote_code=trust_remote_code)


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, plan: Plan | None = None,
         report: QuantReport | None = None, force: bool = False) -> Path:
    """Write a quantized model (lowbit checkpoint + config + tokenizer + plan) atomically to ``out_dir``."""
    return _save(model, out_dir, tokenizer=tokenizer, plan=plan, report=report, force=force)


def export_hf(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, force: bool = False, *,
              strict: bool = False) -> HFExportReport:
    """Write a quantized model as a compressed-tensors checkpoint that ``transformers`` loads (see
    :mod:`lowbit.io.hf_export`); embeddings and layers the format cannot pack are written as float and reported.

    >>> report = lowbit.export_hf(qmodel, "tiny-int4-hf", tokenizer=tok)
    >>> from transformers import AutoModelForCausalLM
    >>> hf = AutoModelForCausalLM.from_pretrained("tiny-int4-hf")   # needs `pip install lowbit[hf]`
    >>> torch.equal(hf.model.layers[0].mlp.up_proj.weight, qmodel.model.layers[0].mlp.up_proj.qweight.dequantize())
    True
    """
    return _export_hf(model, out_dir, tokenizer=tokenizer, force=force, strict=strict)


def scheme_plan(model: nn.Module, scheme: str, method: str = "rtn", config: MethodConfig | None = None,
                calibrated: bool = False) -> Plan:
    """The Plan a ``--scheme`` asks for: a llama.cpp mix (``Q4_K_M`` …) as llama-quantize's per-layer GGML
    types (with calibration, rtn's block search weighted by E[x²], as llama.cpp's imatrix), else
    :func:`default_plan`.

    >>> lp = scheme_plan(model, "Q4_K_M", "gptq").resolve(model)["model.layers.1.mlp.down_proj"]
    >>> lp.scheme.name, lp.note   # Q6_K by the mix's rule; its 384-long rows take llama.cpp's fallback
    ('q8_0', "row length 384 is not a multiple of Q6_K's block of 256: Q8_0 instead")
    """
    from lowbit.io.gguf.mixes import is_mix, mix_plan

    cfg = config or MethodConfig()
    if not is_mix(scheme):
        return default_plan(model, scheme, method, cfg)
    if method == "rtn" and calibrated:
        cfg = replace(cfg, importance=True)
    return mix_plan(model, scheme, method, cfg, has_imatrix=calibrated)


def default_plan(model: nn.Module, scheme: str, method: str = "rtn", config: MethodConfig | None = None) -> Plan:
    """Every linear layer at ``scheme`` with ``method``; the family's embeddings and head at 8 bits."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    info = arch_for_type(model_type)
    if info is None:
        return Plan.default(scheme, method, config=config)
    emb = tuple(p for p in (resolve_path(model, e) for e in info.embeddings) if p)
    head = resolve_path(model, info.head) if info.head else None
    return Plan.default(scheme, method, family=info.family, config=config, embeddings=emb, head=head)


def calibration_windows(tokenizer: Any, calib: str | os.PathLike | Sequence[str] | torch.Tensor,
                        windows: int = 128, window_len: int = 512) -> torch.Tensor:
    """Token windows ``(windows, window_len)`` from a text file, a string, a list of strings or token ids;
    ``"random"`` (no such file here) draws seeded random tokens: statistics without any data."""
    from lowbit.eval.windows import is_random_calib, random_windows, read_text, token_windows

    if isinstance(calib, torch.Tensor):
        return calib.long()
    if tokenizer is None:
        raise LowbitError("calibration text needs the model's tokenizer")
    if is_random_calib(calib):
        return random_windows(tokenizer, windows, window_len)
    if isinstance(calib, os.PathLike) or (isinstance(calib, str) and len(calib) < 4096 and "\n" not in calib
                                          and Path(calib).suffix in (".txt", ".md", ".raw", ".text")):
        calib = read_text(calib)
    return token_windows(tokenizer, calib, windows, window_len)


def quantize(model: nn.Module, tokenizer: Any = None, scheme: str = "int4-g128", method: str | None = None,
             calib: str | os.PathLike | Sequence[str] | torch.Tensor | Any | None = None, windows: int = 128,
             window_len: int = 512, plan: Plan | None = None, rules: Sequence[str] = (), keep: Sequence[str] = (),
             config: MethodConfig | None = None, inplace: bool = False, progress: bool | None = None,
             batch_size: int = 8, device: str | torch.device | None = None, *, act: str | None = None,
             observer: str = "percentile", act_dtype: str = "uint8",
             resume_dir: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """Quantize ``model`` (a copy unless ``inplace``) and return ``(qmodel, report)``.

    ``resume_dir``: checkpoint each finished transformer block there; rerunning the same call after a crash or
    a kill restores those blocks instead of redoing them, with an identical result (see
    :mod:`lowbit.model.resume`; delete the folder once the model is saved).

    ``scheme`` is a scheme (``int4-g128``, ``q4_k`` …) or a llama.cpp mix (``Q4_K_M``, ``Q3_K_S`` …: the
    per-layer GGML types llama-quantize would choose, as a Plan, onto which ``method`` quantizes; with
    ``calib``, rtn's block search is weighted by E[x²] as llama.cpp's imatrix weighs it).
    ``plan`` overrides ``scheme``/``method``; ``rules`` (``"mlp.down_proj=int8"``) and ``keep`` patterns are
    appended to it. Calibrated methods (``gptq``, ``awq``, importance-weighted ``rtn``) need ``calib``.
    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``; default: where the model is) is where the quantization
    runs, one block at a time; the quantized model is returned where ``model`` was (``qmodel.to(device)``
    moves it, quantized parts included).

    >>> qmodel, report = lowbit.quantize(model, tok, "int4-g128", "gptq", calib="calib.txt",
    ...                                  device="cuda")  # doctest: +SKIP
    >>> qmodel, report = lowbit.quantize(model, tok, scheme="Q4_K_M", method="awq+gptq", calib="calib.txt",
    ...                                  windows=4, window_len=32)
    >>> sorted({layer.scheme for layer in report.layers})  # the mix's types, and its fallbacks for rows of 384
    ['q4_k', 'q5_0', 'q6_k', 'q8_0']

    Any other model (a CNN, any traceable module) with ``act="int8-static"``: the full-integer scheme of edge
    runtimes (see :mod:`lowbit.model.static`), calibrated on ``calib`` inputs: a tensor (N, C, H, W), an iterable of
    batches, or a callable that runs the model on them; ``observer`` picks the activation ranges (percentile, mse,
    minmax), ``method`` the weight rounding (``gptq``, the default here, or ``rtn``; ``qat``: GPTQ, then
    quantization-aware training on crops of the calib images, options from ``config.options`` as
    :class:`~lowbit.qat.static.StaticQatOptions`, resumable with ``resume_dir``); ``keep`` globs stay float.
    The report is a :class:`~lowbit.model.static.StaticReport` (``.qat``: what training did).

    >>> qcnn, rep = lowbit.quantize(cnn, calib=images, scheme="int8", act="int8-static")
    >>> type(qcnn.get_submodule("features.0.0")).__name__, rep.folded_bn
    ('QConv2d', 52)
    """
    if _full_integer(model, calib, act):
        from lowbit.model.static import quantize_static

        if scheme != "int8":
            raise LowbitError(f"scheme {scheme}: full-integer (act='int8-static') quantization of this model stores "
                              f"weights as int8: pass scheme='int8'")
        if calib is None:
            raise LowbitError("act='int8-static' needs calibration inputs (calib=images)")
        if inplace:
            raise LowbitError("inplace=True: a full-integer model is a new (traced) module; the source is kept")
        if method == "qat":  # PTQ, then training against the float model on crops of the calibration images
            from lowbit.qat.static import StaticQatOptions, train_static

            if not isinstance(calib, torch.Tensor):
                raise LowbitError("method='qat' on a full-integer model trains on calib images: a tensor (N, C, H, W)")
            opts = StaticQatOptions.parse(dict(config.options) if config is not None else {})
            qgm, rep = quantize_static(model, calib, observer=observer, method=opts.init, act_dtype=act_dtype,
                                       keep=keep, batch_size=batch_size, progress=progress)
            qgm, rep.qat = train_static(qgm, model, calib, opts, progress=progress, resume_dir=resume_dir)
            rep.method = "qat"
            return qgm, rep
        return quantize_static(model, calib, observer=observer, method=method or "gptq", act_dtype=act_dtype,
                               keep=keep, batch_size=batch_size, progress=progress)
    if act is None and (callable(calib) or (isinstance(calib, torch.Tensor) and calib.is_floating_point())):
        raise LowbitError("calib holds model inputs (images, tensors), not text or token ids: pass act='int8-static' "
                          "for the full-integer scheme (int8 weights per channel, 8-bit activations)")
    method = method or "rtn"
    cfg = config or MethodConfig()
    if act is not None:
        cfg = replace(cfg, options={**cfg.options, "act": act})
    base = plan or scheme_plan(model, scheme, method, cfg, calibrated=calib is not None)
    full = base.with_rules(list(rules), list(keep), method=method, config=cfg)
    target = model if inplace else copy.deepcopy(model)
    win = None if calib is None else calibration_windows(tokenizer, calib, windows, window_len)
    report = quantize_model(target, full, win, batch_size=batch_size, progress=progress, device=device,
                            resume_dir=resume_dir)
    target.lowbit_plan = full  # type: ignore[attr-defined]
    return target, report


def _full_integer(model: nn.Module, calib: Any, act: str | None) -> bool:
    """The full-integer graph path: static activations asked for on a model lowbit has no transformer family for,
    or calibration given as tensors / batches / a function rather than text or token ids."""
    if act != "int8-static":
        return False
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if arch_for_type(model_type) is None:
        return True
    return callable(calib) or (isinstance(calib, torch.Tensor) and calib.is_floating_point())


def export_onnx(qmodel: nn.Module, path: str | os.PathLike, example_inputs: tuple[torch.Tensor, ...] | None = None,
                *, force: bool = False, **kwargs: Any):
    """Write ``qmodel`` as an ONNX file onnxruntime runs with its integer kernels (see :mod:`lowbit.io.onnx`):
    a full-integer model as a QDQ graph with lowbit's own scales and zero-points (no tool re-quantizes it).

    >>> report = lowbit.export_onnx(qcnn, "m.onnx", example_inputs=(images[:1],))
    >>> report.quantized_layers, report.activation_points
    (53, 65)
    """
    from lowbit.io.onnx import export_onnx as _export

    return _export(qmodel, path, example_inputs, force=force, **kwargs)


def plan_budget(model: nn.Module, tokenizer: Any = None, budget: str = "4bpw",
                calib: str | os.PathLike | Sequence[str] | torch.Tensor | None = None, *, method: str = "gptq",
                config: MethodConfig | None = None, schemes: Sequence[str] | None = None, windows: int = 128,
                window_len: int = 512, table: SensitivityTable | str | os.PathLike | None = None,
                fisher_windows: int = 8, gguf: bool = False, progress: bool | None = None) -> Allocation:
    """A mixed-precision Plan for ``budget`` (``3.5bpw``, ``60MB``, ``kl<=0.05``; see :mod:`lowbit.model.budget`):
    each unit of layers (q/k/v of a block, gate/up, o, down) at the candidate of ``schemes`` that keeps the
    predicted KL of the final logits least within the budget. Returns the :class:`Allocation` (``.plan``, and the
    bytes, linear bpw and KL it promises).

    The sensitivity table is measured on ``calib`` for ``method`` (see :mod:`lowbit.model.sensitivity`), or read
    from ``table``: a SensitivityTable, or a JSON file that is read when it exists and written when it does not.
    ``gguf=True`` takes GGML types as candidates (default :data:`~lowbit.model.sensitivity.GGUF_SCHEMES`) and
    keeps the embeddings and head at Q8_0, as a GGUF file stores them.

    >>> a = lowbit.plan_budget(model, tok, "4.5bpw", calib=windows, schemes=["int8", "int4-g64", "int2-g64"])
    >>> a.linear_bpw <= 4.5, a.plan.resolve(model)["model.embed_tokens"].scheme.name
    (True, 'int8')
    >>> qmodel, report = lowbit.quantize(model, tok, plan=a.plan, method="gptq", calib=windows)
    >>> abs(report.linear_bpw - a.linear_bpw) < 1e-9
    True
    """
    from lowbit.model.budget import allocation, parse_budget
    from lowbit.model.sensitivity import fingerprint, measure_sensitivity

    b = parse_budget(budget)  # a bad budget fails before any work
    cands = budget_candidates(schemes, gguf)
    path = None if table is None or isinstance(table, SensitivityTable) else Path(table)
    tab = table if isinstance(table, SensitivityTable) else None
    if path is not None and path.is_file():
        tab = SensitivityTable.load(path)
        tab.check_model(fingerprint(model), path)
    if tab is not None:
        _check_table(tab, method, cands if schemes else None, path or "the sensitivity table")
    else:
        check_budget(model, b, method, cands, gguf)
        if calib is None:
            raise LowbitError("--budget needs calibration text to measure each layer's sensitivity: pass --calib "
                              "FILE (or --table FILE with a measured table)")
        win = calibration_windows(tokenizer, calib, windows, window_len)
        tab = measure_sensitivity(model, win, method=method, config=config, schemes=cands,
                                  fisher_windows=fisher_windows, fixed_scheme="q8_0" if gguf else "int8",
                                  progress=progress)
        if path is not None:
            tab.save(path)
    return allocation(tab, b)


def budget_candidates(schemes: Sequence[str] | None, gguf: bool = False) -> tuple[str, ...]:
    """The candidate schemes of a budget: the user's, else the defaults (GGML types for a GGUF file)."""
    from lowbit.model.sensitivity import DEFAULT_SCHEMES, GGUF_SCHEMES

    return tuple(schemes) if schemes else (GGUF_SCHEMES if gguf else DEFAULT_SCHEMES)


def check_budget(model: nn.Module, budget: Any, method: str, schemes: Sequence[str], gguf: bool = False) -> None:
    """Refuse a bpw / bytes budget the candidates cannot meet, from the layer shapes alone (before measuring)."""
    from lowbit.model.budget import allocation, parse_budget
    from lowbit.model.sensitivity import bytes_table

    b = budget if not isinstance(budget, str) else parse_budget(budget)
    if b.kind != "kl":
        allocation(bytes_table(model, method=method, schemes=schemes, fixed_scheme="q8_0" if gguf else "int8"), b)


def _check_table(tab: SensitivityTable, method: str, schemes: Sequence[str] | None, where: Any) -> None:
    """A reused table was measured for this method and (when the user names them) these candidates."""
    from lowbit.core.scheme import parse_scheme

    if tab.method != method:
        raise LowbitError(f"{where}: measured for method {tab.method}, not {method}; pass --method {tab.method} "
                          f"or another --table")
    if schemes is not None and sorted(parse_scheme(s).name for s in schemes) != sorted(tab.candidates):
        raise LowbitError(f"{where}: measured for candidates {','.join(tab.candidates)}, not "
                          f"{','.join(schemes)}; drop --schemes or pass another --table")


def evaluate(model: nn.Module, reference: nn.Module | None = None, *, device: str | torch.device | None = None,
             inputs: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs: Any):
    """Perplexity, KL and top-1 vs ``reference`` (LMs) or embedding cosine (encoders); see lowbit.eval.

    ``device`` (default: where each model is): both models are moved there (and stay there) to be evaluated.

    >>> r = lowbit.evaluate(qmodel, reference=model, tokenizer=tok, text="held_out.txt", windows=2, window_len=64,
    ...                     speed=False)
    >>> r.n_windows, r.window_len, r.kl_mean < 1e-3   # the exact KL varies with the CPU's float sums
    (2, 64, True)
    >>> lowbit.evaluate(qmodel, reference=model, tokenizer=tok, text="held_out.txt", device="cuda")  # doctest: +SKIP

    An image model: ``inputs`` (N, 3, H, W) and optional ``labels`` give top-1 agreement with ``reference`` (and
    accuracy), logits SQNR and per-layer SQNR (:class:`~lowbit.eval.vision.ImageEval`).

    >>> r = lowbit.evaluate(qcnn, reference=cnn, inputs=images)
    >>> r.n_images, len(r.layers)
    (6, 53)
    """
    if inputs is not None:
        from lowbit.eval.vision import evaluate_images

        if reference is None:
            raise LowbitError("evaluate(inputs=...): pass reference=FLOAT_MODEL to compare with")
        return evaluate_images(model, reference, inputs, labels, **kwargs)
    from lowbit.eval import evaluate as _evaluate
    from lowbit.model.device import optional_device

    dev = optional_device(device)
    if dev is not None:
        for m in (model, reference):
            if m is not None:
                m.to(dev)
    return _evaluate(model, reference=reference, **kwargs)

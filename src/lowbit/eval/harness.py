"""``evaluate``: one model (and optionally its reference) on identical windows → :class:`EvalResult`.

Causal LMs: perplexity, KL(p_ref ‖ p_model) mean and 99th percentile, top-1 agreement, the windows with
the highest mean KL. Encoders (no LM head): cosine of mean-pooled sentence embeddings and agreement of
nearest-neighbour retrieval. Both: size (:mod:`lowbit.eval.size`), speed as a ratio to the reference
measured in the same run (:mod:`lowbit.eval.speed`), peak RSS.

What is exact: with ``exact_kl=True`` (default) the reference runs on every window next to the model and
KL uses both full distributions in float64 (window by window, 128 positions at a time, so memory stays at
one window's logits). With ``exact_kl=False`` and a cached reference for the same windows, the reference is
not re-run for quality: perplexity and top-1 stay exact, KL is computed over the reference's top-``topk``
tokens plus one bucket for the rest — a lower bound of the true KL (``EvalResult.kl_exact`` is False).
Measured on SmolLM2-135M (2 windows): top-64 gives 74-78% of the exact KL, top-256 86-88%, top-1024 94-95%,
for a bf16-rounded MLP (KL 1.9e-5) and an int4 model (KL 0.41) alike — use it for quick ranking only.

>>> from lowbit.eval import format_table
>>> r = evaluate(qmodel, reference=model, tokenizer=tok, text=read_text("held_out.txt"), windows=4, window_len=128,
...              speed=False)
>>> print(format_table([r]))  # doctest: +ELLIPSIS
4 windows × 128 tokens
model             size      bpw    ppl     Δppl    KL mean  KL p99  top-1
reference         4.6 MB    32.00  317.64  –       –        –       –
LlamaForCausalLM  670.9 kB  4.68   ...%
LlamaForCausalLM worst windows: ...
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval import metrics
from lowbit.eval.refcache import ReferenceEntry, cache_key, default_cache_dir, load_reference, save_reference
from lowbit.eval.result import EvalResult, WorstWindow
from lowbit.eval.size import model_size
from lowbit.eval.speed import SpeedInfo, measure_speed, peak_rss_bytes
from lowbit.eval.windows import check_windows, read_text, sentences, token_windows
from lowbit.kernels import use_kernels
from lowbit.threads import torch_threads

log = logging.getLogger(__name__)
CHUNK = 128  # positions per float64 log-softmax chunk: (128, V) float64 ≈ 50 MB at V = 49152
SPEED_WINDOWS = 2  # forward throughput is timed on the first windows (time per window does not depend on text)
SPEED_BATCHES = 4  # encoder throughput: the first sentence batches


def evaluate(
    model: torch.nn.Module,
    reference: torch.nn.Module | None = None,
    tokenizer: Any = None,
    text: str | list[str] | os.PathLike | torch.Tensor | None = None,
    windows: int | None = 40,
    window_len: int = 512,
    speed: bool = True,
    cache_dir: str | os.PathLike | bool | None = None,
    label: str | None = None,
    *,
    kind: str | None = None,
    exact_kl: bool = True,
    topk: int = 256,
    worst: int = 5,
    sentences_n: int = 256,
    progress: bool | None = None,
    kernels: str = "reference",
) -> EvalResult:
    """Evaluate ``model`` against ``reference`` on the same token windows (or sentences, for encoders).

    ``text``: a string, a list of documents, a path to a UTF-8 file (a ``Path``, or a one-line str naming a
    file such as ``"held_out.txt"``), or ready token windows ``(n, L)`` (then all of them are used).
    ``windows``: how many windows of ``window_len`` tokens (None: all).
    ``speed``: also time both models (threads = 2) and give ratios to the reference. ``cache_dir``: where
    reference predictions are cached (None/True: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``; False: none).
    ``kind``: "causal" or "encoder" (default: detected); an encoder is evaluated on the first
    ``sentences_n`` sentences of the text (batches of 32, at most 128 tokens each) instead of windows.
    ``exact_kl=False`` lets a cached reference stand in for running it (KL then a top-``topk`` lower bound).
    ``worst``: how many highest-KL windows to name. ``progress``: tqdm bar (default: when stderr is a TTY).
    ``kernels``: the kernels the quality figures are computed with (:func:`lowbit.kernels.use_kernels`):
    ``"reference"`` (default) measures the quantized weights themselves, exactly; ``"auto"`` what lowbit's
    fast kernels compute (bf16 roundings on top). Speed is always timed with ``"auto"``, the runtime's.

    >>> r = evaluate(qmodel, model, tok, Path("held_out.txt"), windows=2, window_len=128, speed=False)
    >>> r.kl_mean < 2e-3, abs(r.perplexity / r.reference.perplexity - 1) < 0.02, round(r.reference.perplexity, 1)
    (True, True, 322.9)
    """
    t0 = time.perf_counter()
    kind = kind or _model_kind(model)
    if kind not in ("causal", "encoder"):
        raise LowbitError(f"evaluate: kind must be 'causal' or 'encoder', got {kind!r}")
    if isinstance(text, os.PathLike) or _looks_like_path(text):
        text = read_text(text)
    if text is None:
        raise LowbitError("evaluate: no evaluation text (pass text=a string, a file path or token windows)")
    show = sys.stderr.isatty() if progress is None else progress
    label = label or _model_label(model)
    states = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in states:
        m.eval()
    try:
        with torch_threads(2 if speed else None), use_kernels(kernels):
            if kind == "causal":
                res, ref_res = _eval_causal(model, reference, tokenizer, text, windows, window_len, speed,
                                            cache_dir, label, exact_kl, topk, worst, show)
            else:
                res, ref_res = _eval_encoder(model, reference, tokenizer, text, sentences_n, speed, label, show)
    finally:
        for m, was in states:
            m.train(was)
    res.size = model_size(model)
    if ref_res is not None:
        ref_res.size = model_size(reference)
        res.reference = ref_res
    if res.speed and ref_res is not None and ref_res.speed:
        res.forward_speedup = res.speed.tokens_per_s / ref_res.speed.tokens_per_s
        ref_res.forward_speedup = 1.0
        if res.speed.decode_ms_per_token and ref_res.speed.decode_ms_per_token:
            res.decode_speedup = ref_res.speed.decode_ms_per_token / res.speed.decode_ms_per_token
            ref_res.decode_speedup = 1.0
    res.peak_rss_bytes = peak_rss_bytes()
    res.elapsed_s = time.perf_counter() - t0
    return res


# -- causal LMs ---------------------------------------------------------------------------------
def _eval_causal(model, reference, tokenizer, text, n_windows, window_len, speed, cache_dir, label,
                 exact_kl, topk, n_worst, show) -> tuple[EvalResult, EvalResult | None]:
    if isinstance(text, torch.Tensor):
        tokens = check_windows(text)
    else:
        if tokenizer is None:
            raise LowbitError("evaluate: a tokenizer is needed to cut text into windows (pass tokenizer=...)")
        tokens = token_windows(tokenizer, text, n_windows, window_len)
    n, L = tokens.shape
    cdir = None if cache_dir is False else (default_cache_dir() if cache_dir in (None, True) else Path(cache_dir))
    key = cached = None
    if reference is not None and cdir is not None:
        key = cache_key(reference, tokens, topk)
        cached = load_reference(cdir, key, tokens, topk)
    run_ref = reference is not None and (exact_kl or cached is None)
    new_entry = _empty_entry(tokens, topk) if run_ref and cdir is not None and cached is None else None

    nll_q, nll_r, kl, top1 = [], [], [], []
    for i in tqdm(range(n), desc=f"eval {label}", unit="win", disable=not show, leave=False):
        w = tokens[i]  # (L,)
        logits_q = _logits(model, w)  # (L-1, V), row t predicts w[t+1]
        logits_r = _logits(reference, w).to(logits_q.device) if run_ref else None
        if logits_r is not None and logits_r.shape[-1] != logits_q.shape[-1]:
            raise LowbitError(f"evaluate: vocab sizes differ (model {logits_q.shape[-1]}, "
                              f"reference {logits_r.shape[-1]}); KL needs the same tokenizer")
        targets = w[1:].to(logits_q.device)
        for a in range(0, L - 1, CHUNK):
            sl = slice(a, min(a + CHUNK, L - 1))
            nq, lq = metrics.nll_and_logprobs(logits_q[sl], targets[sl])  # (c,), (c, V)
            nll_q.append(nq.cpu())
            if logits_r is not None:
                nr, lr = metrics.nll_and_logprobs(logits_r[sl], targets[sl])
                nll_r.append(nr.cpu())
                kl.append(metrics.kl_divergence(lr, lq).cpu())
                top1.append(metrics.top1_matches(logits_r[sl], logits_q[sl]).cpu())
                if new_entry is not None:
                    _fill_entry(new_entry, i, sl, nr, logits_r[sl].argmax(-1), lr, topk)
            elif cached is not None:
                nll_r.append(cached.nll[i, sl])
                kl.append(metrics.kl_topk(cached.topk_idx[i, sl].to(lq.device), cached.topk_logp[i, sl].to(lq.device),
                                          lq).cpu())
                top1.append(cached.argmax[i, sl] == logits_q[sl].argmax(-1).cpu())
        del logits_q, logits_r
    if new_entry is not None:
        meta = {"reference": str(getattr(reference, "name_or_path", "") or type(reference).__name__),
                "windows": n, "window_len": L, "topk": topk}
        save_reference(cdir, key, new_entry, meta)

    res = EvalResult(label=label, kind="causal", n_windows=n, window_len=L, positions=n * (L - 1))
    res.perplexity = metrics.perplexity(torch.cat(nll_q))
    spd = _speed(model, tokens, True) if speed else None
    res.speed = spd
    if reference is None:
        return res, None
    ref = EvalResult(label="reference", kind="causal", n_windows=n, window_len=L, positions=n * (L - 1))
    ref.perplexity = metrics.perplexity(torch.cat(nll_r))
    ref.speed = _speed(reference, tokens, True) if speed else None
    kl_all = torch.cat(kl)  # (n * (L-1),) float64
    res.kl_mean, res.kl_p99 = metrics.kl_summary(kl_all)
    res.kl_exact = run_ref
    res.top1 = torch.cat(top1).to(torch.float64).mean().item()
    res.kl_positions = kl_all
    res.window_kl = kl_all.reshape(n, L - 1).mean(-1).tolist()
    order = sorted(range(n), key=lambda j: -res.window_kl[j])[: max(0, n_worst)]
    res.worst = [WorstWindow(j, res.window_kl[j], _snippet(tokenizer, tokens[j])) for j in order]
    return res, ref


@torch.inference_mode()
def _logits(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Next-token logits of one window at batch 1: ``(L,) -> (L-1, V)`` (the last row predicts nothing)."""
    dev = _device(model)
    out = model(input_ids=window.reshape(1, -1).to(dev), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0, :-1]


def _empty_entry(tokens: torch.Tensor, k: int) -> ReferenceEntry:
    n, L = tokens.shape
    return ReferenceEntry(tokens.cpu().long(), torch.zeros(n, L - 1, dtype=torch.float64),
                          torch.zeros(n, L - 1, dtype=torch.long), torch.zeros(n, L - 1, k, dtype=torch.int32),
                          torch.full((n, L - 1, k), -math.inf, dtype=torch.float32))  # k > V: padding has p = 0


def _fill_entry(e: ReferenceEntry, i: int, sl: slice, nll, argmax, logp, k: int) -> None:
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (c, k)
    e.nll[i, sl] = nll.cpu()
    e.argmax[i, sl] = argmax.cpu()
    e.topk_idx[i, sl, : top.indices.shape[-1]] = top.indices.to(torch.int32).cpu()
    e.topk_logp[i, sl, : top.values.shape[-1]] = top.values.float().cpu()


def _snippet(tokenizer: Any, window: torch.Tensor, n_tokens: int = 24, chars: int = 60) -> str:
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        return ""
    s = " ".join(tokenizer.decode(window[:n_tokens].tolist()).split())
    return s if len(s) <= chars else s[: chars - 1] + "…"


def _speed(model: torch.nn.Module, windows, causal: bool) -> SpeedInfo:
    """Timed with the runtime's kernels (whatever the quality figures were computed with), threads = 2."""
    with use_kernels("auto"):
        return measure_speed(model, windows[:SPEED_WINDOWS if causal else SPEED_BATCHES], causal=causal, threads=2)


# -- encoders -----------------------------------------------------------------------------------
def _eval_encoder(model, reference, tokenizer, text, n_sentences, speed, label, show):
    if tokenizer is None or isinstance(text, torch.Tensor):
        raise LowbitError("evaluate: an encoder needs text and its tokenizer (sentences are cut from the text)")
    sents = sentences(text, n_sentences)
    batches = encoder_batches(tokenizer, sents)
    res = EvalResult(label=label, kind="encoder", n_windows=len(sents), window_len=0,
                     positions=sum(int(b["attention_mask"].sum()) for b in batches))
    emb_q = _embed(model, batches, show, label)  # (N, H) float64
    res.speed = _speed(model, batches, False) if speed else None
    if reference is None:
        return res, None
    emb_r = _embed(reference, batches, show, "reference")
    ref = EvalResult(label="reference", kind="encoder", n_windows=len(sents), window_len=0, positions=res.positions)
    ref.speed = _speed(reference, batches, False) if speed else None
    cos = metrics.cosine_rows(emb_r, emb_q)  # (N,)
    res.cos_mean, res.cos_min = cos.mean().item(), cos.min().item()
    res.nn_agreement = metrics.nn_agreement(emb_r, emb_q)
    return res, ref


def encoder_batches(tokenizer: Any, sents: list[str], batch_size: int = 32, max_length: int = 128) -> list[dict]:
    """Padded encoder inputs of ``batch_size`` sentences each (at most ``max_length`` tokens)."""
    batches = [tokenizer(sents[a: a + batch_size], padding=True, truncation=True, max_length=max_length,
                         return_tensors="pt") for a in range(0, len(sents), batch_size)]
    return [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")} for b in batches]


@torch.inference_mode()
def _embed(model, batches, show, label) -> torch.Tensor:
    dev = _device(model)
    out = []
    for b in tqdm(batches, desc=f"embed {label}", unit="batch", disable=not show, leave=False):
        b = {k: v.to(dev) for k, v in b.items()}
        o = model(**b)
        hidden = o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0]  # (B, T, H)
        out.append(metrics.mean_pool(hidden, b["attention_mask"]).cpu())
    return torch.cat(out)


# -- helpers ------------------------------------------------------------------------------------
def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _looks_like_path(text: Any) -> bool:
    """A one-line short str that names a file, or looks like a file name (``held_out.txt``, ``data/x``)."""
    if not isinstance(text, str) or "\n" in text or len(text) > 1024 or not text.strip():
        return False
    p = Path(text.strip())
    return p.is_file() or (" " not in text.strip() and (p.suffix.lower() in {".txt", ".md", ".raw", ".text"}
                                                       or os.sep in text))


def _model_kind(model: torch.nn.Module) -> str:
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        return "causal"
    cfg = getattr(model, "config", None)
    return "causal" if getattr(cfg, "is_decoder", False) else "encoder"


def _model_label(model: torch.nn.Module) -> str:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    return Path(str(name)).name or type(model).__name__

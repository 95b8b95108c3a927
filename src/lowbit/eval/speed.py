"""Inference speed and memory, measured raw so the harness can divide by the reference's figures.

* forward throughput: tokens/s of full-window forward passes at batch 1 (no KV cache);
* decode latency: ms per new token, greedy, with a KV cache, after a prompt of ``context`` tokens, through
  lowbit's runtime (:class:`lowbit.runtime.Decoder`) where it runs the model, else transformers' forward
  (``SpeedInfo.decode_runtime`` says which);
* peak RSS of this process.

Every figure is the median of ``repeats`` runs with ``torch`` limited to ``threads`` threads (restored after).

>>> info = measure_speed(model, windows[:2], causal=True, threads=1)
>>> info.threads, info.tokens_per_s > 0, info.decode_ms_per_token > 0   # figures of this machine
(1, True, True)
"""

from __future__ import annotations

import logging
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from lowbit.threads import torch_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedInfo:
    tokens_per_s: float
    decode_ms_per_token: float | None
    peak_rss_bytes: int
    threads: int
    load_avg: float | None = None  # 1-minute load average before timing: above the core count, figures are noise
    decode_runtime: str | None = None  # "lowbit" or "transformers": what decoded (None: not a causal LM)

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def forward_seconds(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], causal: bool = True) -> float:
    """Wall seconds of one forward pass over every batch (inputs moved to the model's device first)."""
    dev = _device(model)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    extra = {"use_cache": False} if causal else {}  # throughput of full windows, no KV cache kept
    _sync(dev)
    t0 = time.perf_counter()
    for b in batches:
        model(**b, **extra)
    _sync(dev)
    return time.perf_counter() - t0


def cache_step(model: torch.nn.Module, out, ids: torch.Tensor):
    """One decode step on the KV cache ``out`` returned: transformers >= 5.2x names it ``cache`` (in and out),
    older ones ``past_key_values``; the step passes it back under the name it came out with."""
    if "cache" in out:
        return model(input_ids=ids, use_cache=True, cache=out["cache"])
    return model(input_ids=ids, use_cache=True, past_key_values=out.past_key_values)


@torch.inference_mode()
def decode_ms_per_token(model, prompt: torch.Tensor, new_tokens: int = 32) -> float:
    """Median ms per greedily decoded token after prefilling ``prompt`` ``(T,)`` into a KV cache; ``model`` a
    torch model (its own forward) or a :class:`lowbit.runtime.Decoder`."""
    from lowbit.runtime import Decoder

    if isinstance(model, Decoder):
        nxt = model.prefill(prompt.reshape(1, -1)).argmax(-1)
        times = []
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            nxt = model.step(nxt).argmax(-1)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)
    dev = _device(model)
    ids = prompt.reshape(1, -1).to(dev)  # (1, T)
    out = model(input_ids=ids, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)  # (1, 1)
    times = []
    for _ in range(new_tokens):
        _sync(dev)
        t0 = time.perf_counter()
        out = cache_step(model, out, nxt)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure_speed(
    model: torch.nn.Module,
    windows: torch.Tensor | list[dict[str, torch.Tensor]],
    causal: bool = True,
    context: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    threads: int | None = 2,
    runtime: str = "auto",
) -> SpeedInfo:
    """Median forward tokens/s over ``windows`` (``(n, L)`` token ids, or encoder input dicts) and, for a
    causal LM, median decode latency at ``context`` tokens with a KV cache.

    One untimed warm-up pass precedes the timed ones. ``runtime``: what decodes — ``"auto"`` (lowbit's runtime
    where it runs the model, else transformers'), ``"lowbit"`` or ``"transformers"``.

    >>> measure_speed(model, torch.randint(0, 100, (2, 64)), context=16, new_tokens=4, threads=1)  # doctest: +ELLIPSIS
    SpeedInfo(tokens_per_s=..., decode_ms_per_token=..., peak_rss_bytes=..., threads=1, load_avg=...)
    """
    if isinstance(windows, torch.Tensor):
        batches = [{"input_ids": w.reshape(1, -1)} for w in windows]  # batch 1
    else:
        batches = list(windows)
    n_tokens = sum(int(b["input_ids"].numel()) for b in batches)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None and load > (os.cpu_count() or 1):
        log.warning("load average %.1f exceeds %d CPUs: speed figures will be unreliable", load, os.cpu_count())
    was_training = model.training
    model.eval()
    try:
        with torch_threads(threads):
            forward_seconds(model, batches[:1], causal)  # warm-up
            secs = statistics.median(forward_seconds(model, batches, causal) for _ in range(repeats))
            decode = used_rt = None
            if causal:
                from lowbit.runtime import Decoder, unsupported

                used_rt = "lowbit" if runtime == "lowbit" or (runtime == "auto" and unsupported(model) is None) \
                    else "transformers"
                runner = Decoder(model) if used_rt == "lowbit" else model
                prompt = batches[0]["input_ids"].reshape(-1)[:context]
                decode_ms_per_token(runner, prompt, new_tokens=2)  # warm-up
                decode = statistics.median(decode_ms_per_token(runner, prompt, new_tokens) for _ in range(repeats))
    finally:
        model.train(was_training)
    used = torch.get_num_threads() if threads is None else threads
    return SpeedInfo(n_tokens / secs, decode, peak_rss_bytes(), used, load, used_rt)

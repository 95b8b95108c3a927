"""lowbit's kernels against float32: layer shapes one by one, whole models end to end, and the arithmetic.

    .venv/bin/python bench/kernel_speed.py layers [--shapes smollm2 7b] [--tokens 1 8 128 512] [--threads 1 2]
    .venv/bin/python bench/kernel_speed.py model [--schemes int4-g64 int8 int8+a8] [--threads 1 2] [--models smollm2 7b]
    .venv/bin/python bench/kernel_speed.py accuracy [--windows 8]

``layers``: for each (out, in) shape and token count, milliseconds per call of the float32 ``F.linear``, of
the dequantize reference and of each fast kernel that serves the layer and takes that many tokens (int4-g64
asymmetric and int8 per channel by default, any scheme by name and ``SCHEME+a8`` for W8A8, RTN of a random
weight: torch's packed kernels, lowbit's C++ GEMVs ``int4-cpp`` / ``int8-cpp`` / ``int8-int8-cpp`` at 1-16
tokens, ``grid8-cpp`` at 1-8, the tiled GEMMs from 9), median of several calls after a warm-up.
``LOWBIT_CPP_KERNELS=off`` before any command leaves lowbit's C++ kernels out (torch's kernels only).
``model``: ``lowbit.bench`` (prefill 128/512 tokens, decode at context 128 on the KV cache, float in the same
run) on SmolLM2-135M quantized by RTN to each scheme; ``--models 7b``: a 2-layer Llama with 7B's widths
(4096 hidden, 11008 intermediate, 32000 vocabulary, random weights), where memory bandwidth dominates.
``accuracy``: KL between the fast kernels' and the reference kernels' next-token distributions on SmolLM2
int4-g64 (GPTQ-free RTN), over WikiText-2 test windows of 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit.errors import LowbitError
from lowbit.kernels import candidates, use_kernels
from lowbit.model.qmodules import QLinear
from lowbit.threads import torch_threads

SHAPES = {
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)],
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
}


def _ms(fn, repeats: int, *args) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def layers(a) -> list[dict]:
    rows = []
    for shapes in a.shapes:
        for out, inp in SHAPES[shapes]:
            w = torch.randn(out, inp) * 0.02
            for scheme in a.schemes:
                try:
                    layer = QLinear(lowbit.quantize_tensor(w, scheme.removesuffix("+a8")))
                except LowbitError as e:  # e.g. a GGML type whose 256-weight blocks do not tile a 576-wide row
                    print(f"skipped {scheme} at {out}x{inp}: {e}", file=sys.stderr, flush=True)
                    continue
                if scheme.endswith("+a8"):  # W8A8: int8 activations per token, as `lowbit quantize --act int8`
                    layer.act_scheme, layer.act_scale = "int8-dynamic", None
                kernels = [k.name for k in candidates(layer) if not k.reference] + ["dequantize"]
                for threads in a.threads:
                    with torch_threads(threads):
                        for t in a.tokens:
                            x = torch.randn(t, inp)
                            reps = max(3, min(50, int(2e8 / (out * inp * t) + 3)))
                            row = {"shape": f"{out}x{inp}", "scheme": scheme, "threads": threads, "tokens": t,
                                   "fp32_ms": _ms(F.linear, reps, x, w)}
                            for k in kernels:
                                with use_kernels([k] if k != "dequantize" else "reference"):
                                    layer(x)
                                    if layer._kernel.name != k:
                                        continue
                                    row[f"{k}_ms"] = _ms(layer, reps, x)
                            rows.append(row)
                            print(json.dumps(row), flush=True)
    return rows


def _smollm2():
    from lowbit.cli.assets import smollm2_gguf

    return lowbit.load(str(smollm2_gguf()))


def _stack7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), None


def _rtn(float_model, scheme: str):
    """RTN to ``scheme``; ``SCHEME+a8`` also quantizes activations to int8 per token (W8A8: speed does not
    depend on SmoothQuant's scales, so none are searched)."""
    from lowbit.methods.registry import MethodConfig

    act = scheme.endswith("+a8")
    config = MethodConfig(options={"act": "int8-dynamic"}) if act else None
    q, _ = lowbit.quantize(float_model, None, scheme=scheme.removesuffix("+a8"), method="rtn", config=config,
                           progress=False)
    return q


def model(a) -> list[dict]:
    out = []
    sources = [(n, m) for n, m in (("SmolLM2-135M", _smollm2), ("llama-7B-widths-2-layers", _stack7b))
               if (n.startswith("SmolLM2") and "smollm2" in a.models) or (n.startswith("llama") and "7b" in a.models)]
    for name, make in sources:
        float_model, _ = make()
        for scheme in a.schemes:
            q = _rtn(float_model, scheme)
            r = lowbit.bench(q, float_model, prefill=a.prefill, context=a.context, new_tokens=a.new_tokens,
                             threads=a.threads, repeats=a.repeats)
            from lowbit.eval.bench import format_bench

            print(f"## {name} {scheme}\n{format_bench(r)}", flush=True)
            out.append({"model": name, "scheme": scheme, **r.to_dict()})
            del q
    return out


@torch.inference_mode()
def accuracy(a) -> list[dict]:
    from lowbit.cli.assets import wikitext
    from lowbit.eval import metrics
    from lowbit.eval.windows import read_text, token_windows

    float_model, tok = _smollm2()
    windows = token_windows(tok, read_text(wikitext("test")), a.windows, 512)
    rows = []
    for scheme in a.schemes:
        q = _rtn(float_model, scheme)
        kl, top1, used = [], [], set()
        for w in windows:
            ids = w.reshape(1, -1)
            with use_kernels("reference"):
                ref = q(input_ids=ids).logits[0].float()
            fast = q(input_ids=ids).logits[0].float()
            used |= {m._kernel.name for m in q.modules() if isinstance(m, QLinear)}
            lr, lf = torch.log_softmax(ref.double(), -1), torch.log_softmax(fast.double(), -1)
            kl.append(metrics.kl_divergence(lr, lf))
            top1.append(metrics.top1_matches(ref, fast).double())
        kl_all = torch.cat(kl)
        # decode-shaped calls (1 token at a time) run the small-batch kernels: one window token by token
        ids = windows[0, :128].reshape(1, -1)
        with use_kernels("reference"):
            ref_dec = _stepwise(q, ids)
        fast_dec = _stepwise(q, ids)
        kl_dec = metrics.kl_divergence(torch.log_softmax(ref_dec.double(), -1),
                                       torch.log_softmax(fast_dec.double(), -1))
        # the same decode through lowbit's runtime (stacked GEMVs, one C++ call per layer where it can)
        run_dec = _stepwise_runtime(q, ids)
        kl_run = metrics.kl_divergence(torch.log_softmax(ref_dec.double(), -1),
                                       torch.log_softmax(run_dec.double(), -1))
        row = {"scheme": scheme, "windows": len(windows), "kl_mean_prefill512": float(kl_all.mean()),
               "kl_max_prefill512": float(kl_all.max()), "top1_agree_prefill512": float(torch.cat(top1).mean()),
               "kl_mean_decode": float(kl_dec.mean()), "kl_max_decode": float(kl_dec.max()),
               "kl_mean_decode_lowbit_runtime": float(kl_run.mean()),
               "kl_max_decode_lowbit_runtime": float(kl_run.max()),
               "kernels": sorted(used)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _stepwise(model, ids: torch.Tensor) -> torch.Tensor:
    from lowbit.eval.speed import cache_step

    out = model(input_ids=ids[:, :1], use_cache=True)
    logits = [out.logits[0, -1]]
    for i in range(1, ids.shape[1]):
        out = cache_step(model, out, ids[:, i: i + 1])
        logits.append(out.logits[0, -1])
    return torch.stack(logits).float()


def _stepwise_runtime(model, ids: torch.Tensor) -> torch.Tensor:
    from lowbit.runtime import Decoder

    dec = Decoder(model)
    logits = [dec.prefill(ids[:, :1])[0]]
    for i in range(1, ids.shape[1]):
        logits.append(dec.step(ids[:, i])[0])
    assert dec.layers_native or native_off(), "the one-call C++ layers did not run"
    return torch.stack(logits).float()


def native_off() -> bool:
    from lowbit.kernels import native

    return native.library() is None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("layers")
    p.add_argument("--shapes", nargs="+", default=["smollm2"], choices=sorted(SHAPES))
    p.add_argument("--schemes", nargs="+", default=["int4-g64", "int8"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128, 512])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p = sub.add_parser("model")
    p.add_argument("--schemes", nargs="+", default=["int4-g64", "int8", "int8+a8"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["smollm2"], choices=["smollm2", "7b"])
    p = sub.add_parser("accuracy")
    p.add_argument("--schemes", nargs="+", default=["int4-g64", "int8"])
    p.add_argument("--windows", type=int, default=8)
    for q in sub.choices.values():
        q.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    print(f"# bench/kernel_speed.py {' '.join(sys.argv[1:])} · torch {torch.__version__}", flush=True)
    rows = {"layers": layers, "model": model, "accuracy": accuracy}[a.what](a)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()

"""Transformer ONNX export, measured: SmolLM2 int4-g64 (MatMulNBits) and all-MiniLM-L6-v2 W8A8 (int8 x int8)
in onnxruntime vs lowbit's own model, the float model and a float32 ONNX file of the same graph.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/onnx_transformer.py [--windows 4] [--sentences 64]

Everything runs on one thread (torch and onnxruntime); onnxruntime runs in a child process. Latencies are the
median of ``--repeats`` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import onnx
import torch

import lowbit
from lowbit.cli.assets import minilm_dir, wikitext
from lowbit.eval.windows import read_text, sentences, token_windows
from lowbit.io.loaders import cached_float_dir
from lowbit.io.onnx import transformer as T
from lowbit.io.onnx.runtime import run_onnx_isolated, time_onnx
from lowbit.isolate import run_isolated
from lowbit.kernels import use_kernels
from lowbit.methods.registry import MethodConfig


def float_onnx(model, kind: str, path: Path, feeds: dict[str, torch.Tensor]) -> None:
    """The float model through the same exporter path (no quantized layers to rewrite)."""
    T._export_float(T._stand_in(model), kind, T._example_inputs(model, kind, feeds), T.DEFAULT_OPSET, path)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def ort_time(path: Path, feeds: dict[str, torch.Tensor], repeats: int) -> float:
    return run_isolated(time_onnx, str(path), {k: v.numpy() for k, v in feeds.items()}, repeats,
                        what=f"timing {path.name}")


def mib(path: Path) -> float:
    return path.stat().st_size / 2**20


def smollm2(a, out: Path) -> None:
    from lowbit.cli.assets import smollm2_gguf

    model, tok = lowbit.load(cached_float_dir(smollm2_gguf()))
    q, _ = lowbit.quantize(model, tok, scheme="int4-g64", progress=False)
    rep = T.write_transformer_onnx(q, out / "smollm2-int4.onnx", force=True)
    float_onnx(model, "causal-lm", out / "smollm2-fp32.onnx", None)
    int8_compute = out / "smollm2-int4-acc4.onnx"  # the same file with accuracy_level=4: A quantized to int8 per block
    g = onnx.load(str(out / "smollm2-int4.onnx"))
    for node in g.graph.node:
        if node.op_type == "MatMulNBits":
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", 4))
    onnx.save(g, str(int8_compute))
    wins = token_windows(tok, read_text(wikitext("test")), a.windows, a.window_len)
    mask = torch.ones_like(wins)
    feeds = {"input_ids": wins, "attention_mask": mask}
    kl_ref, kl_auto, kl_float_onnx, kl_float_lowbit, kl_acc4 = [], [], [], [], []
    for i in range(len(wins)):
        f = {k: v[i:i + 1] for k, v in feeds.items()}
        (y,) = run_onnx_isolated(out / "smollm2-int4.onnx", {k: v.numpy() for k, v in f.items()})
        y = torch.from_numpy(y)
        (y4,) = run_onnx_isolated(int8_compute, {k: v.numpy() for k, v in f.items()})
        with torch.no_grad():
            with use_kernels("reference"):
                ref = q(**f).logits
            auto = q(**f).logits
            flt = model(**f).logits
        kl_ref.append(kl(ref, y))
        kl_auto.append(kl(auto, y))
        kl_float_onnx.append(kl(flt, y))
        kl_float_lowbit.append(kl(flt, ref))
        kl_acc4.append(kl(ref, torch.from_numpy(y4)))
    prefill = {"input_ids": wins[:1, :128], "attention_mask": mask[:1, :128]}
    t_q = ort_time(out / "smollm2-int4.onnx", prefill, a.repeats)
    t_f = ort_time(out / "smollm2-fp32.onnx", prefill, a.repeats)
    t_4 = ort_time(int8_compute, prefill, a.repeats)
    n = len(wins)
    print(f"\n## SmolLM2-135M-Instruct int4-g64 (rtn) · {n} WikiText-2 test windows of {a.window_len} tokens")
    print(f"layers: {rep.layers}; warnings: {rep.warnings or 'none'}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| KL(lowbit float32 reference ‖ ONNX), mean | {sum(kl_ref) / n:.3g} |")
    print(f"| KL(lowbit default kernels ‖ ONNX), mean | {sum(kl_auto) / n:.3g} |")
    print(f"| KL(lowbit float32 reference ‖ ONNX with accuracy_level=4), mean | {sum(kl_acc4) / n:.3g} |")
    print(f"| KL(float model ‖ ONNX int4), mean | {sum(kl_float_onnx) / n:.4f} |")
    print(f"| KL(float model ‖ lowbit int4), mean | {sum(kl_float_lowbit) / n:.4f} |")
    s_q, s_f = mib(out / "smollm2-int4.onnx"), mib(out / "smollm2-fp32.onnx")
    print(f"| file: int4 ONNX / fp32 ONNX | {s_q:.1f} MiB / {s_f:.1f} MiB ({s_q / s_f:.3f}x) |")
    print(f"| ORT prefill 128 tokens, batch 1: int4 / fp32 | {1e3 * t_q:.1f} ms / {1e3 * t_f:.1f} ms "
          f"(fp32 / int4 = {t_f / t_q:.2f}x) |")
    print(f"| ORT prefill 128 tokens, batch 1: int4 with accuracy_level=4 | {1e3 * t_4:.1f} ms "
          f"(fp32 / int4 = {t_f / t_4:.2f}x) |")


def minilm(a, out: Path) -> None:
    model, tok = lowbit.load(minilm_dir())
    q, _ = lowbit.quantize(model, tok, scheme="int8", config=MethodConfig(options={"act": "int8-dynamic"}),
                           progress=False)
    rep = T.write_transformer_onnx(q, out / "minilm-w8a8.onnx", force=True)
    float_onnx(model, "encoder", out / "minilm-fp32.onnx", None)
    sents = sentences(read_text(wikitext("test")), a.sentences)
    cos, lowbit_cos, diffs = [], [], []
    for i in range(0, len(sents), 8):
        enc = tok(sents[i:i + 8], padding=True, truncation=True, max_length=128, return_tensors="pt")
        feeds = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        (y,) = run_onnx_isolated(out / "minilm-w8a8.onnx", {k: v.numpy() for k, v in feeds.items()})
        with torch.no_grad():
            flt = model(**feeds).last_hidden_state
            low = q(**feeds).last_hidden_state
        m = feeds["attention_mask"].unsqueeze(-1).float()

        def pooled(h, m=m):
            return (h * m).sum(1) / m.sum(1)

        y = torch.from_numpy(y)
        cos.append(torch.nn.functional.cosine_similarity(pooled(y), pooled(flt), dim=-1))
        lowbit_cos.append(torch.nn.functional.cosine_similarity(pooled(low), pooled(flt), dim=-1))
        valid = feeds["attention_mask"].bool()
        diffs.append(((y - low)[valid].norm() / low[valid].norm()).item())
    cos, lowbit_cos = torch.cat(cos), torch.cat(lowbit_cos)
    print(f"\n## all-MiniLM-L6-v2 W8A8 (int8 per channel, int8-dynamic activations) · {len(cos)} WikiText-2 "
          "sentences, mean-pooled")
    print(f"layers: {rep.layers}; warnings: {rep.warnings or 'none'}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| cosine(ONNX W8A8, float), mean / min | {cos.mean():.5f} / {cos.min():.5f} |")
    print(f"| cosine(lowbit W8A8, float), mean / min | {lowbit_cos.mean():.5f} / {lowbit_cos.min():.5f} |")
    print(f"| relative L2 error of the hidden states, ONNX vs lowbit W8A8 (worst batch of 8) | {max(diffs):.2e} |")
    print(f"| file: W8A8 ONNX / fp32 ONNX | {mib(out / 'minilm-w8a8.onnx'):.1f} MiB / "
          f"{mib(out / 'minilm-fp32.onnx'):.1f} MiB |")
    for batch in (1, 8):
        enc = tok(sents[:batch], padding="max_length", truncation=True, max_length=a.seq, return_tensors="pt")
        feeds = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        t_q = ort_time(out / "minilm-w8a8.onnx", feeds, a.repeats)
        t_f = ort_time(out / "minilm-fp32.onnx", feeds, a.repeats)
        verdict = "met" if t_f / t_q >= 1.5 else "NOT met"
        print(f"| ORT batch {batch} x {a.seq} tokens: W8A8 / fp32 | {1e3 * t_q:.2f} ms / {1e3 * t_f:.2f} ms "
              f"(speed-up {t_f / t_q:.2f}x; target 1.5x {verdict}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-len", type=int, default=128)
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128, help="MiniLM timing: tokens per sentence (padded)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", choices=("smollm2", "minilm"))
    ap.add_argument("--out", type=Path, help="folder for the .onnx files (default: a temporary one)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"CPU: {cpu} · 1 thread (torch and onnxruntime)")
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if a.only in (None, "minilm"):
            minilm(a, out)
        if a.only in (None, "smollm2"):
            smollm2(a, out)


if __name__ == "__main__":
    main()

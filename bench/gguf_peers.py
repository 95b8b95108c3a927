"""lowbit's GGUF files against llama.cpp's own, type for type, on SmolLM2-135M (shared/BENCHMARK.md).

    .venv/bin/python bench/gguf_peers.py --llama-bin DIR [--types Q2_K Q3_K_M Q4_0 Q4_K_M Q5_K_M Q6_K]
        [--windows 40] [--methods gptq awq+gptq qat@steps=64] [--threads 2] [--json bench/results/gguf-peers.json]
        [--work DIR] [--reuse]

DIR holds ``llama-quantize``, ``llama-imatrix`` and ``llama-perplexity`` built from llama.cpp's source
(e.g. the ``vendor/llama.cpp`` of the ``llama-cpp-python`` sdist, ``cmake -B build && cmake --build build``),
outside this repository. Steps, all on the same data:

1. the reference: SmolLM2's GGUF re-written as F32 by ``llama-quantize --allow-requantize``;
2. llama.cpp's importance matrix from the first 128 × 512 tokens of WikiText-2 validation
   (``llama-imatrix -c 512 --chunks 128``) and ``llama-quantize`` with and without it, per type;
3. ``lowbit export gguf`` per type and method (any registered method onto each type's block grids, through
   lowbit's one quantization pipeline, calibrated on the same 128 windows), wall time and peak RSS from
   ``os.wait4``;
4. every file evaluated twice: in lowbit's harness (the first N windows × 512 of WikiText-2 test, KL against
   the float32 model) and in ``llama-perplexity --kl-divergence`` (llama.cpp's own protocol: N chunks of
   512 tokens, the second half of each chunk scored, KL against the F32 file's logits).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit.cli.assets import smollm2_gguf, wikitext
from lowbit.eval.windows import read_text, token_windows

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.quality import evaluate_all  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` (output to ``log``); return (wall seconds, peak RSS GB)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        raise SystemExit(f"`{' '.join(cmd)}` {how}; see {log}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1e6


def linear_bpw(path: Path) -> float:
    """Bits per weight of the blocks' 2-D tensors (embeddings and head excluded, as lowbit's linear_bpw)."""
    from lowbit.io.inspect import inspect_path, summarize

    rows = [t for t in inspect_path(path) if len(t.shape) == 2 and t.name.startswith("blk.")]
    _, nbytes, _ = summarize(rows)
    return 8 * nbytes / sum(t.shape[0] * t.shape[1] for t in rows)


def llama_kld(bin_dir: Path, model: Path, base: Path, chunks: int, log: Path, threads: int = 2) -> dict:
    text = str(wikitext("test"))
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", text, "-c", "512", "--chunks", str(chunks),
           "-t", str(threads), "--kl-divergence-base", str(base), "--kl-divergence"]
    timed(cmd, log)
    out = log.read_text()

    def grab(label: str) -> float:
        m = re.search(rf"{label}\s*:\s*([-+0-9.eE]+)", out)
        if not m:
            raise SystemExit(f"no '{label}' in {log}")
        return float(m.group(1))

    return {"llama_ppl": grab(r"Mean PPL\(Q\)"), "llama_kl_mean": grab("Mean    KLD"),
            "llama_top1": grab(r"Same top p") / 100}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bin", required=True, type=Path, help="folder with llama-quantize/-imatrix/-perplexity")
    ap.add_argument("--types", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq+gptq"],
                    help="lowbit methods (any registered), each METHOD or METHOD@KEY=VALUE,... with its options")
    ap.add_argument("--threads", type=int, default=2, help="threads of every tool (llama.cpp's and lowbit's)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".work-gguf")
    ap.add_argument("--reuse", action="store_true", help="keep files already in --work")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    w, b = a.work, a.llama_bin
    w.mkdir(parents=True, exist_ok=True)
    valid, test = str(wikitext("valid")), str(wikitext("test"))

    def make(path: Path, cmd: list[str]) -> dict:
        if a.reuse and path.exists():
            return {}
        wall, rss = timed(cmd, path.with_suffix(".log"))
        return {"wall_s": wall, "peak_rss_gb": rss}

    f32 = w / "smol-f32.gguf"
    make(f32, [str(b / "llama-quantize"), "--allow-requantize", str(smollm2_gguf()), str(f32), "F32"])
    imat = w / "imatrix.gguf"
    make(imat, [str(b / "llama-imatrix"), "-m", str(f32), "-f", valid, "-c", "512", "--chunks",
                str(a.calib_windows), "-t", str(a.threads), "-o", str(imat)])
    base = w / "f32.kld"
    if not (a.reuse and base.exists()):
        timed([str(b / "llama-perplexity"), "-m", str(f32), "-f", test, "-c", "512", "--chunks", str(a.windows),
               "-t", str(a.threads), "--kl-divergence-base", str(base)], w / "f32-kld.log")

    files: dict[str, dict] = {}
    for t in a.types:
        p = w / f"llama-{t}.gguf"
        files[f"llama.cpp {t}"] = {"type": t, "tool": "llama-quantize", "path": p,
                                   **make(p, [str(b / "llama-quantize"), str(f32), str(p), t, "2"])}
        p = w / f"llama-{t}-imat.gguf"
        files[f"llama.cpp {t} + imatrix"] = {
            "type": t, "tool": "llama-quantize --imatrix", "path": p,
            **make(p, [str(b / "llama-quantize"), "--imatrix", str(imat), str(f32), str(p), t, "2"])}
        for m in a.methods:  # METHOD or METHOD@KEY=VALUE,... (the method's options)
            method, _, opts = m.partition("@")
            tag = m.replace("+", "-").replace("@", "-").replace(",", "-").replace("=", "")
            p = w / f"lowbit-{t}-{tag}.gguf"
            cmd = [sys.executable, "-m", "lowbit.cli.main", "export", "gguf", str(smollm2_gguf()), "-o", str(p),
                   "--type", t, "--method", method, "--calib", valid, "--calib-windows", str(a.calib_windows),
                   "--force", "--threads", str(a.threads)] + (["--method-options", opts] if opts else [])
            files[f"lowbit {t} ({m})"] = {"type": t, "tool": f"lowbit export gguf --method {m}", "path": p,
                                          **make(p, cmd), "command": "lowbit " + " ".join(cmd[3:])}
        print(f"{t}: files ready", file=sys.stderr, flush=True)

    reference, tok = lowbit.load(smollm2_gguf())
    windows = token_windows(tok, read_text(test), a.windows, 512)
    models = {n: lowbit.load(f["path"])[0].requires_grad_(False) for n, f in files.items()}
    quality = evaluate_all(models, reference, windows)
    rows = []
    for n, f in files.items():
        r = {"name": n, **{k: v for k, v in f.items() if k != "path"}, "file": f["path"].name,
             "bytes": f["path"].stat().st_size, "bpw": linear_bpw(f["path"]), **quality[n],
             **llama_kld(b, f["path"], base, a.windows, f["path"].with_suffix(".kld.log"), a.threads)}
        rows.append(r)
    print(f"\nSmolLM2-135M-Instruct · lowbit harness: {a.windows} windows × 512 of wikitext2-test, float32 ppl "
          f"{quality['float32']['ppl']:.3f} · llama-perplexity: {a.windows} chunks × 512 (second halves scored)")
    print("| file | bpw (linear) | MB | ppl | KL mean | KL p99 | top-1 | llama.cpp ppl | llama.cpp KL | "
          "llama.cpp top-1 | make s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else "–"
        rss = f"{r['peak_rss_gb']:.2f}" if "peak_rss_gb" in r else "–"
        print(f"| {r['name']} | {r['bpw']:.3f} | {r['bytes'] / 1e6:.1f} | {r['ppl']:.3f} | {r['kl_mean']:.4f} | "
              f"{r['kl_p99']:.3f} | {100 * r['top1']:.1f}% | {r['llama_ppl']:.3f} | {r['llama_kl_mean']:.4f} | "
              f"{100 * r['llama_top1']:.1f}% | {wall} | {rss} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"float32": quality["float32"], "rows": rows, "windows": a.windows,
                                            "torch": torch.__version__}, indent=2, default=str))


if __name__ == "__main__":
    main()

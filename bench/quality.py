"""SmolLM2-135M quality per bit (protocol of shared/BENCHMARK.md).

    .venv/bin/python bench/quality.py rtn:int4-g128 rtn+mse:int4-g128 gptq:int4-g64 ... [--windows 40]
        [--gguf Q4_K_M=/path/model.gguf ...] [--json bench/results/quality.json] [--repeats 3 --time-only]

Each config ``METHOD[+mse|+imp][~random][@KEY=VAL,...]:SCHEME`` (options go to ``--option``; ``~random``
calibrates on random tokens, ``--calib random``, instead of WikiText-2 validation) is quantized by the
real CLI in a child process (``lowbit quantize … --json``), whose wall time and peak RSS come from
``os.wait4``. Then every model (and any GGUF made by another tool, loaded and dequantized by lowbit) is
evaluated on the same windows of the WikiText-2 test split; the float reference runs once per window and every model is
compared with it there (KL from float64 log-softmax, exact). Calibration: WikiText-2 validation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit.cli.assets import smollm2_gguf, wikitext
from lowbit.eval import metrics
from lowbit.eval.windows import read_text, token_windows
from lowbit.methods.registry import method_names

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("LOWBIT_BENCH_WORK", ROOT / "bench" / ".work"))
THREADS = 2  # torch threads of the evaluation and of each quantize child (shared/BENCHMARK.md: threads = 2)


def run_quantize(name: str, method: str, scheme: str, calib_windows: int, reuse: bool = False,
                 repeats: int = 1, options: tuple[str, ...] = (), calib: str | None = None) -> dict:
    # A registered name may hold a "+" of its own (awq+gptq); otherwise "+mse" / "+imp" is a flavour.
    base, _, flavour = (method, "", "") if method in method_names() else method.partition("+")
    out = WORK / name
    if reuse and (out / "quantization.json").exists():
        summary = json.loads((out / "quantization.json").read_text())["report"]
        return {"name": name, "method": method, "scheme": scheme, "path": str(out), "bpw": summary["linear_bpw"],
                "bytes_on_disk": sum(f.stat().st_size for f in out.iterdir()), "reused": True}
    cmd = [str(ROOT / ".venv" / "bin" / "lowbit"), "quantize", str(smollm2_gguf()), "-o", str(out), "--scheme",
           scheme, "--method", base, "--force", "--json", "--calib-windows", str(calib_windows)]
    if flavour == "mse":
        cmd += ["--observer", "mse"]
    if flavour == "imp":
        cmd += ["--observer", "mse", "--importance"]
    for o in options:
        cmd += ["--option", o]
    if base != "rtn" or flavour == "imp" or "act=int8-static" in options:
        cmd += ["--calib", calib or str(wikitext("valid"))]
    walls, cpus, rss = [], [], []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=os.environ | {"OMP_NUM_THREADS": str(THREADS)})
        stdout = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        walls.append(time.perf_counter() - t0)
        cpus.append(usage.ru_utime + usage.ru_stime)
        rss.append(usage.ru_maxrss / 1e6)
        if status != 0:
            raise SystemExit(f"{name}: `{' '.join(cmd)}` failed")
    rep = json.loads(stdout)
    return {"name": name, "method": method, "scheme": scheme, "path": str(out), "wall_s": statistics.median(walls),
            "walls_s": walls, "cpu_s": statistics.median(cpus),
            "peak_rss_gb": max(rss), "bpw": rep["bpw"], "bytes_on_disk": rep["bytes_on_disk"],
            "command": " ".join(cmd[1:]).replace(str(ROOT) + "/", "")}


def materialize(model: torch.nn.Module) -> torch.nn.Module:
    """Swap QLinear/QEmbedding for float layers holding their dequantized weights: the same function
    (bit-identical logits), without dequantizing on every forward — quality figures only, not speed."""
    from lowbit.model.qmodules import QEmbedding, QLinear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, QLinear | QEmbedding) and getattr(mod, "act_scheme", None) is None:
            w = mod.qweight.dequantize(torch.float32)
            if isinstance(mod, QLinear):
                new = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                new.weight.data, new.bias = w, mod.bias
            else:
                new = torch.nn.Embedding(*w.shape, padding_idx=mod.padding_idx)
                new.weight.data = w
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model.requires_grad_(False)


@torch.no_grad()
def evaluate_all(models: dict[str, torch.nn.Module], reference: torch.nn.Module, windows: torch.Tensor) -> dict:
    acc = {n: {"nll": [], "kl": [], "top1": []} for n in ["float32", *models]}
    for w in windows:
        ids = w.unsqueeze(0)
        ref_logits = reference(ids).logits[0, :-1]
        targets = w[1:]
        nll_r, logp_r = metrics.nll_and_logprobs(ref_logits, targets)
        acc["float32"]["nll"].append(nll_r)
        for n, m in models.items():
            logits = m(ids).logits[0, :-1]
            nll, logp = metrics.nll_and_logprobs(logits, targets)
            acc[n]["nll"].append(nll)
            acc[n]["kl"].append(metrics.kl_divergence(logp_r, logp))
            acc[n]["top1"].append((logits.argmax(-1) == ref_logits.argmax(-1)).double())
            del logp
        del logp_r
        print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    out = {}
    for n, a in acc.items():
        r = {"ppl": metrics.perplexity(torch.cat(a["nll"]))}
        if a["kl"]:
            kl = torch.cat(a["kl"])
            r |= {"kl_mean": float(kl.mean()), "kl_p99": metrics.quantile(kl, 0.99),
                  "top1": float(torch.cat(a["top1"]).mean())}
        out[n] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="*",
                    help="METHOD[+mse|+imp][~random][@KEY=VAL,...]:SCHEME, e.g. gptq:int4-g64, "
                         "gptq@act_order=true:int3-g64, rtn+imp~random:int4-g128")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--gguf", action="append", default=[], metavar="NAME=PATH", help="a GGUF made by another tool")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--keep", action="store_true", help="keep the quantized models in bench/.work")
    ap.add_argument("--reuse", action="store_true", help="evaluate models already in the work dir (no timing)")
    ap.add_argument("--repeats", type=int, default=1, help="quantize each config N times: median wall, max RSS")
    ap.add_argument("--time-only", action="store_true", help="quantize and time; skip the evaluation")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as BENCHMARK.md fixes)")
    a = ap.parse_args()
    global THREADS
    THREADS = a.threads
    torch.set_num_threads(a.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    runs = []
    for c in a.configs:
        spec, _, scheme = c.partition(":")
        method, _, opts = spec.partition("@")
        method, _, source = method.partition("~")
        name = f"{scheme}-{spec}".replace("=", "").replace(",", "-").replace("~", "-")
        runs.append(run_quantize(name, method, scheme, a.calib_windows, a.reuse, a.repeats,
                                 tuple(o for o in opts.split(",") if o), source or None))
        if "wall_s" in runs[-1]:
            print(f"quantized {name}: {runs[-1]['wall_s']:.0f} s wall, {runs[-1]['cpu_s']:.0f} s CPU, "
                  f"{runs[-1]['peak_rss_gb']:.2f} GB", file=sys.stderr)
    if a.time_only:
        print("| config | bpw | quantize s (median) | runs s | CPU s | peak RSS GB |\n|---|---|---|---|---|---|")
        for r in runs:
            print(f"| {r['name']} | {r['bpw']:.3f} | {r['wall_s']:.1f} | "
                  f"{' '.join(f'{w:.1f}' for w in r['walls_s'])} | {r['cpu_s']:.1f} | {r['peak_rss_gb']:.2f} |")
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps({"rows": runs, "torch": torch.__version__}, indent=2))
        return
    reference, tok = lowbit.load(smollm2_gguf())
    windows = token_windows(tok, read_text(wikitext("test")), a.windows, 512)
    models = {r["name"]: materialize(lowbit.load(r["path"])[0]) for r in runs}
    extra = {}
    for spec in a.gguf:
        n, _, p = spec.partition("=")
        models[n] = lowbit.load(p)[0]
        extra[n] = {"name": n, "path": p, "bytes_on_disk": Path(p).stat().st_size}
    quality = evaluate_all(models, reference, windows)
    rows = []
    for r in runs + list(extra.values()):
        q = quality[r["name"]]
        if "bpw" not in r:
            from lowbit.io.inspect import inspect_path, summarize

            # The blocks' linear layers only, as lowbit's linear_bpw counts (embeddings / head excluded).
            rows_ = [t for t in inspect_path(r["path"]) if len(t.shape) == 2 and t.name.startswith("blk.")]
            _, nbytes, _ = summarize(rows_)
            r["bpw"] = 8 * nbytes / sum(t.shape[0] * t.shape[1] for t in rows_)
        rows.append(r | q)
    print(f"\nSmolLM2-135M-Instruct · {a.windows} windows × 512 of wikitext2-test · float32 ppl "
          f"{quality['float32']['ppl']:.3f}")
    print("| model | bpw | ppl | KL mean | KL p99 | top-1 | quantize s (wall) | CPU s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        wall, rss = r.get("wall_s", float("nan")), r.get("peak_rss_gb", float("nan"))
        print(f"| {r['name']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} | "
              f"{100 * r['top1']:.1f}% | {wall:.0f} | {r.get('cpu_s', float('nan')):.0f} | {rss:.2f} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"float32": quality["float32"], "rows": rows, "windows": a.windows,
                                            "torch": torch.__version__}, indent=2))
    if not a.keep:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Task accuracy of SmolLM2-135M quantized models against float32 (issue 18).

    .venv/bin/python bench/tasks.py build            # examples/tasks/wikitext2-cloze.jsonl from WikiText-2 test
    .venv/bin/python bench/tasks.py run rtn:int8 gptq:int4-g64 awq+gptq:int4-g64 awq+gptq:int3-g64 \\
        --calib-windows 32 --items 300 [--json bench/results/tasks-cloze.json]

``build`` cuts the cloze multiple-choice set from the held-out WikiText-2 *test* split (calibration uses the
validation split). ``run`` quantizes each config with the real CLI (bench/quality.py's ``run_quantize``,
models reused from bench/.work when present), then scores float32 and every model with
``lowbit.eval.tasks.run_task`` / ``score_task`` on the same items (float32 run once):
acc / acc_norm, difference with a paired bootstrap 95% interval, flips. Quality is computed on the
dequantized weights (``materialize``: the reference kernels' function).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import lowbit
from lowbit.cli.assets import smollm2_gguf, wikitext
from lowbit.eval.cloze import cloze_items
from lowbit.eval.tasks import Task, TaskOptions, format_tasks, load_task, run_task, score_task
from lowbit.eval.windows import read_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import materialize, run_quantize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLOZE = ROOT / "examples" / "tasks" / "wikitext2-cloze.jsonl"
CLOZE_ITEMS = 500


def build(path: Path = CLOZE) -> Path:
    items = cloze_items(read_text(wikitext("test")), n=CLOZE_ITEMS, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("verb", choices=["build", "run"])
    ap.add_argument("configs", nargs="*", help="METHOD:SCHEME, e.g. gptq:int4-g64")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--items", type=int, default=300, help="the first N items of the cloze set")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.verb == "build":
        print(build())
        return
    torch.set_num_threads(a.threads)
    full = load_task(CLOZE)
    task = Task(full.name, full.path, full.kind, full.items[: a.items])
    reference, tok = lowbit.load(smollm2_gguf())
    opts = TaskOptions(batch_size=16)
    rows = []
    ref_out = run_task(reference, tok, task, opts)
    ref_only = score_task(task, ref_out, None, opts, "float32")
    print(format_tasks([ref_only]), flush=True)
    for c in a.configs:
        method, _, scheme = c.partition(":")
        name = f"{scheme}-{method}"
        q = run_quantize(name, method, scheme, a.calib_windows, reuse=True)
        model = materialize(lowbit.load(q["path"])[0])
        r = score_task(task, run_task(model, tok, task, opts), ref_out, opts, name)
        print(format_tasks([r]), flush=True)
        rows.append({"bpw": q["bpw"]} | r.to_dict() | {"model": name})
    if a.json:
        Path(a.json).write_text(json.dumps({"float32": ref_only.to_dict(), "rows": rows, "items": a.items,
                                            "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()

"""The shipped cloze set and lowbit's task accuracy on the real SmolLM2, against an independent computation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import lowbit
from lowbit.cli.assets import wikitext
from lowbit.eval.tasks import Task, eval_tasks, load_task

ROOT = Path(__file__).resolve().parents[2]
CLOZE = ROOT / "examples" / "tasks" / "wikitext2-cloze.jsonl"


def test_shipped_cloze_set_is_what_the_script_builds(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from tasks import build

    assert build(tmp_path / "c.jsonl").read_bytes() == CLOZE.read_bytes()
    calib = wikitext("valid").read_text()
    first = [json.loads(line) for line in CLOZE.read_text().splitlines()[:50]]
    assert not any(r["context"] in calib for r in first if len(r["context"]) > 60)  # held-out text, not calibration


def test_float_accuracy_matches_independent_loglikelihood(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = load_task(CLOZE)
    task = Task(full.name, full.path, full.kind, full.items[:40])
    model, tok = lowbit.load(smollm2_dir)
    [r] = eval_tasks(model, None, tok, [task])
    acc = {m.metric: m.model for m in r.metrics}

    # independently: plain transformers, one sequence at a time, context + " " + choice
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    htok = AutoTokenizer.from_pretrained(smollm2_dir)
    right = right_norm = 0
    for it in task.items:
        ctx = htok(it.context, add_special_tokens=False).input_ids
        scores = []
        for c in it.choices:
            ids = htok(it.context + " " + c, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
            scores.append(sum(logp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids))))
        right += max(range(len(scores)), key=scores.__getitem__) == it.answer
        norm = [s / len(c) for s, c in zip(scores, it.choices, strict=True)]
        right_norm += max(range(len(norm)), key=norm.__getitem__) == it.answer
    n = len(task.items)
    assert abs(100 * acc["acc"] - 100 * right / n) <= 0.5
    assert abs(100 * acc["acc_norm"] - 100 * right_norm / n) <= 0.5

"""Greedy generations of the reference and the quantized model side by side, earliest divergence first.

>>> rep = compare_generations(qmodel, model, tok, ["The river", "A bridge is"], max_new_tokens=8)
>>> len(rep.pairs), rep.pairs[0].diverge_at is None or rep.pairs[0].diverge_at <= 8
(2, True)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.eval.tasks import Record, TaskFileError, greedy
from lowbit.kernels import use_kernels


@dataclass(frozen=True)
class GenerationPair(Record):
    """One prompt: both outputs, and the first generated token where they differ (None: identical)."""

    prompt: str
    reference: str
    model: str
    diverge_at: int | None
    common: str  # the text both generated before diverging
    reference_token: str | None = None  # each model's token at the divergence ('' where one had stopped)
    model_token: str | None = None
    reference_ids: tuple[int, ...] = ()  # the generated token ids
    model_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationReport:
    """Pairs sorted by divergence (earliest first; identical outputs last, in prompt order)."""

    pairs: tuple[GenerationPair, ...]
    max_new_tokens: int

    @property
    def identical(self) -> int:
        return sum(p.diverge_at is None for p in self.pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "identical": self.identical,
                "pairs": [p.to_dict() for p in self.pairs]}


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a ``.jsonl`` file (``{"prompt": ...}`` per line) or a text file (one prompt per line)."""
    p = Path(path)
    if not p.is_file():
        raise TaskFileError(f"{p}: no such prompts file")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{p}:{n}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise TaskFileError(f"{p}:{n}: expected {{\"prompt\": \"...\"}}")
            line = rec["prompt"]
        out.append(line)
    if not out:
        raise TaskFileError(f"{p}: no prompts")
    return out


def compare_generations(model: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                        max_new_tokens: int = 32, chat: bool | None = None, kernels: str = "reference",
                        progress: bool = False) -> GenerationReport:
    """Greedy outputs of both models for each prompt (the chat template when the tokenizer has one)."""
    pairs = []
    with use_kernels(kernels):
        for prompt in tqdm(prompts, desc="generate", unit="prompt", disable=not progress, leave=False):
            r = greedy(reference, tokenizer, prompt, max_new_tokens, chat)
            q = greedy(model, tokenizer, prompt, max_new_tokens, chat)
            k = next((i for i, (a, b) in enumerate(zip(r, q, strict=False)) if a != b), min(len(r), len(q)))
            same = r == q
            dec = tokenizer.decode
            pairs.append(GenerationPair(
                prompt, dec(r, skip_special_tokens=True), dec(q, skip_special_tokens=True), None if same else k,
                dec(r[:k], skip_special_tokens=True), None if same else dec(r[k: k + 1]),
                None if same else dec(q[k: k + 1]), tuple(r), tuple(q)))
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i].diverge_at is None, pairs[i].diverge_at or 0, i))
    return GenerationReport(tuple(pairs[i] for i in order), max_new_tokens)


def format_generations(rep: GenerationReport, label: str = "model", width: int = 100) -> str:
    """Each prompt with both outputs and where they diverge, earliest divergence first."""
    def cut(s: str) -> str:
        s = " ".join(s.split())
        return s if len(s) <= width else s[: width - 1] + "…"

    lines = [f"generations (greedy, ≤ {rep.max_new_tokens} tokens): {rep.identical}/{len(rep.pairs)} identical; "
             f"earliest divergence first"]
    for p in rep.pairs:
        where = "identical" if p.diverge_at is None else (f"diverge at token {p.diverge_at}: "
                                                         f"{p.reference_token!r} vs {p.model_token!r}")
        lines += [f"prompt: {cut(p.prompt)}  ({where})", f"  reference : {cut(p.reference)}",
                  f"  {label[:10]:<10}: {cut(p.model)}"]
    return "\n".join(lines)

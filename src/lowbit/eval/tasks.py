"""Task accuracy on your own task files (JSONL, lm-evaluation-harness shapes), float vs quantized.

One registered :class:`TaskKind` per record shape; the kind is detected from each file's first record:

* ``mc``    ``{"context"|"question": str, "choices": [str, ...], "answer": i}`` — the choice with the highest
  summed log-likelihood (``acc``) or log-likelihood per character (``acc_norm``), as lm-eval scores it;
* ``gen``   ``{"prompt": str, "target": str, "match": "exact"|"contains"|"regex"}`` (``target``/``match``
  optional) — greedy output (the chat template when the tokenizer has one), scored against the target;
* ``pairs`` ``{"a": str, "b": str, "label": 0|1}`` (encoders) — cosine above a threshold (fitted on the
  reference) is "similar" (``acc``), and retrieval of each positive ``b`` from its ``a`` (``recall@1/5``).

Every kind also reports ``agree``: the model answers as the reference does. Differences come with a paired
bootstrap 95% interval and the items that flipped (right→wrong, wrong→right).

>>> import json
>>> _ = Path("mc.jsonl").write_text(json.dumps({"context": "The river", "choices": ["flows", "sings"], "answer": 0}))
>>> [r] = eval_tasks(qmodel, model, tok, ["mc.jsonl"])
>>> r.kind, r.n_items, [m.metric for m in r.metrics]
('mc', 1, ['acc', 'acc_norm', 'agree'])
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval import metrics
from lowbit.kernels import use_kernels
from lowbit.registry import Registry


class TaskFileError(LowbitError, ValueError):
    """A task file that cannot be read: the message names the file and line."""


class Record:
    """Frozen result/config dataclasses: ``to_dict`` is their fields, recursively (JSON-ready)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class TaskOptions(Record):
    """How tasks are run and scored. ``chat``: None = the chat template when the tokenizer has one."""

    batch_size: int = 16
    max_new_tokens: int = 32
    chat: bool | None = None
    match: str = "exact"  # for gen records without "match"
    threshold: float | None = None  # pairs: None = the threshold that is best on the reference
    bootstrap: int = 2000
    seed: int = 0
    kernels: str = "reference"
    progress: bool = False


@dataclass(frozen=True)
class Task:
    """A parsed task file: ``items`` are the kind's records, each with the line it came from."""

    name: str
    path: str
    kind: str
    items: tuple


@dataclass(frozen=True)
class MetricResult(Record):
    """One metric of one model against the reference: accuracies, paired difference, bootstrap 95% CI."""

    metric: str
    n: int
    model: float
    reference: float | None = None
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    right_to_wrong: tuple[int, ...] = ()
    wrong_to_right: tuple[int, ...] = ()


@dataclass(frozen=True)
class TaskResult:
    """A task's figures; ``answers`` / ``reference_answers``: each item's answer, as text, for the flips."""

    name: str
    kind: str
    label: str
    n_items: int
    metrics: tuple[MetricResult, ...]
    answers: tuple[str, ...] = ()
    reference_answers: tuple[str, ...] = ()
    lines: tuple[int, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "label": self.label, "n_items": self.n_items,
                "metrics": [m.to_dict() for m in self.metrics], "answers": list(self.answers),
                "reference_answers": list(self.reference_answers), "lines": list(self.lines)}


# -- kinds ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskKind:
    """``run(model, tok, items, opts) -> outputs`` (one per item); ``judge(items, outputs, ref_outputs, opts)
    -> {metric: [1.0 | 0.0 | None per item]}`` (``agree`` only with a reference); ``show(output)``: the
    answer as text."""

    name: str
    identify: Callable[[dict], bool]
    parse: Callable[[dict, str, int], Any]  # (record, "file:line", line)
    run: Callable[..., list]
    judge: Callable[..., dict[str, list[float | None]]]
    show: Callable[[Any], str]


KINDS: Registry[TaskKind] = Registry("task kind", TaskFileError)


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    answer: int
    line: int


@dataclass(frozen=True)
class GenItem:
    prompt: str
    target: str | None
    match: str | None
    until: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class PairItem:
    a: str
    b: str
    label: int
    line: int


def _field(rec: dict, key: str, kind: type | tuple, where: str) -> Any:
    v = rec.get(key)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
        raise TaskFileError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {v!r:.60}")
    return v


def _parse_mc(rec: dict, where: str, line: int) -> MCItem:
    ctx = rec.get("context", rec.get("question"))
    if not isinstance(ctx, str):
        raise TaskFileError(f"{where}: a multiple-choice record needs a \"context\" or \"question\" string")
    choices = _field(rec, "choices", list, where)
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskFileError(f"{where}: \"choices\" must be at least two non-empty strings")
    ans = _field(rec, "answer", int, where)
    if not 0 <= ans < len(choices):
        raise TaskFileError(f"{where}: \"answer\" {ans} is not an index into {len(choices)} choices")
    return MCItem(ctx, tuple(choices), ans, line)


def _parse_gen(rec: dict, where: str, line: int) -> GenItem:
    prompt = _field(rec, "prompt", str, where)
    target = rec.get("target")
    if target is not None and not isinstance(target, str):
        raise TaskFileError(f"{where}: \"target\" must be a string")
    match = rec.get("match")
    if match is not None:
        MATCHERS.get(match)
    if match == "regex":
        try:
            re.compile(target or "")
        except re.error as e:
            raise TaskFileError(f"{where}: bad regex {target!r}: {e}") from None
    until = rec.get("until", [])
    if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
        raise TaskFileError(f"{where}: \"until\" must be a list of non-empty strings")
    return GenItem(prompt, target, match, tuple(until), line)


def _parse_pair(rec: dict, where: str, line: int) -> PairItem:
    a, b = _field(rec, "a", str, where), _field(rec, "b", str, where)
    label = rec.get("label")
    if label not in (0, 1) or isinstance(label, bool):
        raise TaskFileError(f"{where}: \"label\" must be 0 or 1, got {label!r}")
    return PairItem(a, b, int(label), line)


# -- task files -----------------------------------------------------------------------------------
def load_task(path: str | os.PathLike) -> Task:
    """Read a JSONL task file (one JSON object per line; blank lines and ``#`` comments skipped).

    >>> _ = Path("bad.jsonl").write_text('{"prompt": "Hi"}\\n{"prompt": 3}\\n')
    >>> load_task("bad.jsonl")
    Traceback (most recent call last):
    lowbit.eval.tasks.TaskFileError: bad.jsonl:2: 'prompt' must be str, got 3
    """
    p = Path(path)
    if not p.is_file():
        raise TaskFileError(f"{p}: no such task file")
    kind: TaskKind | None = None
    items = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise TaskFileError(f"{p}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{p}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise TaskFileError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if kind is None:
            kind = next((k for k in KINDS.values() if k.identify(rec)), None)
            if kind is None:
                raise TaskFileError(f"{where}: unknown record shape (expected \"choices\" (mc), \"prompt\" (gen) "
                                    f"or \"a\"/\"b\"/\"label\" (pairs))")
        items.append(kind.parse(rec, where, n))
    if kind is None:
        raise TaskFileError(f"{p}: no records (one JSON object per line)")
    return Task(p.stem, str(p), kind.name, tuple(items))


# -- log-likelihood (mc) --------------------------------------------------------------------------
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's encoding: trailing spaces of the context move to the continuation, the continuation's tokens
    are those of ``context + continuation`` past the context's; an empty context starts from BOS/EOS."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    cont = whole[len(ctx):]
    if not ctx:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx = [start]
    return list(ctx), list(cont)


@torch.inference_mode()
def loglikelihoods(model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                   progress: bool = False) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), continuation is the greedy one)`` of each ``(context ids,
    continuation ids)``, batched longest first (right padding: causal attention never sees it)."""
    dev = next(model.parameters()).device
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 1 << 30
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    for a in tqdm(range(0, len(order), batch_size), desc="log-likelihood", unit="batch", disable=not progress,
                  leave=False):
        idx = order[a: a + batch_size]
        seqs = [(requests[i][0] + requests[i][1])[-(max_len + 1):][:-1] for i in idx]  # inputs: all but the last
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits  # (B, T, V)
        for r, i in enumerate(idx):
            cont = requests[i][1]
            end = len(seqs[r])
            lp = metrics.log_probs(logits[r, end - len(cont): end])  # (c, V) float64
            tgt = torch.tensor(cont, device=lp.device)
            out[i] = (float(lp.gather(-1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))
    return out  # type: ignore[return-value]


def _run_mc(model, tok, items: Sequence[MCItem], opts: TaskOptions) -> list[tuple[float, ...]]:
    reqs = [encode_pair(tok, it.context, " " + c) for it in items for c in it.choices]
    ll = loglikelihoods(model, reqs, opts.batch_size, opts.progress)
    out, k = [], 0
    for it in items:
        out.append(tuple(x for x, _ in ll[k: k + len(it.choices)]))
        k += len(it.choices)
    return out


def _argmax(v: Sequence[float]) -> int:
    return max(range(len(v)), key=v.__getitem__)


def _mc_picks(items, outputs) -> tuple[list[int], list[int]]:
    raw = [_argmax(o) for o in outputs]
    norm = [_argmax([x / len(c) for x, c in zip(o, it.choices, strict=True)]) for it, o in zip(items, outputs,
                                                                                                strict=True)]
    return raw, norm


def _judge_mc(items, outputs, ref_outputs, opts) -> dict[str, list[float | None]]:
    raw, norm = _mc_picks(items, outputs)
    res = {"acc": [float(p == it.answer) for p, it in zip(raw, items, strict=True)],
           "acc_norm": [float(p == it.answer) for p, it in zip(norm, items, strict=True)]}
    if ref_outputs is not None:
        res["agree"] = [float(a == b) for a, b in zip(raw, _mc_picks(items, ref_outputs)[0], strict=True)]
    return res


# -- generation (gen) -----------------------------------------------------------------------------
MATCHERS: Registry[Callable[[str, str], bool]] = Registry("match", TaskFileError)
MATCHERS.add("exact", lambda out, tgt: out.strip() == tgt.strip())
MATCHERS.add("contains", lambda out, tgt: tgt.strip().casefold() in out.casefold())
MATCHERS.add("regex", lambda out, tgt: re.search(tgt, out) is not None)


def prompt_ids(tokenizer: Any, prompt: str, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt: through the chat template (a user turn + the generation prompt) when ``chat``
    is True, or None and the tokenizer has one; else the plain text with the tokenizer's special tokens."""
    if chat or (chat is None and getattr(tokenizer, "chat_template", None)):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True)
        return list(enc["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


@torch.inference_mode()
def greedy(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32,
           chat: bool | None = None) -> list[int]:
    """The greedy continuation's token ids (stopping at EOS, which is not included), through lowbit's runtime
    where it runs the model (:mod:`lowbit.runtime`), else transformers' ``generate``."""
    from lowbit.runtime import generate, unsupported

    dev = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, prompt, chat)], device=dev)
    eos = tokenizer.eos_token_id
    if unsupported(model) is None:  # lowbit's runtime: the same greedy tokens, without transformers' overhead
        outp = generate(model, ids, max_new_tokens, eos_token_id=eos)
        new = outp[0, ids.shape[1]:].tolist()
        return new[: new.index(eos)] if eos in new else new
    outp = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                          eos_token_id=eos, top_p=None, top_k=None, temperature=None)
    new = outp[0, ids.shape[1]:].tolist()
    return new[: new.index(eos)] if eos in new else new


def _run_gen(model, tok, items: Sequence[GenItem], opts: TaskOptions) -> list[tuple[list[int], str]]:
    out = []
    for it in tqdm(items, desc="generate", unit="prompt", disable=not opts.progress, leave=False):
        ids = greedy(model, tok, it.prompt, opts.max_new_tokens, opts.chat)
        text = tok.decode(ids, skip_special_tokens=True)
        for stop in it.until:
            text = text.split(stop, 1)[0]
        out.append((ids, text.strip()))
    return out


def _judge_gen(items, outputs, ref_outputs, opts) -> dict[str, list[float | None]]:
    res: dict[str, list[float | None]] = {}
    if any(it.target is not None for it in items):
        res["match"] = [None if it.target is None else float(MATCHERS.get(it.match or opts.match)(o[1], it.target))
                        for it, o in zip(items, outputs, strict=True)]
    if ref_outputs is not None:
        res["agree"] = [float(a[1] == b[1]) for a, b in zip(outputs, ref_outputs, strict=True)]
    return res


# -- encoders (pairs) -----------------------------------------------------------------------------
def _run_pairs(model, tok, items: Sequence[PairItem], opts: TaskOptions) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from lowbit.eval.harness import _embed, encoder_batches

    a = _embed(model, encoder_batches(tok, [it.a for it in items], opts.batch_size), opts.progress, "a")
    b = _embed(model, encoder_batches(tok, [it.b for it in items], opts.batch_size), opts.progress, "b")
    return list(zip(a, b, strict=True))


def best_threshold(cos: torch.Tensor, labels: torch.Tensor) -> float:
    """The cosine threshold (midway between neighbours) with the highest accuracy of ``cos > t``.

    >>> best_threshold(torch.tensor([0.9, 0.8, 0.3, 0.1]), torch.tensor([1, 1, 0, 0]))
    0.55
    """
    s = torch.sort(cos.double()).values
    cands = torch.cat([s[:1] - 1, (s[1:] + s[:-1]) / 2, s[-1:] + 1])
    acc = ((cos.double()[None, :] > cands[:, None]) == labels.bool()[None, :]).double().mean(-1)
    return round(float(cands[int(acc.argmax())]), 6)


def _judge_pairs(items, outputs, ref_outputs, opts) -> dict[str, list[float | None]]:
    labels = torch.tensor([it.label for it in items])

    def cosines(outs):
        return metrics.cosine_rows(torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs]))

    cos = cosines(outputs)
    t = opts.threshold if opts.threshold is not None else best_threshold(
        cosines(ref_outputs if ref_outputs is not None else outputs), labels)
    res: dict[str, list[float | None]] = {"acc": [
        float((c > t) == bool(lab)) for c, lab in zip(cos.tolist(), labels.tolist(), strict=True)]}
    A = torch.nn.functional.normalize(torch.stack([o[0] for o in outputs]).double(), dim=-1)
    B = torch.nn.functional.normalize(torch.stack([o[1] for o in outputs]).double(), dim=-1)
    rank = (A @ B.T > (A * B).sum(-1, keepdim=True)).sum(-1)  # (N,) others scoring above the item's own b
    for k in (1, 5):
        res[f"recall@{k}"] = [float(r < k) if lab else None
                              for r, lab in zip(rank.tolist(), labels.tolist(), strict=True)]
    if ref_outputs is not None:
        ref_cos = cosines(ref_outputs)
        res["agree"] = [float((c > t) == (r > t)) for c, r in zip(cos.tolist(), ref_cos.tolist(), strict=True)]
    return res


KINDS.add("mc", TaskKind("mc", lambda r: "choices" in r, _parse_mc, _run_mc, _judge_mc,
                         lambda o: str(_argmax(o))))
KINDS.add("gen", TaskKind("gen", lambda r: "prompt" in r, _parse_gen, _run_gen, _judge_gen, lambda o: o[1]))
KINDS.add("pairs", TaskKind("pairs", lambda r: "a" in r and "b" in r, _parse_pair, _run_pairs, _judge_pairs,
                            lambda o: f"{float(metrics.cosine_rows(o[0][None], o[1][None])):.4f}"))


# -- statistics -----------------------------------------------------------------------------------
def paired_bootstrap(model: Sequence[float], reference: Sequence[float], n: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean difference ``model − reference`` over paired items and its bootstrap 95% interval (items resampled
    with replacement, seeded).

    >>> d, lo, hi = paired_bootstrap([1, 1, 0, 1] * 25, [1, 0, 0, 1] * 25)
    >>> d, lo < d < hi
    (0.25, True)
    """
    q = torch.tensor(model, dtype=torch.float64)
    r = torch.tensor(reference, dtype=torch.float64)
    d = q - r
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(d), (n, len(d)), generator=g)
    means = d[idx].mean(-1)
    return float(d.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


def _metric(name: str, q: list[float | None], r: list[float | None] | None, opts: TaskOptions) -> MetricResult:
    keep = [i for i, v in enumerate(q) if v is not None and (r is None or r[i] is not None)]
    mq = sum(q[i] for i in keep) / max(1, len(keep))  # type: ignore[misc]
    if r is None or name == "agree":
        return MetricResult(name, len(keep), mq)
    mr = sum(r[i] for i in keep) / max(1, len(keep))  # type: ignore[misc]
    d, lo, hi = paired_bootstrap([q[i] for i in keep], [r[i] for i in keep], opts.bootstrap, opts.seed) \
        if keep else (0.0, 0.0, 0.0)
    return MetricResult(name, len(keep), mq, mr, d, lo, hi,
                        tuple(i for i in keep if r[i] and not q[i]), tuple(i for i in keep if q[i] and not r[i]))


# -- running --------------------------------------------------------------------------------------
def eval_tasks(model: torch.nn.Module, reference: torch.nn.Module | None = None, tokenizer: Any = None,
               tasks: Sequence[str | os.PathLike | Task] = (), options: TaskOptions | None = None,
               label: str = "model") -> list[TaskResult]:
    """Score ``model`` (and ``reference``, on identical inputs) on each task file; see the module docstring."""
    opts = options or TaskOptions()
    if tokenizer is None:
        raise LowbitError("eval_tasks: a tokenizer is needed (pass tokenizer=...)")
    loaded = [t if isinstance(t, Task) else load_task(t) for t in tasks]  # every file checked before any model runs
    results = []
    states = [(m, m.training) for m in (model, reference) if m is not None]
    try:
        for m, _ in states:
            m.eval()
        with use_kernels(opts.kernels):
            for task in loaded:
                outs = run_task(model, tokenizer, task, opts)
                ref_outs = None if reference is None else run_task(reference, tokenizer, task, opts)
                results.append(score_task(task, outs, ref_outs, opts, label))
    finally:
        for m, was in states:
            m.train(was)
    return results


def run_task(model: torch.nn.Module, tokenizer: Any, task: Task, options: TaskOptions | None = None) -> list:
    """One model's raw outputs on a task (kept to score several models against one reference run)."""
    opts = options or TaskOptions()
    with use_kernels(opts.kernels):
        return KINDS.get(task.kind).run(model.eval(), tokenizer, task.items, opts)


def score_task(task: Task, outputs: list, ref_outputs: list | None = None, options: TaskOptions | None = None,
               label: str = "model") -> TaskResult:
    """Score outputs of :func:`run_task` (and the reference's, on the same items) into a :class:`TaskResult`."""
    opts = options or TaskOptions()
    kind = KINDS.get(task.kind)
    scores = kind.judge(task.items, outputs, ref_outputs, opts)
    ref_scores = None if ref_outputs is None else kind.judge(task.items, ref_outputs, None, opts)
    ms = tuple(_metric(k, v, None if ref_scores is None else ref_scores.get(k), opts) for k, v in scores.items())
    return TaskResult(task.name, task.kind, label, len(task.items), ms, tuple(kind.show(o) for o in outputs),
                      () if ref_outputs is None else tuple(kind.show(o) for o in ref_outputs),
                      tuple(it.line for it in task.items))


def format_tasks(results: Sequence[TaskResult], flips: int = 5) -> str:
    """A table: per task and metric, reference and model accuracy, difference [95% CI], flips."""
    lines = ["task             metric     n     reference  model    Δ (95% CI)                  right→wrong  "
             "wrong→right"]
    for r in results:
        for m in r.metrics:
            ref = "–" if m.reference is None else f"{100 * m.reference:.1f}%"
            delta = "–" if m.delta is None else (f"{100 * m.delta:+.1f} [{100 * m.ci_low:+.1f}, "
                                                  f"{100 * m.ci_high:+.1f}]")
            rw = "–" if m.reference is None else str(len(m.right_to_wrong))
            wr = "–" if m.reference is None else str(len(m.wrong_to_right))
            lines.append(f"{r.name[:16]:<16} {m.metric:<10} {m.n:<5} {ref:<10} {100 * m.model:.1f}%".ljust(51)
                         + f"  {delta:<27} {rw:<12} {wr}")
        head = r.metrics[0] if r.metrics else None
        if flips and head is not None and head.right_to_wrong:
            shown = ", ".join(f"line {r.lines[i]} ({r.reference_answers[i]!r:.30} → {r.answers[i]!r:.30})"
                              for i in head.right_to_wrong[:flips])
            lines.append(f"  {r.name} right→wrong: {shown}")
    return "\n".join(lines)

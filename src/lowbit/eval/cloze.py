"""A cloze multiple-choice task cut from plain text, deterministically: each item is a sentence up to one of
its later words; the choices are that word and words taken from other items (same seed, same file).

>>> from lowbit.eval.windows import read_text
>>> items = cloze_items(read_text("held_out.txt"), n=3, seed=0)
>>> len(items), sorted(items[0]), len(items[0]["choices"])
(3, ['answer', 'choices', 'context'], 4)
"""

from __future__ import annotations

import random
import re

WIKITEXT_FIXES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" 's", "'s"), (" n't", "n't"))
_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]'])")
_SPACE_AFTER = re.compile(r"([(\[]) ")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
_WORD = re.compile(r"[A-Za-z]{5,}")


def detokenize(line: str) -> str:
    """WikiText's spaced punctuation back to plain text (``"a @-@ b , c"`` -> ``"a-b, c"``)."""
    for a, b in WIKITEXT_FIXES:
        line = line.replace(a, b)
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", line)).strip()


def _sentences(text: str, min_words: int, max_words: int) -> list[str]:
    out = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("="):
            continue
        for sent in _SENTENCE.split(detokenize(s)):
            if min_words <= len(sent.split()) <= max_words and '"' not in sent and "<unk>" not in sent:
                out.append(sent)
    return out


def cloze_items(text: str, n: int = 300, n_choices: int = 4, seed: int = 0, min_words: int = 12,
                max_words: int = 40) -> list[dict]:
    """``n`` records ``{"context", "choices", "answer"}``: the first ``n`` usable sentences of ``text`` (in
    order, spread over the text), each cut before a word of 5+ letters in its second half; distractors are
    target words of other items (a seeded draw), so every choice is a plausible word of the same text."""
    sents = _sentences(text, min_words, max_words)
    rng = random.Random(seed)
    step = max(1, len(sents) // max(1, 2 * n))
    cut = []
    for s in sents[::step]:
        words = s.split()
        cands = [i for i in range(len(words) // 2, len(words)) if _WORD.fullmatch(words[i].rstrip(",.;:!?"))]
        if not cands:
            continue
        i = cands[rng.randrange(len(cands))]
        cut.append((" ".join(words[:i]), words[i].rstrip(",.;:!?")))
    pool = sorted({w for _, w in cut})
    items = []
    for ctx, word in cut[:n]:
        others = rng.sample([w for w in pool if w.lower() != word.lower()], n_choices - 1)
        answer = rng.randrange(n_choices)
        items.append({"context": ctx, "choices": others[:answer] + [word] + others[answer:], "answer": answer})
    return items

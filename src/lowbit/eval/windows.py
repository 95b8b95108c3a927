"""Evaluation text → identical token windows for every model compared.

The protocol (BENCHMARK.md): tokenise the whole text as one string with the model's tokenizer, no added
special tokens, cut it into non-overlapping windows of ``window_len`` tokens, keep the first ``n``.

>>> windows = token_windows(tok, read_text("held_out.txt"), n_windows=4, window_len=128)
>>> windows.shape, windows.dtype
(torch.Size([4, 128]), torch.int64)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError


class EvalDataError(LowbitError, ValueError):
    """Evaluation text or windows that cannot be used (missing file, too little text, bad shape)."""


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file for evaluation, with a one-line error for a missing, empty or binary file.

    >>> read_text("held_out.txt")[:20]
    'The market opens bef'
    """
    p = Path(path)
    if not p.exists():
        raise EvalDataError(f"{p}: no such text file")
    if not p.is_file():
        raise EvalDataError(f"{p}: not a regular file (expected a UTF-8 text file)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None
    if not text.strip():
        raise EvalDataError(f"{p}: the file is empty (no text to evaluate on)")
    return text


def join_text(text: str | list[str] | tuple[str, ...]) -> str:
    """One string from a string or a list of documents (joined with a blank line)."""
    if isinstance(text, str):
        return text
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return "\n\n".join(text)
    raise EvalDataError(f"evaluation text must be a str or a list of str, got {type(text).__name__}")


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as one string, without special tokens (BOS/EOS/CLS/SEP)."""
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = enc["input_ids"]
    return [int(i) for i in ids]


def token_windows(
    tokenizer: Any,
    text: str | list[str],
    n_windows: int | None,
    window_len: int = 512,
) -> torch.Tensor:
    """Non-overlapping windows ``(n, window_len)`` (int64) of the tokenised text; ``n_windows=None``: all.

    >>> token_windows(tok, "the cat sat on the mat " * 100, n_windows=2, window_len=64).shape
    torch.Size([2, 64])
    """
    if not isinstance(window_len, int) or window_len < 2:
        raise EvalDataError(f"window_len must be an integer >= 2, got {window_len!r}")
    if n_windows is not None and (not isinstance(n_windows, int) or n_windows < 1):
        raise EvalDataError(f"number of windows must be a positive integer or None (all), got {n_windows!r}")
    ids = tokenize(tokenizer, join_text(text))
    available = len(ids) // window_len
    n = available if n_windows is None else n_windows
    if available == 0 or n > available:
        want = "at least 1" if n_windows is None else str(n_windows)
        raise EvalDataError(
            f"text gives {len(ids)} tokens = {available} windows of {window_len}; {want} requested "
            f"(use fewer windows, a shorter window_len or more text)"
        )
    t = torch.tensor(ids[: n * window_len], dtype=torch.long)
    return t.reshape(n, window_len)  # (n, L)


RANDOM_CALIB = "random"  # the calibration source name for data-free statistics


def is_random_calib(calib: Any) -> bool:
    """True for the ``"random"`` calibration source (a file of that name, if one exists, is read instead)."""
    return isinstance(calib, str) and calib == RANDOM_CALIB and not Path(calib).exists()


def random_windows(tokenizer: Any, n_windows: int, window_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``(n, window_len)`` token ids drawn uniformly (seeded) from the tokenizer's regular vocabulary, special
    tokens left out: calibration statistics without any user data. Which channels of a transformer carry large
    activations is mostly a property of the weights, not of the text, so E[x²] from random tokens still tells
    the important input channels apart (bench/RESULTS.md has the figures).

    >>> w = random_windows(tok, 2, 8)
    >>> w.shape, bool(torch.isin(w, torch.tensor(tok.all_special_ids)).any())
    (torch.Size([2, 8]), False)
    """
    if not isinstance(n_windows, int) or n_windows < 1 or not isinstance(window_len, int) or window_len < 2:
        raise EvalDataError(f"random calibration needs windows >= 1 and window_len >= 2, got {n_windows} × "
                            f"{window_len}")
    size = getattr(tokenizer, "vocab_size", None)
    if not isinstance(size, int) or size < 2:
        raise EvalDataError("random calibration needs a tokenizer with a vocabulary size")
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if 0 <= int(i) < size}
    keep = torch.ones(size, dtype=torch.bool)
    keep[sorted(special)] = False
    pool = keep.nonzero().flatten()
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (n_windows, window_len), generator=g)]


def check_windows(tokens: torch.Tensor) -> torch.Tensor:
    """Validate pre-tokenised windows: an integer tensor ``(n, L)`` with ``n >= 1``, ``L >= 2``."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        shape = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise EvalDataError(f"token windows must be an integer tensor (n, L), got {shape}")
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise EvalDataError(f"token windows must have n >= 1 windows of L >= 2 tokens, got {list(tokens.shape)}")
    return tokens.long()


_HEADING = re.compile(r"^\s*=.*=\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentences(text: str | list[str], n: int, min_words: int = 6, max_words: int = 64) -> list[str]:
    """The first ``n`` sentences of the text (headings skipped, ``min_words``..``max_words`` words each).

    WikiText's tokenised spacing (``" @-@ "``, ``" , "``) is kept: every model sees the same strings.

    >>> sentences("= Title =\\nThe cat sat on the red mat . It was very happy there today .", 2, min_words=3)
    ['The cat sat on the red mat .', 'It was very happy there today .']
    """
    out: list[str] = []
    for line in join_text(text).splitlines():
        if not line.strip() or _HEADING.match(line):
            continue
        for s in _SENTENCE_END.split(line.strip()):
            words = s.split()
            if min_words <= len(words) <= max_words:
                out.append(" ".join(words))
                if len(out) == n:
                    return out
    if len(out) < 2:
        raise EvalDataError(f"text gives {len(out)} sentences of {min_words}..{max_words} words; need at least 2")
    return out

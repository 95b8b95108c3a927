"""Errors lowbit raises for bad input: one clear line naming the thing at fault."""


class LowbitError(Exception):
    """Base of every user-facing error. The CLI prints ``error: <message>`` and exits 2."""


class SchemeError(LowbitError, ValueError):
    """A scheme string or dict that cannot be parsed."""


class CheckpointError(LowbitError):
    """A lowbit checkpoint that is missing, truncated, tampered with or of an unknown version."""


class WeightsFileError(LowbitError, ValueError):
    """A weights file (safetensors, GGUF) that is missing, of an unknown kind, truncated or corrupt."""


def first_line(e: BaseException, typed: bool = False) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors;
    ``typed`` puts the type's name in front (``KeyError: 'x'``)."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text.splitlines()[0]}" if typed else text.splitlines()[0]

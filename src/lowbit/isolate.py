"""``run_isolated``: run native code that may crash (llama.cpp, onnxruntime) in a child process.

A segfault, an abort or a hang inside a native runtime would otherwise take the whole Python process
with it (a CLI run, or a test suite mid-way). In a child it becomes one :class:`ChildFailed` error
naming what was running and how it ended:

>>> import os
>>> run_isolated(os.getpid, what="a harmless call") != os.getpid()
True

Children are forked from a fork server (started once, fresh, never having run OpenMP or torch ops:
forking the calling process could deadlock a child on the caller's OpenMP thread pool), so a call costs
milliseconds once the server is up. ``fn`` and its arguments must be picklable (module-level functions).
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from lowbit.errors import LowbitError

T = TypeVar("T")

# The fork server imports lowbit once (torch included), so each child starts with it loaded.
_PRELOAD = ["lowbit.isolate"]


class ChildFailed(LowbitError):
    """The child process crashed (a signal), exited without an answer, or did not answer in time."""


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _child(conn, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        result = (True, fn(*args, **kwargs))
    except BaseException as e:  # everything goes back to the parent
        tb = traceback.format_exc()
        try:
            pickle.dumps(e)
            result = (False, (e, tb))
        except Exception:  # an unpicklable exception travels as text
            result = (False, (RuntimeError(f"{type(e).__name__}: {e}"), tb))
    conn.send(result)
    conn.close()


def _ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode} before answering"


def run_isolated(fn: Callable[..., T], *args: Any, what: str, timeout: float = 600.0, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a child process: its result, or :class:`ChildFailed` naming ``what``.

    An exception raised by ``fn`` is raised again here, as itself, with the child's traceback as a note.
    A crash ("… was killed by SIGSEGV"), an exit without an answer, or no answer within ``timeout``
    seconds (the child is then killed) raises :class:`ChildFailed`.
    """
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, kwargs), daemon=True)
    proc.start()
    send.close()  # the child holds the only writing end now: EOF when it dies
    try:
        if not recv.poll(timeout):
            proc.kill()
            raise ChildFailed(f"{what}: no answer after {timeout:g} s (the child process was killed)")
        try:
            ok, value = recv.recv()
        except EOFError:
            proc.join(10)
            raise ChildFailed(f"{what}: the child process {_ended(proc.exitcode)}") from None
    finally:
        recv.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if ok:
        return value
    exc, tb = value
    exc.add_note(f"(raised in a child process running {what})\n{tb}")
    raise exc

"""Evaluation (DESIGN.md layer 6): quality, size, speed and memory on identical token windows.

>>> from lowbit.eval import evaluate, format_table, read_text
>>> r = evaluate(qmodel, reference=model, tokenizer=tok, text=read_text("held_out.txt"), windows=2, window_len=64,
...              speed=False)   # speed=True also times both models
>>> print(format_table([r]))  # doctest: +ELLIPSIS
2 windows × 64 tokens
model             size      bpw    ppl     Δppl    KL mean   KL p99    top-1
reference         4.6 MB    32.00  316.49  –       –         –         –
LlamaForCausalLM  670.9 kB  4.68   ...%
LlamaForCausalLM worst windows: ...
"""

from lowbit.eval.harness import evaluate
from lowbit.eval.report import format_table, write_report
from lowbit.eval.result import EvalResult, WorstWindow
from lowbit.eval.size import SizeInfo, model_size
from lowbit.eval.speed import SpeedInfo, measure_speed
from lowbit.eval.windows import EvalDataError, read_text, sentences, token_windows

__all__ = [
    "EvalDataError", "EvalResult", "SizeInfo", "SpeedInfo", "WorstWindow", "evaluate", "format_table",
    "measure_speed", "model_size", "read_text", "sentences", "token_windows", "write_report",
]

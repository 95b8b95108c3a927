"""lm-evaluation-harness on lowbit models: ``lm_eval --model lowbit --model_args pretrained=DIR --tasks ...``.

``pip install lowbit[lm-eval]``; then ``import lowbit.eval.lm_eval_adapter`` (or ``--include_path`` a file
that imports it) registers :class:`LowbitLM` as lm-eval's ``lowbit`` model. ``pretrained`` is anything
``lowbit.load`` takes: a lowbit directory, a Hugging Face folder or hub id, a ``.gguf`` file. Without lm-eval
installed the class still works on any objects with lm-eval's ``.args`` (what ``LM`` methods receive).

>>> from collections import namedtuple
>>> Req = namedtuple("Req", "args")
>>> lm = LowbitLM(model=qmodel, tokenizer=tok)
>>> [(round(ll, 2) < 0, greedy) for ll, greedy in lm.loglikelihood([Req(("The river", " leaves"))])]
[(True, False)]
"""

from __future__ import annotations

from typing import Any

from lowbit.eval.tasks import encode_pair, greedy, loglikelihoods
from lowbit.kernels import use_kernels

try:  # lm-eval is optional: the adapter subclasses its LM when it is installed
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model as _register
except ImportError:  # pragma: no cover - depends on the environment
    _Base, _register = object, None


class LowbitLM(_Base):  # type: ignore[misc, valid-type]
    """lm-eval's three request types on a lowbit model, with lowbit's batched log-likelihood."""

    def __init__(self, pretrained: str | None = None, model: Any = None, tokenizer: Any = None,
                 batch_size: int | str = 16, max_gen_toks: int = 256, kernels: str = "reference", **_: Any) -> None:
        if _Base is not object:
            super().__init__()
        if model is None:
            import lowbit

            model, tokenizer = lowbit.load(pretrained)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks, self.kernels = int(max_gen_toks), kernels

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(context, continuation)`` → ``(sum log p(continuation), greedy)``."""
        reqs = [encode_pair(self.tokenizer, *r.args[:2]) for r in requests]
        with use_kernels(self.kernels):
            return loglikelihoods(self.model, reqs, self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """``(text,)`` → log-likelihood of the whole text, in windows of the model's context, each token
        predicted once (the first from BOS/EOS)."""
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        max_len = getattr(self.model.config, "max_position_embeddings", 2048)
        out = []
        for r in requests:
            ids = [start] + tok(r.args[0], add_special_tokens=False)["input_ids"]
            # windows: context = up to max_len - n earlier tokens, continuation = the next n tokens
            reqs = [(ids[max(0, a - 1 - max_len + len(ids[a: a + max_len])): a], ids[a: a + max_len])
                    for a in range(1, len(ids), max_len)]  # inputs: ≤ max_len tokens, ≥ 1 of context
            with use_kernels(self.kernels):
                out.append(sum(ll for ll, _ in loglikelihoods(self.model, reqs, self.batch_size)))
        return out

    def generate_until(self, requests) -> list[str]:
        """``(context, {"until": [...], "max_gen_toks": n})`` → greedy text, cut at the first stop string."""
        out = []
        for r in requests:
            ctx, kw = r.args[0], (r.args[1] if len(r.args) > 1 else {}) or {}
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            with use_kernels(self.kernels):
                ids = greedy(self.model, self.tokenizer, ctx, int(kw.get("max_gen_toks", self.max_gen_toks)),
                             chat=False)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop, 1)[0]
            out.append(text)
        return out


if _register is not None:  # pragma: no cover - depends on the environment
    _register("lowbit")(LowbitLM)

"""Quality metrics: pure functions on tensors, computed in float64.

Causal LMs compare next-token distributions position by position; encoders compare sentence embeddings.

>>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
>>> kl_divergence(log_probs(logits), log_probs(logits)).tolist()
[0.0, 0.0]
"""

from __future__ import annotations

import math

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax over the last dimension: ``(..., V) -> (..., V)``."""
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def nll_and_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of ``targets`` and the full log-probs, in float64.

    ``logits`` ``(T, V)`` are the predictions for ``targets`` ``(T,)`` (already shifted: row t predicts
    targets[t]). Returns ``(nll (T,), logp (T, V))``.

    >>> nll, logp = nll_and_logprobs(torch.zeros(1, 4), torch.tensor([2]))
    >>> round(nll.item(), 6) == round(math.log(4), 6)
    True
    """
    logp = log_probs(logits)  # (T, V)
    nll = -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (T,)
    return nll, logp


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean negative log-likelihood) over every position given.

    >>> round(perplexity(torch.full((10,), math.log(7.0), dtype=torch.float64)), 9)
    7.0
    """
    return math.exp(nll.to(torch.float64).mean().item())


def kl_divergence(logp_ref: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_q) per position from log-probs ``(T, V)`` → ``(T,)`` float64, nats.

    Terms with p_ref = 0 contribute 0; p_q = 0 where p_ref > 0 gives +inf (as it should).
    """
    a, b = logp_ref.to(torch.float64), logp_q.to(torch.float64)
    p = a.exp()
    kl = torch.linalg.vecdot(p, a) - torch.linalg.vecdot(p, b)  # Σ p log p − Σ p log q, no (T, V) temporaries
    bad = ~torch.isfinite(kl)  # rows with -inf log-probs: 0 · (−inf) = nan above; redo them term by term
    if bad.any():
        ab, bb, pb = a[bad], b[bad], p[bad]
        kl[bad] = (pb * torch.where(pb > 0, ab - bb, torch.zeros_like(ab))).sum(-1)
    return kl.clamp_min(0.0)  # tiny negative rounding → 0


def kl_topk(
    topk_idx: torch.Tensor,
    topk_logp_ref: torch.Tensor,
    logp_q: torch.Tensor,
) -> torch.Tensor:
    """KL of the reference's top-k tokens plus one "all other tokens" bucket: ``(T,)`` float64.

    ``topk_idx`` ``(T, k)`` and ``topk_logp_ref`` ``(T, k)`` describe the reference's k most likely tokens;
    ``logp_q`` ``(T, V)`` is the full quantized distribution. Merging tokens never increases KL (log-sum
    inequality), so this is a lower bound of :func:`kl_divergence`, exact when the top-k hold all the
    reference's mass.

    >>> lp, lq = log_probs(torch.tensor([[3.0, 1.0, 0.0, -2.0]])), log_probs(torch.tensor([[1.0, 2.0, 0.0, 0.0]]))
    >>> all_tokens = torch.arange(4).unsqueeze(0)  # k = V: exact
    >>> torch.allclose(kl_topk(all_tokens, lp, lq), kl_divergence(lp, lq))
    True
    """
    a = topk_logp_ref.to(torch.float64)  # (T, k)
    lq = logp_q.to(torch.float64)  # (T, V)
    idx = topk_idx.long()
    b = lq.gather(-1, idx)  # (T, k)
    p = a.exp()
    head = (p * torch.where(p > 0, a - b, torch.zeros_like(a))).sum(-1)
    # the rest bucket: q's mass summed exactly (no 1 - Σ cancellation); p's from the stored top-k
    log_q_rest = torch.logsumexp(lq.scatter(-1, idx, -math.inf), dim=-1)  # (T,)
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    keep = (p_rest > 0) & torch.isfinite(log_q_rest)  # an empty bucket (k = V) contributes nothing
    rest = torch.where(keep, p_rest * (torch.log(p_rest.clamp_min(1e-300)) - log_q_rest), torch.zeros_like(p_rest))
    return (head + rest).clamp_min(0.0)


def quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile (0..1) of all values, linear interpolation, float64.

    >>> quantile(torch.arange(101.0), 0.99)
    99.0
    """
    v = values.reshape(-1).to(torch.float64).sort().values
    if v.numel() == 0:
        return float("nan")
    pos = q * (v.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return (v[lo] + (v[hi] - v[lo]) * (pos - lo)).item()


def kl_summary(kl: torch.Tensor) -> tuple[float, float]:
    """(mean, 99th percentile) of per-position KL values."""
    return kl.to(torch.float64).mean().item(), quantile(kl, 0.99)


def top1_matches(logits_ref: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per position, whether both models' most likely next token agree: ``(T, V), (T, V) -> (T,) bool``."""
    return logits_ref.argmax(-1) == logits_q.argmax(-1)


def top1_agreement(logits_ref: torch.Tensor, logits_q: torch.Tensor) -> float:
    """Fraction (0..1) of positions where the argmax of both models agree.

    >>> top1_agreement(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[0.0, 5.0], [0.0, 1.0]]))
    0.5
    """
    return top1_matches(logits_ref, logits_q).to(torch.float64).mean().item()


# -- encoders -----------------------------------------------------------------------------------
def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as the attention-masked mean of token states: ``(B, T, H), (B, T) -> (B, H)``.

    This is the pooling of sentence-transformers' all-MiniLM-L6-v2 (its L2 normalisation does not change
    cosines).

    >>> mean_pool(torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[1, 1, 0]])).tolist()
    [[2.0]]
    """
    m = attention_mask.to(torch.float64).unsqueeze(-1)  # (B, T, 1)
    summed = (hidden.to(torch.float64) * m).sum(1)  # (B, H)
    return summed / m.sum(1).clamp_min(1e-9)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows: ``(N, H), (N, H) -> (N,)`` float64.

    >>> cosine_rows(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, -1.0]])).tolist()
    [1.0, 0.0]
    """
    a, b = a.to(torch.float64), b.to(torch.float64)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar other row: ``(N, H) -> (N,)`` (N >= 2)."""
    e = torch.nn.functional.normalize(emb.to(torch.float64), dim=-1)
    sim = e @ e.T  # (N, N)
    sim.fill_diagonal_(-math.inf)  # a sentence is not its own neighbour
    return sim.argmax(-1)


def nn_agreement(emb_ref: torch.Tensor, emb_q: torch.Tensor) -> float:
    """Fraction of sentences whose top-1 nearest neighbour (among the others) is the same for both models.

    >>> e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> nn_agreement(e, e)
    1.0
    """
    return (nearest_neighbours(emb_ref) == nearest_neighbours(emb_q)).to(torch.float64).mean().item()

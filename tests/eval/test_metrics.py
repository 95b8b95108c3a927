import math

import numpy as np
import pytest
import torch

from lowbit.eval import metrics as M


def test_log_probs_float64_normalised():
    lp = M.log_probs(torch.randn(5, 11, dtype=torch.float32))
    assert lp.dtype == torch.float64
    assert torch.allclose(lp.exp().sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-12)


def test_nll_hand_computed():
    # p = [1/6, 2/6, 3/6]: logits are log(1), log(2), log(3)
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    nll, logp = M.nll_and_logprobs(logits, torch.tensor([2, 0]))
    assert nll.tolist() == pytest.approx([math.log(2.0), math.log(6.0)], abs=1e-7)
    assert logp.shape == (2, 3)


def test_perplexity_uniform_is_vocab_size():
    nll, _ = M.nll_and_logprobs(torch.zeros(7, 50), torch.arange(7))
    assert M.perplexity(nll) == pytest.approx(50.0, rel=1e-12)


def test_kl_identical_is_exactly_zero():
    lp = M.log_probs(torch.randn(9, 30))
    assert torch.equal(M.kl_divergence(lp, lp), torch.zeros(9, dtype=torch.float64))


def test_kl_hand_computed():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    kl = M.kl_divergence(p.log(), q.log())
    want0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl.tolist() == pytest.approx([want0, math.log(2.0)], abs=1e-12)  # p = 0 terms vanish, no nan


def test_kl_infinite_when_q_misses_mass():
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log()
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64).log()
    assert math.isinf(M.kl_divergence(p, q).item())


def test_kl_matches_torch_kl_div_and_is_asymmetric():
    torch.manual_seed(0)
    a, b = M.log_probs(torch.randn(16, 40)), M.log_probs(torch.randn(16, 40) * 2)
    ref = torch.nn.functional.kl_div(b, a, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(M.kl_divergence(a, b), ref, atol=1e-12)
    assert not torch.allclose(M.kl_divergence(a, b), M.kl_divergence(b, a))


def test_kl_topk_hand_computed_and_bounds():
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    k1 = M.kl_topk(torch.tensor([[0]]), p.log()[:, :1], q.log())
    assert k1.item() == pytest.approx(0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8), abs=1e-12)
    torch.manual_seed(1)
    lp, lq = M.log_probs(torch.randn(32, 100) * 3), M.log_probs(torch.randn(32, 100) * 3)
    exact = M.kl_divergence(lp, lq)
    prev = torch.zeros_like(exact)
    for k in (1, 5, 20, 100):
        top = lp.topk(k, dim=-1)
        approx = M.kl_topk(top.indices, top.values, lq)
        assert (approx <= exact + 1e-12).all()  # merging tokens never increases KL
        assert (approx >= prev - 1e-9).all()  # refining the partition never decreases it
        prev = approx
    assert torch.allclose(prev, exact, atol=1e-10)  # k = V is exact


def test_quantile_matches_numpy():
    x = torch.randn(1001, dtype=torch.float64)
    assert M.quantile(x, 0.99) == pytest.approx(float(np.percentile(x.numpy(), 99)), abs=1e-12)
    mean, p99 = M.kl_summary(torch.arange(101.0))
    assert (mean, p99) == (50.0, 99.0)


def test_top1_agreement():
    ref = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0], [0.0, 1.0, 0.0]])
    q = torch.tensor([[0.0, 5.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    assert M.top1_agreement(ref, q) == 0.5
    assert M.top1_matches(ref, q).tolist() == [True, False, True, False]


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [50.0, 60.0]], [[2.0, 2.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert M.mean_pool(hidden, mask).tolist() == [[2.0, 3.0], [2.0, 2.0]]


def test_cosine_rows():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    b = torch.tensor([[5.0, 0.0], [1.0, -1.0], [0.0, -1.0]])
    assert M.cosine_rows(a, b).tolist() == pytest.approx([1.0, 0.0, -1.0], abs=1e-12)


def test_nearest_neighbours_and_agreement():
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert M.nearest_neighbours(e).tolist() == [1, 0, 3, 2]  # never itself
    assert M.nn_agreement(e, e * 3.0) == 1.0  # scale-invariant
    swapped = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])  # NN: 2, 3, 0, 1
    assert M.nn_agreement(e, swapped) == 0.0

"""Statistics merge: two shards' collectors merged equal one collector over both (what a distributed run
reduces), histograms included."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.model.calibrate import StatsCollector
from lowbit.primitives.observers import HistogramObserver


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 16, 8, generator=g) * (1 + i) for i in range(n)]


def test_merged_shards_equal_one_pass():
    xs = _batches(4, 0)
    whole = StatsCollector("l", want_xtx=True, act_observer="percentile")
    for x in xs:
        whole.update(x)
    a = StatsCollector("l", want_xtx=True, act_observer="percentile")
    b = StatsCollector("l", want_xtx=True, act_observer="percentile")
    for x in xs[:2]:
        a.update(x)
    for x in xs[2:]:
        b.update(x)
    s, m = whole.stats(), a.merge(b).stats()
    assert m.tokens == s.tokens == 4 * 48
    assert torch.allclose(m.xtx, s.xtx, rtol=1e-6) and torch.allclose(m.sq_mean, s.sq_mean, rtol=1e-6)
    assert torch.equal(m.absmax, s.absmax)
    assert abs(m.act_range - s.act_range) <= 2 * s.act_range / 2048  # re-binned: within two bins


def test_merge_into_empty_and_mismatch():
    a, b = StatsCollector("l", want_xtx=False), StatsCollector("l", want_xtx=False)
    b.update(torch.ones(2, 4))
    assert a.merge(b).stats().tokens == 2 and a.merge(StatsCollector("l", False)).tokens == 2
    with pytest.raises(LowbitError, match="cannot merge"):
        a.merge(StatsCollector("other", False))


def test_histogram_merge_widens_the_range():
    h1, h2 = HistogramObserver(64), HistogramObserver(64)
    h1.update(torch.linspace(0, 1, 1000))
    h2.update(torch.linspace(0, 4, 1000))
    h1.merge(h2)
    assert h1.amax == 4.0 and float(h1.hist.sum()) == 2000

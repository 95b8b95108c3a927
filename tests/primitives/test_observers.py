import pytest
import torch

import lowbit
from lowbit.core.scheme import parse_scheme
from lowbit.errors import SchemeError
from lowbit.primitives.observers import (
    HistogramObserver,
    MinMaxObserver,
    get_observer,
    observer_names,
    register_observer,
)
from lowbit.primitives.quant import fake_quantize, group_view


def _err(w, q, imp=None):
    d = (q.dequantize() - w) ** 2
    return float((d if imp is None else d * imp).sum())


@pytest.mark.parametrize("scheme", ["int4-g128", "int3-g64", "int2-g64", "int8", "int4-g32-sym", "nf4-g64"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mse_never_worse_than_minmax(scheme, seed):
    torch.manual_seed(seed)
    w = torch.randn(64, 576) * torch.rand(1, 576) * 2  # uneven columns, heavy-ish tails
    w[0, 0] = 8.0
    e_mm = _err(w, lowbit.quantize_tensor(w, scheme, observer="minmax"))
    e_mse = _err(w, lowbit.quantize_tensor(w, scheme, observer="mse"))
    assert e_mse <= e_mm
    if scheme.startswith(("int3", "int2")):
        assert e_mse < 0.95 * e_mm  # clipping really helps at low bits


def test_importance_weighted_mse_targets_weighted_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    imp = torch.rand(256) ** 4 * 100
    plain = lowbit.quantize_tensor(w, "int3-g64", observer="mse")
    weighted = lowbit.quantize_tensor(w, "int3-g64", observer="mse", importance=imp)
    assert _err(w, weighted, imp) <= _err(w, plain, imp)


def test_percentile_clips_outliers():
    w = torch.randn(4, 1000)
    w[:, 0] = 100.0
    scheme = parse_scheme("int8")
    lo, hi = get_observer("percentile")(group_view(w, "channel"), scheme.grid)
    assert (hi < 10).all() and (lo > -10).all()


def test_fake_quantize_straight_through():
    scheme = parse_scheme("int4-g32")
    x = torch.randn(2, 64)
    xg = group_view(x, "group", 32).requires_grad_(True)
    lo, hi = xg.detach().amin(-1, keepdim=True), xg.detach().amax(-1, keepdim=True)
    s, z = scheme.grid.qparams(lo, hi)
    y = fake_quantize(xg, scheme.grid, s, z)
    assert torch.allclose(y.detach(), scheme.grid.fake(xg.detach(), s, z))
    y.sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(xg))  # nothing clipped: identity gradient


def test_activation_observers():
    torch.manual_seed(0)
    mm, h = MinMaxObserver(), HistogramObserver()
    for _ in range(5):
        x = torch.randn(1000)
        mm.update(x)
        h.update(x)
    h.update(torch.tensor([50.0]))  # one outlier widens the range and re-bins
    lo, hi = mm.range()
    assert lo < -3 and hi > 3
    t_pct = h.percentile(99.9)
    t_ent = h.entropy()
    assert 2.0 < t_pct < 5.0
    assert 1.0 < t_ent < 50.0  # the entropy threshold clips the lone outlier
    with pytest.raises(ValueError, match="calibration"):
        MinMaxObserver().range()


@pytest.mark.parametrize("scheme", ["int4-g128", "int3-g64-sym", "int8", "int4-g32-zf16", "fp8", "nf4-g64", "bf16"])
def test_fake_equals_encode_decode_bit_exact(scheme):
    s = parse_scheme(scheme)
    x = group_view(torch.randn(16, 200) * 3, s.granularity, s.group_size)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    sc, z = s.grid.qparams(lo, hi)
    assert torch.equal(s.grid.fake(x, sc, z), s.grid.decode(s.grid.encode(x, sc, z), sc, z))


def test_observer_registry_names_and_errors():
    assert observer_names() == ["minmax", "mse", "percentile"]
    with pytest.raises(SchemeError, match=r"^unknown observer 'entropy' \(known: minmax, mse, percentile\)$"):
        get_observer("entropy")
    with pytest.raises(SchemeError, match="observer 'mse' is already registered"):
        register_observer("mse")(lambda xg, grid, importance=None: (xg, xg))

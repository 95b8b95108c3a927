"""Budget parsing and allocation: exact against brute force, within the budget by the layouts' bytes,
monotonic, infeasible budgets as one error; the Plan it writes."""

import itertools

import pytest

from lowbit.errors import LowbitError
from lowbit.methods.registry import MethodConfig
from lowbit.model.budget import Budget, allocate, allocation, budget_plan, parse_budget, parse_schemes
from lowbit.model.plan import Plan
from lowbit.model.sensitivity_table import Cost, SensitivityTable, Unit


@pytest.mark.parametrize("text,kind,value", [
    ("3.5bpw", "bpw", 3.5), (" 4 BPW ", "bpw", 4.0), ("60MB", "bytes", 60e6), ("4GB", "bytes", 4e9),
    ("512MiB", "bytes", 512 * 2**20), ("100kB", "bytes", 1e5), ("kl<=0.05", "kl", 0.05), ("KL<1e-3", "kl", 1e-3),
])
def test_parse_budget(text, kind, value):
    b = parse_budget(text)
    assert (b.kind, b.value, b.text) == (kind, pytest.approx(value), text)


@pytest.mark.parametrize("text", ["3.5", "0bpw", "-2bpw", "60 parsecs", "kl>=0.1", "bpw", "", "3.5bpw4"])
def test_bad_budget_is_one_error_naming_the_option(text):
    with pytest.raises(LowbitError, match=r"^--budget .*expected bits per weight") as e:
        parse_budget(text)
    assert "\n" not in str(e.value)


def test_parse_schemes():
    assert parse_schemes("int8, int4-g64,q4_k") == ["int8", "int4-g64", "q4_k"]
    assert parse_schemes(None) is None
    with pytest.raises(LowbitError, match="^--schemes: cannot parse scheme 'int9-g7'"):
        parse_schemes("int8,int9-g7")


def toy_table(n_units: int = 5, seed: int = 0) -> SensitivityTable:
    """Units whose candidates trade bytes for KL irregularly (including a dominated one)."""
    import random

    rnd = random.Random(seed)
    units = []
    for u in range(n_units):
        w = rnd.choice((1024, 2048, 4096))
        costs = {}
        for name, bits in (("int2-g64", 2.28), ("int3-g64", 3.3), ("int4-g64", 4.31), ("int8", 8.03)):
            costs[name] = Cost(int(w * bits / 8), rnd.uniform(0.5, 2.0) * 10 ** (-bits / 2) * (1 + u % 3))
        costs["int6"] = Cost(int(w * 6.03 / 8), costs["int4-g64"].kl * 1.5)  # dominated: more bytes, more KL
        layers = tuple(f"model.layers.{u // 4}.{k}" for k in (("q", "k", "v") if u % 2 == 0 else ("o",)))
        units.append(Unit(layers, w, costs))
    return SensitivityTable(model={"name": "toy", "fingerprint": "x"}, method="gptq", config=MethodConfig(),
                            candidates=("int2-g64", "int3-g64", "int4-g64", "int6", "int8"), units=tuple(units),
                            fixed={"model.embed_tokens": "int8", "lm_head": "int8"}, fixed_bytes=5000,
                            fixed_linear=(1000, 1032))


def brute_force(table: SensitivityTable, cap: float) -> float:
    """Least summed KL over every combination whose unit bytes fit ``cap``."""
    best = float("inf")
    for combo in itertools.product(*[list(u.costs.values()) for u in table.units]):
        if sum(c.bytes for c in combo) <= cap:
            best = min(best, sum(c.kl for c in combo))
    return best


@pytest.mark.parametrize("bpw", [3.0, 3.5, 4.2, 5.0, 7.0])
def test_bpw_budget_is_met_exactly_and_optimal(bpw):
    t = toy_table()
    a = allocation(t, parse_budget(f"{bpw}bpw"))
    unit_bytes = sum(u.costs[c].bytes for u, c in zip(t.units, a.choices, strict=True))
    lw, lb = t.fixed_linear
    assert a.linear_bpw == pytest.approx(8 * (unit_bytes + lb) / (t.unit_weights + lw))
    assert a.linear_bpw <= bpw
    assert a.bytes == t.fixed_bytes + unit_bytes
    cap = bpw * (t.unit_weights + lw) / 8 - lb
    assert a.kl == pytest.approx(brute_force(t, cap))  # the byte span is small: bins of one byte, exact


def test_bytes_budget_counts_the_whole_checkpoint():
    t = toy_table()
    for total in (8000, 9000, 10000, 12000):
        a = allocation(t, Budget("bytes", total, f"{total}B"))
        assert a.bytes <= total
        assert a.kl == pytest.approx(brute_force(t, total - t.fixed_bytes))


def test_bigger_budget_never_predicts_more_kl():
    t = toy_table(8, seed=3)
    kls = [allocation(t, parse_budget(f"{b / 10}bpw")).kl for b in range(28, 90, 2)]
    assert all(b <= a for a, b in zip(kls, kls[1:], strict=False))
    assert kls[0] > kls[-1]


def test_kl_budget_takes_the_fewest_bytes_within_the_bound():
    t = toy_table()
    best = allocation(t, parse_budget("100bpw")).kl
    for bound in (1.2 * best, 3 * best, 30 * best):
        a = allocation(t, parse_budget(f"kl<={bound}"))
        assert a.kl <= bound
        fewest = min(sum(c.bytes for c in combo)
                     for combo in itertools.product(*[list(u.costs.values()) for u in t.units])
                     if sum(c.kl for c in combo) <= bound)
        assert a.bytes - t.fixed_bytes == fewest


def test_infeasible_budgets_name_what_can_be_reached():
    t = toy_table()
    with pytest.raises(LowbitError, match=r"^--budget 1bpw: the smallest plan these candidates allow is \d\.\d+bpw"):
        allocation(t, parse_budget("1bpw"))
    with pytest.raises(LowbitError, match=r"^--budget 4kB: the smallest plan .* is [\d.]+MB \(\d+ bytes\)"):
        allocation(t, parse_budget("4kB"))
    with pytest.raises(LowbitError, match=r"^--budget kl<=1e-6: these candidates reach a predicted KL of"):
        allocation(t, parse_budget("kl<=1e-6"))
    top = allocation(t, parse_budget("100bpw"))  # more than every unit at its widest needs: that plan
    assert set(top.choices) == {"int8"}


def test_plan_has_a_base_rule_exact_layer_rules_and_fixed_layers(tmp_path):
    t = toy_table()
    a = allocation(t, parse_budget("4bpw"))
    plan = a.plan
    assert plan == allocate(t, "4bpw")
    assert plan.rules[0].pattern == "*" and plan.rules[0].kind == "linear"
    assert [r.pattern for r in plan.rules[-2:]] == ["model.embed_tokens", "lm_head"]
    assert all(r.scheme == "int8" and r.method == "rtn" for r in plan.rules[-2:])
    base = plan.rules[0].scheme
    want = {n: c for u, c in zip(t.units, a.choices, strict=True) for n in u.layers}
    exact = {r.pattern: r.scheme for r in plan.rules[1:-2]}
    assert {n: exact.get(n, base) for n in want} == want
    assert all(exact[n] != base for n in exact)
    plan.to_json(tmp_path / "p.json")
    assert Plan.from_json(tmp_path / "p.json") == plan  # hand-editable JSON round trip


def test_plan_names_the_type_a_ggml_candidate_falls_back_to():
    t = toy_table(2)
    u = t.units[0]
    costs = {"q4_k": Cost(500, 1e-3, tuple("q5_0" for _ in u.layers)), "q8_0": Cost(1100, 1e-5)}
    t2 = SensitivityTable(t.model, t.method, t.config, ("q4_k", "q8_0"), (Unit(u.layers, u.weights, costs),),
                          {}, 0, (0, 0))
    plan = budget_plan(t2, ("q4_k",))
    assert plan.rules[0].scheme == "q5_0" and len(plan.rules) == 1


def test_a_unit_without_candidates_is_an_error():
    t = toy_table(1)
    t2 = SensitivityTable(t.model, t.method, t.config, t.candidates, (Unit(("a",), 10, {}),), {}, 0, (0, 0))
    with pytest.raises(LowbitError, match="no candidate scheme fits unit a"):
        allocation(t2, parse_budget("4bpw"))

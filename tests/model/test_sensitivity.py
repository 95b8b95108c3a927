"""The sensitivity table on a tiny Llama: units, exact bytes, the Fisher proxy against directly measured KL,
JSON round trip, and the promise a budgeted plan makes against what quantize and save write."""

import copy
import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.layouts import layout_of
from lowbit.model.budget import allocation, parse_budget
from lowbit.model.plan import Plan, Rule
from lowbit.model.quantize import quantize_model
from lowbit.model.sensitivity import GGUF_SCHEMES, fingerprint, measure_sensitivity, output_fisher, predicted_kl
from lowbit.model.sensitivity_table import SensitivityTable

CANDS = ("int2-g64", "int3-g64", "int4-g64", "int8")


@pytest.fixture
def windows():
    return torch.randint(0, 384, (6, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def table(tiny_llama, windows):
    return measure_sensitivity(tiny_llama[0], windows, method="gptq", schemes=CANDS, fisher_windows=6)


def logprobs(model, windows):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=windows).logits.double(), dim=-1)  # (N, T, V)


def mean_kl(ref, lp):
    return float((ref.exp() * (ref - lp)).sum(-1).mean())


def ranks(x):
    return torch.tensor(x).argsort().argsort().double()


def test_units_are_the_sequential_groups_with_exact_bytes(tiny_llama, table):
    model = tiny_llama[0]
    names = [tuple(n.split("layers.")[1] for n in u.layers) for u in table.units]
    assert names[:4] == [("0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj"), ("0.self_attn.o_proj",),
                         ("0.mlp.gate_proj", "0.mlp.up_proj"), ("0.mlp.down_proj",)]
    assert len(table.units) == 8 and table.candidates == CANDS
    from lowbit.core.scheme import parse_scheme

    for u in table.units:
        w = [model.get_submodule(n).weight for n in u.layers]
        assert u.weights == sum(x.numel() for x in w)
        for c, cost in u.costs.items():
            s = parse_scheme(c)
            assert cost.bytes == sum(layout_of(s).nbytes(s, tuple(x.shape)) for x in w)
        kls = [u.costs[c].kl for c in CANDS]
        assert all(a > b > 0 for a, b in zip(kls, kls[1:], strict=False))  # fewer bits, more predicted KL
    assert table.fixed == {"model.embed_tokens": "int8", "lm_head": "int8"}
    assert table.fixed_linear[0] == model.lm_head.weight.numel()


def test_proxy_ranks_units_as_measured_kl_does(tiny_llama, windows, table):
    """Quantize each unit alone to each candidate and measure the KL of the final logits: the proxy ranks them
    alike (Spearman) and lands within a small factor of each."""
    model = tiny_llama[0]
    ref = logprobs(model, windows)
    pred, meas = [], []
    for u in table.units:
        for c in ("int2-g64", "int3-g64", "int4-g64"):
            q = copy.deepcopy(model)
            quantize_model(q, Plan((Rule("*", None),) + tuple(Rule(n, c, "gptq") for n in u.layers)), windows,
                           progress=False)
            pred.append(u.costs[c].kl)
            meas.append(mean_kl(ref, logprobs(q, windows)))
    rp, rm = ranks(pred), ranks(meas)
    rho = float(torch.corrcoef(torch.stack([rp, rm]))[0, 1])
    assert rho > 0.9
    ratio = torch.tensor(pred) / torch.tensor(meas)
    assert 0.33 < float(ratio.min()) and float(ratio.max()) < 3.0


def test_fisher_predicts_the_kl_of_a_small_perturbation(tiny_llama, windows):
    model = tiny_llama[0]
    mod = model.model.layers[1].mlp.down_proj
    fisher = output_fisher(model, windows, {"d": mod}, seed=1)
    f, w = fisher.channel["d"], fisher.token["d"]
    assert fisher.tokens == windows.numel() and f.shape == (mod.out_features,) and bool((f > 0).all())
    assert w.shape == (windows.numel(),) and float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    xs = []
    h = mod.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    ref = logprobs(model, windows)
    h.remove()
    x = torch.cat(xs)  # (N·T, in), the windows in order, as the weights
    xw = x * w.sqrt()[:, None]
    dw = 0.05 * mod.weight.detach().std() * torch.randn(mod.weight.shape, generator=torch.Generator().manual_seed(2))
    pred = predicted_kl(dw, xw.T @ xw, f, x.shape[0])
    with torch.no_grad():
        mod.weight += dw
    meas = mean_kl(ref, logprobs(model, windows))
    assert 0.5 < pred / meas < 2.0
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # nothing left behind


def test_table_saves_and_loads_identically(tmp_path, tiny_llama, table):
    p = table.save(tmp_path / "t.json")
    back = SensitivityTable.load(p)
    assert back == table
    assert back.model == fingerprint(tiny_llama[0])
    back.check_model(fingerprint(tiny_llama[0]), p)
    other = copy.deepcopy(tiny_llama[0])
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight[0, 0] += 1
    with pytest.raises(LowbitError, match="measured on another model"):
        back.check_model(fingerprint(other), p)


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.update(format="x"), "not a lowbit sensitivity table"),
    (lambda d: d.update(version=99), "version 99 is not supported"),
    (lambda d: d["units"][0]["costs"]["int8"].update(bytes="many"), "field 'bytes' must be an integer"),
    (lambda d: d["units"][0].update(layers=[]), "non-empty list of layer names"),
    (lambda d: d.pop("fixed_bytes"), "field 'fixed_bytes' is missing"),
])
def test_a_broken_table_file_is_one_error_naming_it(tmp_path, table, edit, needle):
    d = table.to_dict()
    edit(d)
    p = tmp_path / "t.json"
    p.write_text(json.dumps(d))
    with pytest.raises(LowbitError, match=needle) as e:
        SensitivityTable.load(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_promised_figures_are_what_quantize_and_save_write(tmp_path, tiny_llama, windows, table):
    import lowbit
    from lowbit.io.safetensors_header import read_safetensors_header

    model, tok = tiny_llama
    a = allocation(table, parse_budget("4.6bpw"))
    assert len(set(a.choices)) > 1  # a real mix
    resolved = a.plan.resolve(model)
    for u, c in zip(table.units, a.choices, strict=True):
        assert {resolved[n].scheme.name for n in u.layers} == {c}  # q/k/v (gate/up) share one type
    qmodel, report = lowbit.quantize(model, tok, plan=a.plan, method="gptq", calib=windows)
    assert report.linear_bpw == pytest.approx(a.linear_bpw, rel=1e-12) and report.linear_bpw <= 4.6
    out = lowbit.save(qmodel, tmp_path / "q", tokenizer=tok, plan=a.plan, report=report)
    header = read_safetensors_header(out / "model.safetensors")
    data = sum(e.end - e.begin for e in header.tensors.values())
    assert data == a.bytes  # every stored tensor byte, as promised
    assert abs((out / "model.safetensors").stat().st_size - a.bytes) / a.bytes < 0.25  # the rest: the header


def test_ggml_candidates_fall_back_as_the_plan_does(tiny_llama, windows):
    t = measure_sensitivity(tiny_llama[0], windows, method="gptq", schemes=GGUF_SCHEMES, fisher_windows=2,
                            fixed_scheme="q8_0")
    u = t.units[0]  # rows of 64: no k-quant block fits; Q5_K falls back to Q5_1, Q4_K to Q5_0 (a duplicate)
    assert u.costs["q5_k"].schemes == ("q5_1",) * 3 and u.costs["q5_0"].schemes == ()
    assert "q4_k" not in u.costs and "q6_k" not in u.costs  # as Q5_0 / Q8_0, already measured
    assert t.fixed == {"model.embed_tokens": "q8_0", "lm_head": "q8_0"}


def test_activation_methods_are_refused(tiny_llama, windows):
    with pytest.raises(LowbitError, match="weight-only"):
        measure_sensitivity(tiny_llama[0], windows, method="smoothquant", schemes=("int8",))

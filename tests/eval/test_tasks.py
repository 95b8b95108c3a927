"""Task files, log-likelihood scoring, statistics, generations side by side, the eval CLI's task flags."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lowbit
from lowbit.cli.main import main
from lowbit.eval.generations import compare_generations, format_generations
from lowbit.eval.tasks import (
    KINDS,
    TaskFileError,
    TaskOptions,
    encode_pair,
    eval_tasks,
    format_tasks,
    load_task,
    loglikelihoods,
    paired_bootstrap,
)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


MC = [{"context": "The river leaves the", "choices": ["mountains", "bread", "ice"], "answer": 0},
      {"question": "Boats once carried grain, timber and", "choices": ["salt", "snow"], "answer": 0},
      {"context": "", "choices": ["The", "Zebra"], "answer": 1}]


@pytest.mark.parametrize("record, needle", [
    ('{"context": "a", "choices": ["x"], "answer": 0}', "at least two"),
    ('{"context": "a", "choices": ["x", "y"], "answer": 2}', "not an index"),
    ('{"context": "a", "choices": ["x", "y"], "answer": true}', "'answer' must be int"),
    ('{"prompt": "a", "match": "fuzzy"}', "unknown match 'fuzzy'"),
    ('{"prompt": "a", "target": "(", "match": "regex"}', "bad regex"),
    ('{"a": "x", "b": "y", "label": 2}', "must be 0 or 1"),
    ('{"foo": 1}', "unknown record shape"),
    ("[1, 2]", "expected a JSON object"),
    ("{oops", "not JSON"),
])
def test_bad_records_name_file_and_line(tmp_path, record, needle):
    p = tmp_path / "t.jsonl"
    p.write_text('# a comment\n\n' + record + "\n")
    with pytest.raises(TaskFileError, match=needle) as e:
        load_task(p)
    assert f"{p}:3:" in str(e.value) or "unknown match" in str(e.value)


def test_kinds_registry_and_detection(tmp_path):
    assert KINDS.names() == ["gen", "mc", "pairs"]
    assert load_task(_jsonl(tmp_path / "m.jsonl", MC)).kind == "mc"
    assert load_task(_jsonl(tmp_path / "g.jsonl", [{"prompt": "Hi"}])).kind == "gen"
    assert load_task(_jsonl(tmp_path / "p.jsonl", [{"a": "x", "b": "y", "label": 1}])).kind == "pairs"


def test_encode_pair_moves_trailing_space(tiny_tokenizer):
    ctx, cont = encode_pair(tiny_tokenizer, "The river ", "leaves")
    assert ctx == tiny_tokenizer("The river", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tiny_tokenizer("The river leaves", add_special_tokens=False)["input_ids"]
    assert encode_pair(tiny_tokenizer, "", "The")[0] == [tiny_tokenizer.bos_token_id]


def test_batched_loglikelihood_matches_one_by_one(tiny_llama):
    model, tok = tiny_llama
    reqs = [encode_pair(tok, c, " " + x) for c, x in [("The river", "leaves"), ("A", "bridge is a promise"),
                                                       ("Farmers on both banks have", "measured")]]
    batched = loglikelihoods(model, reqs, batch_size=3)
    for (ctx, cont), (ll, _) in zip(reqs, batched, strict=True):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        want = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        assert math.isclose(ll, want, rel_tol=1e-4, abs_tol=1e-4)


def test_mc_scores_flips_and_interval(tmp_path, tiny_llama):
    model, tok = tiny_llama
    other = lowbit.quantize(model, tok, scheme="int2-g64")[0]
    task = _jsonl(tmp_path / "mc.jsonl", MC * 4)
    [r] = eval_tasks(other, model, tok, [task], TaskOptions(batch_size=5))
    acc = {m.metric: m for m in r.metrics}
    assert set(acc) == {"acc", "acc_norm", "agree"} and acc["acc"].n == 12
    m = acc["acc"]
    assert m.delta == pytest.approx(m.model - m.reference)
    assert m.ci_low <= m.delta <= m.ci_high
    assert m.model - m.reference == pytest.approx((len(m.wrong_to_right) - len(m.right_to_wrong)) / 12)
    [same] = eval_tasks(model, model, tok, [task])
    assert all(x.delta == 0 and not x.right_to_wrong for x in same.metrics if x.metric != "agree")
    assert same.metrics[-1].model == 1.0
    assert "wrong→right" in format_tasks([r])


def test_paired_bootstrap_interval_covers_and_is_seeded():
    q, r = [1, 0, 1, 1, 0] * 20, [1, 1, 0, 1, 0] * 20
    d, lo, hi = paired_bootstrap(q, r, seed=3)
    assert d == 0 and lo < 0 < hi and (d, lo, hi) == paired_bootstrap(q, r, seed=3)
    assert paired_bootstrap([1] * 50, [0] * 50) == (1.0, 1.0, 1.0)


def test_gen_matchers_and_until(tmp_path, tiny_llama):
    model, tok = tiny_llama
    from lowbit.eval.tasks import greedy

    out = tok.decode(greedy(model, tok, "The river", 6, chat=False), skip_special_tokens=True).strip()
    recs = [{"prompt": "The river", "target": out, "match": "exact"},
            {"prompt": "The river", "target": out[:3].upper(), "match": "contains"},
            {"prompt": "The river", "target": "^" + "x" * 40, "match": "regex"},
            {"prompt": "The river"}]
    [r] = eval_tasks(model, model, tok, [_jsonl(tmp_path / "g.jsonl", recs)],
                     TaskOptions(max_new_tokens=6, chat=False))
    match = {m.metric: m for m in r.metrics}["match"]
    assert match.n == 3 and match.model == pytest.approx(2 / 3)


def test_pairs_threshold_and_recall(tmp_path, tiny_bert):
    model, tok = tiny_bert
    recs = [{"a": "the river floods", "b": "the river floods in spring", "label": 1},
            {"a": "a bridge of stone", "b": "a bridge of stone and iron", "label": 1},
            {"a": "the river floods", "b": "children learn to swim", "label": 0},
            {"a": "boats carried grain", "b": "the oldest stone marker", "label": 0}]
    [r] = eval_tasks(model, model, tok, [_jsonl(tmp_path / "p.jsonl", recs)])
    ms = {m.metric: m for m in r.metrics}
    assert set(ms) == {"acc", "recall@1", "recall@5", "agree"}
    assert ms["recall@1"].n == 2 and ms["recall@5"].model == 1.0 and ms["agree"].model == 1.0
    assert ms["acc"].model == ms["acc"].reference


def test_generations_side_by_side(tiny_llama):
    model, tok = tiny_llama
    q = lowbit.quantize(model, tok, scheme="int2-g64")[0]
    rep = compare_generations(q, model, tok, ["The river", "A bridge", "Questions follow"], max_new_tokens=8,
                              chat=False)
    ks = [p.diverge_at for p in rep.pairs]
    assert ks == sorted(ks, key=lambda k: (k is None, k or 0))
    for p in rep.pairs:
        if p.diverge_at is not None:
            k = p.diverge_at
            assert p.reference_ids[:k] == p.model_ids[:k] and p.reference_ids[k:k + 1] != p.model_ids[k:k + 1]
            assert p.reference.startswith(p.common)
    same = compare_generations(model, model, tok, ["The river"], max_new_tokens=8, chat=False)
    assert same.identical == 1 and "identical" in format_generations(same)


def test_cli_task_and_generate(tmp_path, capsys, tiny_llama_dir):
    task = _jsonl(tmp_path / "mc.jsonl", MC)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The river\nA bridge is\n")
    argv = ["eval", str(tiny_llama_dir), "--reference", str(tiny_llama_dir), "--task", str(task), "--generate",
            str(prompts), "--max-new-tokens", "4", "--no-chat-template"]
    assert main(argv + ["--report", str(tmp_path / "r.html")]) == 0
    text = capsys.readouterr().out
    assert "acc_norm" in text and "2/2 identical" in text
    assert "tasks and generations" in (tmp_path / "r.html").read_text()
    assert main(argv + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tasks"][0]["n_items"] == 3 and doc["generations"]["identical"] == 2


def test_cli_bad_task_file_is_one_line_exit_2(tmp_path, capsys, tiny_llama_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "answer": 0}\n{"context": "a", "choices": []}\n')
    assert main(["eval", str(tiny_llama_dir), "--task", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:2:" in err
    assert main(["eval", str(tiny_llama_dir)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


class _Req:  # what lm-eval hands an LM: an object with .args
    def __init__(self, *args):
        self.args = args


def test_lm_eval_adapter_interface(tiny_llama):
    from lowbit.eval.lm_eval_adapter import LowbitLM

    model, tok = tiny_llama
    lm = LowbitLM(model=model, tokenizer=tok, batch_size=2)
    text = "The river leaves the mountains in a narrow gorge."
    [(ll, _)] = lm.loglikelihood([_Req("", text)])
    [rolling] = lm.loglikelihood_rolling([_Req(text)])
    assert rolling == pytest.approx(ll, abs=1e-4)
    model.config.max_position_embeddings = 8  # windows of 8: every token still predicted exactly once
    [short] = lm.loglikelihood_rolling([_Req(text)])
    n = len(tok(text, add_special_tokens=False).input_ids)
    assert math.isfinite(short) and short != pytest.approx(rolling) and n > 16
    model.config.max_position_embeddings = 512
    out = lm.generate_until([_Req("The river", {"until": ["\n"], "max_gen_toks": 6})])
    assert isinstance(out[0], str) and "\n" not in out[0]
    from lowbit.eval.tasks import greedy

    assert out[0] == tok.decode(greedy(model, tok, "The river", 6, chat=False), skip_special_tokens=True).split("\n")[0]

"""A killed block-by-block run resumes: finished blocks are restored from their checkpoints, the result is the
same bits as an uninterrupted run, and a changed job starts over instead of resuming."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lowbit
from lowbit.methods.registry import MethodConfig
from lowbit.model import quantize as Q
from lowbit.model.plan import Plan
from lowbit.model.qmodules import QLinear
from tests.cli.conftest import calib, run  # noqa: F401  (calib is a fixture)
from tests.conftest import make_tiny_llama


class Killed(Exception):
    pass


def _parts(model):
    return {n: (m.qweight.codes, m.qweight.scales, m.qweight.zeros) for n, m in model.named_modules()
            if isinstance(m, QLinear)}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(
        all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True)) for k in a)


@pytest.mark.parametrize("method,options", [("gptq", {}), ("awq+gptq", {}),
                                            ("qat", {"block_epochs": 2.0, "lr": 1e-3, "val_windows": 0})])
def test_killed_run_resumes_to_the_same_bits(tmp_path, monkeypatch, method, options):
    model = make_tiny_llama(300)
    windows = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = Plan.default("int3-g32", method, config=MethodConfig(options=options))
    whole = copy.deepcopy(model)
    ref = Q.quantize_model(whole, plan, windows, progress=False, resume_dir=tmp_path / "ref")
    assert len(list((tmp_path / "ref").glob("block-*.json"))) == 2

    def kill_after_first(done, total):
        if done == 1:
            raise Killed

    folder = tmp_path / "run"
    with pytest.raises(Killed):
        Q.quantize_model(copy.deepcopy(model), plan, windows, progress=False, on_block=kill_after_first,
                         resume_dir=folder)
    assert [p.name for p in sorted(folder.glob("block-*.json"))] == ["block-0000.json"]
    calls: list[str] = []
    real = Q._Quantizer.quantize_layer
    monkeypatch.setattr(Q._Quantizer, "quantize_layer", lambda self, n, st: (calls.append(n), real(self, n, st))[1])
    again = copy.deepcopy(model)
    rep = Q.quantize_model(again, plan, windows, progress=False, resume_dir=folder)
    assert not any(n.startswith("model.layers.0.") for n in calls)  # block 0 restored, not redone
    assert any(n.startswith("model.layers.1.") for n in calls)
    assert _same(_parts(again), _parts(whole))
    assert [r.name for r in rep.layers] == [r.name for r in ref.layers]
    assert [r.note for r in rep.layers] == [r.note for r in ref.layers]
    with torch.no_grad():
        assert torch.equal(again(windows).logits, whole(windows).logits)


def test_a_changed_job_starts_over(tmp_path, monkeypatch):
    model = make_tiny_llama(300)
    windows = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = Plan.default("int3-g32", "gptq")
    folder = tmp_path / "run"
    Q.quantize_model(copy.deepcopy(model), plan, windows, progress=False, resume_dir=folder)
    calls: list[str] = []
    real = Q._Quantizer.quantize_layer
    monkeypatch.setattr(Q._Quantizer, "quantize_layer", lambda self, n, st: (calls.append(n), real(self, n, st))[1])
    other = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(1))  # other calibration data
    Q.quantize_model(copy.deepcopy(model), plan, other, progress=False, resume_dir=folder)
    assert any(n.startswith("model.layers.0.") for n in calls)  # redone: nothing of the other job was reused
    assert json.loads((folder / "run.json").read_text())["fingerprint"]


def test_cli_rerun_resumes_and_cleans_up(tmp_path, capsys, monkeypatch, tiny_llama_dir, calib):  # noqa: F811
    args = ["quantize", tiny_llama_dir, "--scheme", "int4-g32", "--method", "gptq", "--calib", calib,
            "--calib-windows", "4", "--window-len", "32"]
    code, _, err = run(capsys, *args, "-o", tmp_path / "ref")
    assert code == 0, err
    real = Q.run_block
    state = {"n": 0}

    def dying_run_block(block, inputs):  # the process dies at the end of the second (last) block
        state["n"] += 1
        if state["n"] == 2:
            raise KeyboardInterrupt
        return real(block, inputs)

    monkeypatch.setattr(Q, "run_block", dying_run_block)
    out = tmp_path / "q"
    code, _, _ = run(capsys, *args, "-o", out)
    assert code != 0 and state["n"] == 2  # interrupted (Ctrl-C) while the last block finished
    assert not out.exists() and (tmp_path / ".q.resume" / "block-0000.json").exists()
    monkeypatch.setattr(Q, "run_block", real)
    code, _, err = run(capsys, *args, "-o", out)
    assert code == 0, err
    assert "resuming" in err and not (tmp_path / ".q.resume").exists()
    a, _ = lowbit.load(out)
    b, _ = lowbit.load(tmp_path / "ref")
    assert _same(_parts(a), _parts(b))

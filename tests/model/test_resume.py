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
                                            ("qat", {"block_epochs": 2.0, "lr": 1e-3, "val_windows": 0}),
                                            # the end-to-end step starts a restored block from its saved latents
                                            ("qat", {"block_epochs": 1.0, "lr": 1e-3, "val_windows": 0, "steps": 3,
                                                     "e2e_lr": 3e-3, "e2e_weight_lr": 1e-4})])
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
    assert [r.note for r in rep.layers] == [r.note for r in ref.layers] and rep.notes == ref.notes
    assert all(n.endswith(" kept") for n in ref.notes if n.startswith("qat end-to-end")), ref.notes
    with torch.no_grad():
        assert torch.equal(again(windows).logits, whole(windows).logits)


def test_killed_end_to_end_step_resumes_from_its_checkpoint_to_the_same_bits(tmp_path, monkeypatch):
    from lowbit.qat import e2e as E

    model = make_tiny_llama(300)
    windows = torch.randint(1, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    opts = {"block_epochs": 1.0, "lr": 1e-3, "val_windows": 2, "steps": 6, "e2e_lr": 3e-3, "e2e_weight_lr": 3e-5,
            "e2e_batch_windows": 2}
    plan = Plan.default("int3-g32", "qat", config=MethodConfig(options=opts))
    whole = copy.deepcopy(model)
    ref = Q.quantize_model(whole, plan, windows, progress=False, resume_dir=tmp_path / "ref")
    assert any(n.startswith("qat end-to-end") and n.endswith("kept") for n in ref.notes), ref.notes
    monkeypatch.setattr(E, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every step
    real = E.train_steps
    trained: list[int] = []

    def counting(groups, steps, items, loss_of, *, limit, **kw):
        def loss(i):
            if len(trained) == limit:
                raise Killed  # the process dies in the step after the one checkpointed
            trained.append(i)
            return loss_of(i)
        return real(groups, steps, items, loss, **kw)

    monkeypatch.setattr(E, "train_steps", lambda *a, **kw: counting(*a, limit=4, **kw))
    folder = tmp_path / "run"
    with pytest.raises(Killed):
        Q.quantize_model(copy.deepcopy(model), plan, windows, progress=False, resume_dir=folder)
    assert (folder / "teacher.safetensors").exists() and (folder / "e2e.safetensors").exists()
    first = list(trained)
    trained.clear()
    calls: list[str] = []
    real_q = Q._Quantizer.quantize_layer
    monkeypatch.setattr(Q._Quantizer, "quantize_layer", lambda self, n, st: (calls.append(n), real_q(self, n, st))[1])
    monkeypatch.setattr(E, "teacher_topk", lambda *a, **kw: pytest.fail("the teacher is read from the checkpoint"))
    monkeypatch.setattr(E, "train_steps", lambda *a, **kw: counting(*a, limit=99, **kw))
    again = copy.deepcopy(model)
    rep = Q.quantize_model(again, plan, windows, progress=False, resume_dir=folder)
    assert not any(".layers." in n for n in calls) and len(trained) == 2  # blocks restored; steps 5, 6 trained
    assert first + trained == _order(6, 3)  # the uninterrupted run's window order, continued
    assert _same(_parts(again), _parts(whole)) and rep.notes == ref.notes
    with torch.no_grad():
        assert torch.equal(again(windows).logits, whole(windows).logits)


def _order(steps: int, items: int) -> list[int]:
    gen, order, out = torch.Generator().manual_seed(0), [], []
    for _ in range(steps):
        if not order:
            order = torch.randperm(items, generator=gen).tolist()
        out.append(order.pop())
    return out


def _finished_gptq_job(tmp_path):
    """A tiny model's GPTQ run with checkpoints: (model, windows, plan, checkpoint folder)."""
    model = make_tiny_llama(300)
    windows = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = Plan.default("int3-g32", "gptq")
    folder = tmp_path / "run"
    Q.quantize_model(copy.deepcopy(model), plan, windows, progress=False, resume_dir=folder)
    return model, windows, plan, folder


def test_a_changed_job_starts_over(tmp_path, monkeypatch):
    model, windows, plan, folder = _finished_gptq_job(tmp_path)
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


@pytest.mark.parametrize("victim", ["block-0000.safetensors", "block-0000.json", "e2e.safetensors"])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_it(tmp_path, victim):
    from lowbit.errors import LowbitError
    from lowbit.model.resume import BlockCheckpoints

    model, windows, plan, folder = _finished_gptq_job(tmp_path)
    job = json.loads((folder / "run.json").read_text())["fingerprint"]
    BlockCheckpoints(folder, job).save_e2e(3, {"layer.x.weight": torch.ones(4)})
    data = (folder / victim).read_bytes()
    (folder / victim).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(LowbitError, match=rf"resume: .*{victim} is unreadable.*delete .*run to start over"):
        if victim.startswith("block-"):  # read by the rerun
            Q.quantize_model(copy.deepcopy(model), plan, windows, progress=False, resume_dir=folder)
        else:
            BlockCheckpoints(folder, job).e2e()

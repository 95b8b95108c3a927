"""``--method qat`` through the CLI: quantize to a lowbit model and export GGUF blocks trained on their own grid."""

from __future__ import annotations

import json

import torch

from lowbit.io.gguf.source import read_gguf_weights
from tests.cli.conftest import calib, run  # noqa: F401  (calib is a fixture)


def test_quantize_with_qat_from_awq_gptq(tmp_path, capsys, tiny_llama_dir, calib):  # noqa: F811
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", tiny_llama_dir, "-o", out, "--scheme", "int3-g32", "--method", "qat",
                            "--option", "init=awq+gptq", "--option", "block_epochs=1", "--option", "damp=0.02",
                            "--calib", calib, "--calib-windows", "4", "--window-len", "32", "--json")
    assert code == 0, err
    rep = json.loads(stdout)["report"]
    notes = [r["note"] for r in rep["layers"] if r["name"].startswith("model.layers.")]
    assert notes and all("qat block loss" in n for n in notes)
    assert {r["method"] for r in rep["layers"] if r["name"].startswith("model.layers.")} == {"qat"}
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "-o", tmp_path / "bad", "--scheme", "int3-g32",
                       "--method", "qat", "--option", "init=nope", "--calib", calib, "--calib-windows", "2")
    assert code == 2 and "init='nope' is not a method" in err and "Traceback" not in err
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "-o", tmp_path / "bad2", "--scheme", "int3-g32",
                       "--method", "qat")
    assert code == 2 and "calib" in err


def test_export_gguf_with_qat_writes_the_trained_blocks(tmp_path, capsys, tiny_llama_dir, calib):  # noqa: F811
    import lowbit
    from lowbit.io.gguf.writer import unpermute_qk

    q = tmp_path / "q"
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "-o", q, "--scheme", "q4_0", "--method", "qat",
                       "--option", "block_epochs=1", "--calib", calib, "--calib-windows", "4", "--window-len", "32")
    assert code == 0, err
    gguf = tmp_path / "q.gguf"
    code, _, err = run(capsys, "export", "gguf", q, "-o", gguf)
    assert code == 0, err
    qmodel, _ = lowbit.load(q)
    layer = qmodel.get_submodule("model.layers.0.mlp.up_proj")
    w = read_gguf_weights(gguf)
    assert torch.equal(w["blk.0.ffn_up.weight"], layer.qweight.dequantize(torch.float32))
    heads = qmodel.config.num_attention_heads
    assert torch.equal(unpermute_qk(w["blk.0.attn_q.weight"], heads),
                       qmodel.get_submodule("model.layers.0.self_attn.q_proj").qweight.dequantize(torch.float32))
    # the one-step form trains the same way
    one = tmp_path / "one.gguf"
    code, _, err = run(capsys, "export", "gguf", tiny_llama_dir, "-o", one, "--type", "Q4_0", "--method", "qat",
                       "--method-options", "block_epochs=1,init=rtn", "--calib", calib, "--calib-windows", "4",
                       "--window-len", "32")
    assert code == 0, err
    code, _, err = run(capsys, "export", "gguf", tiny_llama_dir, "-o", tmp_path / "bad.gguf", "--type", "Q4_0",
                       "--method", "qat", "--method-options", "bogus=1", "--calib", calib)
    assert code == 2 and "bogus" in err and "Traceback" not in err and not (tmp_path / "bad.gguf").exists()


def test_killed_export_gguf_with_qat_resumes_to_the_same_file(tmp_path, capsys, monkeypatch, tiny_llama_dir,
                                                              calib):  # noqa: F811
    from lowbit.qat import e2e as E

    args = ["export", "gguf", tiny_llama_dir, "--type", "Q4_0", "--method", "qat", "--method-options",
            "block_epochs=1,init=rtn,steps=4,val_windows=2,e2e_lr=3e-3", "--calib", calib, "--calib-windows", "8",
            "--window-len", "32"]
    code, stdout, err = run(capsys, *args, "-o", tmp_path / "ref.gguf")
    assert code == 0, err
    assert "qat end-to-end: held-out KL(top-k)" in stdout and "4 steps" in stdout  # what the step did, as quantize
    monkeypatch.setattr(E, "CHECKPOINT_SECONDS", 0.0)
    real = E.train_steps
    seen: list[int] = []

    def dying(groups, steps, items, loss_of, **kw):  # Ctrl-C in the third end-to-end step
        def loss(i):
            if len(seen) == 2:
                raise KeyboardInterrupt
            seen.append(i)
            return loss_of(i)
        return real(groups, steps, items, loss, **kw)

    monkeypatch.setattr(E, "train_steps", dying)
    out = tmp_path / "q.gguf"
    code, _, err = run(capsys, *args, "-o", out)
    assert code != 0 and not out.exists() and (tmp_path / ".q.gguf.resume" / "e2e.safetensors").exists()
    monkeypatch.setattr(E, "train_steps", real)
    code, _, err = run(capsys, *args, "-o", out)
    assert code == 0, err
    assert "resuming" in err and "end-to-end step" in err and not (tmp_path / ".q.gguf.resume").exists()
    assert out.read_bytes() == (tmp_path / "ref.gguf").read_bytes()

"""The CLI as a user runs it, on a tiny random Llama saved as a Hugging Face folder."""

import json

import pytest

from tests.cli.conftest import run


def test_quantize_inspect_eval_plan(tmp_path, capsys, tiny_llama_dir, calib):
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(out), "--scheme", "int4-g32",
                          "--method", "gptq", "--calib", str(calib), "--calib-windows", "4", "--window-len", "64",
                          "--rule", "mlp.down_proj=int8", "--json")
    assert code == 0
    rep = json.loads(stdout)
    assert rep["report"]["calib_windows"] == 4 and 4.6 < rep["bpw"] < 7  # down_proj at int8 lifts the mean
    assert (out / "quantization.json").exists()

    code, stdout, _ = run(capsys, "inspect", str(out), "--json")
    assert code == 0
    names = {t["name"]: t for t in json.loads(stdout)["tensors"]}
    assert names["model.layers.0.mlp.down_proj.weight"]["format"] == "int8"
    assert names["model.layers.0.mlp.up_proj.weight"]["format"] == "int4-g32"

    code, stdout, _ = run(capsys, "eval", str(out), "--reference", str(tiny_llama_dir), "--data", str(calib),
                          "--windows", "2", "--window-len", "64", "--no-speed", "--json")
    assert code == 0
    ev = json.loads(stdout)
    assert ev["kl_mean"] > 0 and ev["perplexity"] > 1

    code, stdout, _ = run(capsys, "plan", str(tiny_llama_dir), "--scheme", "int3-g32", "--keep", "lm_head",
                          "-o", str(tmp_path / "plan.json"))
    assert code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["rules"][-1] == {"pattern": "lm_head", "scheme": None}
    code, stdout, _ = run(capsys, "plan", str(tiny_llama_dir), "--scheme", "int3-g32", "--keep", "lm_head")
    assert code == 0 and "lm_head" in stdout and "keep (float)" in stdout and "int3-g32" in stdout
    code, stdout, _ = run(capsys, "plan", str(tiny_llama_dir), "--scheme", "int3-g32", "--json")
    assert code == 0 and json.loads(stdout)["resolved"]["model.layers.0.mlp.down_proj"]["scheme"] == "int3-g32"
    code, stdout, _ = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(tmp_path / "q2"), "--plan",
                          str(tmp_path / "plan.json"))
    assert code == 0 and "lm_head" in stdout


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--scheme", "int5-g33x"], "cannot parse scheme 'int5-g33x'"),
        (["--method", "gptq"], "--method gptq needs calibration text"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--calib", "/nonexistent/calib.txt", "--method", "gptq"], "calib.txt"),
        (["--rule", "down_proj"], "PATTERN=SCHEME"),
        (["--option", "act_order"], "KEY=VALUE"),
        (["--alpha", "1.5"], "--alpha 1.5"),
        (["--act", "int8-static"], "--act int8-static needs calibration text"),
        (["--option", "act=int8-static"], "--act int8-static needs calibration text"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, tiny_llama_dir, argv, needle):
    code, _, err = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(tmp_path / "o"), *argv)
    assert code == 2
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_method_options_and_activation_flags(tmp_path, capsys, tiny_llama_dir, calib):
    common = ["--calib", str(calib), "--calib-windows", "2", "--window-len", "64", "--json"]
    code, stdout, _ = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(tmp_path / "g"), "--scheme", "int4-g32",
                          "--method", "gptq", "--option", "act_order=true", "--option", "damp=0.05", *common)
    assert code == 0
    plan = json.loads((tmp_path / "g" / "quantization.json").read_text())
    assert '"act_order": true' in json.dumps(plan) and '"damp": 0.05' in json.dumps(plan)

    code, stdout, _ = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(tmp_path / "s"), "--scheme", "int8",
                          "--method", "smoothquant", "--act", "int8-static", "--act-observer", "percentile",
                          "--alpha", "0.8", *common)
    assert code == 0
    import lowbit
    from lowbit.model.qmodules import QLinear

    qm, _ = lowbit.load(tmp_path / "s")
    layers = [m for n, m in qm.named_modules() if isinstance(m, QLinear) and ".layers." in n]  # head: int8 RTN
    assert layers and all(m.act_scheme == "int8-static" and float(m.act_scale) > 0 for m in layers)

    # no data at all: importance statistics from seeded random tokens
    code, stdout, _ = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(tmp_path / "r"), "--scheme", "int4-g32",
                          "--method", "rtn", "--importance", "--observer", "mse", "--calib", "random",
                          "--calib-windows", "2", "--window-len", "64", "--json")
    assert code == 0 and json.loads(stdout)["report"]["calib_windows"] == 2

    code, _, err = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(tmp_path / "x"), "--method", "gptq",
                       "--option", "bogus=1", *common)
    assert code == 2 and "bogus" in err and not (tmp_path / "x").exists()


def test_existing_output_and_source_protected(tmp_path, capsys, tiny_llama_dir):
    (tmp_path / "o").mkdir()
    code, _, err = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(tmp_path / "o"))
    assert code == 2 and "--force" in err
    before = sorted(p.name for p in tiny_llama_dir.iterdir())
    code, _, err = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(tiny_llama_dir), "--force")
    assert code == 2 and "source" in err
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == before


def test_missing_and_corrupt_models(tmp_path, capsys):
    code, _, err = run(capsys, "quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert code == 2 and "nope" in err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    code, _, err = run(capsys, "quantize", str(bad), "-o", str(tmp_path / "o"))
    assert code == 2 and "bad.gguf" in err
    assert not (tmp_path / "o").exists()


def test_size_from_config(tmp_path, capsys):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    code, stdout, _ = run(capsys, "size", str(p))
    assert code == 0
    assert "fp32" in stdout and "26.95 GB" in stdout and "13.4" in stdout


def test_demo_on_own_model_and_text(tmp_path, capsys, tiny_llama_dir, calib):
    held = tmp_path / "held.txt"
    held.write_text(" ".join(f"a lazy dog {i} sleeps under the brown tree." for i in range(400)))
    out = tmp_path / "demo-out"
    code, stdout, err = run(capsys, "demo", "--model", str(tiny_llama_dir), "--calib", str(calib), "--data",
                            str(held), "--calib-windows", "4", "--windows", "2", "--window-len", "64", "-o", str(out))
    assert code == 0, err
    assert "prompt:" in stdout and "float32" in stdout and str(out) in stdout
    assert (out / "quantization.json").exists()
    # re-running replaces its own earlier output, but never a folder that is not a lowbit model
    code, _, _ = run(capsys, "demo", "--model", str(tiny_llama_dir), "--calib", str(calib), "--data", str(held),
                     "--calib-windows", "4", "--windows", "2", "--window-len", "64", "-o", str(out), "--json")
    assert code == 0
    (tmp_path / "mine").mkdir()
    code, _, err = run(capsys, "demo", "--model", str(tiny_llama_dir), "-o", str(tmp_path / "mine"))
    assert code == 2 and "not a lowbit model" in err
    code, _, err = run(capsys, "demo", "--model", str(tiny_llama_dir), "--calib", str(calib), "--data", str(calib))
    assert code == 2 and "same file" in err


def test_export_gguf_and_read_back(tmp_path, capsys, tiny_llama_dir):
    out = tmp_path / "m.gguf"
    code, stdout, err = run(capsys, "export", "gguf", str(tiny_llama_dir), "-o", str(out), "--type", "Q8_0", "--json")
    assert code == 0, err
    assert json.loads(stdout)["tensors"] and out.stat().st_size > 0
    code, stdout, _ = run(capsys, "inspect", str(out), "--json")
    assert code == 0 and any(t["format"] == "Q8_0" for t in json.loads(stdout)["tensors"])
    code, _, err = run(capsys, "export", "gguf", str(tiny_llama_dir), "-o", str(out))
    assert code == 2 and "--force" in err


def test_export_gguf_streams_a_float_folder(tmp_path, capsys, tiny_llama_dir, monkeypatch):
    # without calibration the CLI reads the folder tensor by tensor: the very file the loaded model gives
    import lowbit
    from lowbit.io.gguf import export_gguf

    model, tok = lowbit.load(tiny_llama_dir)
    whole = tmp_path / "whole.gguf"
    export_gguf(model, tok, whole, "Q4_K_M", progress=False)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded whole")

    monkeypatch.setattr(lowbit, "load", no_load)
    out = tmp_path / "streamed.gguf"
    code, _, err = run(capsys, "export", "gguf", str(tiny_llama_dir), "-o", str(out), "--type", "Q4_K_M", "--json")
    assert code == 0, err
    assert out.read_bytes() == whole.read_bytes()
    code, _, err = run(capsys, "export", "gguf", str(tiny_llama_dir), "-o", str(tmp_path / "g.gguf"), "--method",
                       "gptq")
    assert code == 2 and "--calib" in err


def test_export_gguf_streamed_nan_names_the_tensor(tmp_path, capsys, tiny_llama):
    model, tok = tiny_llama
    bad = tmp_path / "bad"
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    model.save_pretrained(bad, state_dict=sd)
    tok.save_pretrained(bad)
    out = tmp_path / "x.gguf"
    code, _, err = run(capsys, "export", "gguf", str(bad), "-o", str(out), "--type", "Q8_0")
    assert code == 2 and "model.layers.1.mlp.up_proj" in err and "NaN" in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".x.gguf*"))


def test_quantize_to_a_llama_cpp_mix_then_eval_and_export(tmp_path, capsys, tiny_llama_dir, calib):
    """`--scheme Q4_K_M` is a Plan of GGML types (fallbacks for rows the 256-blocks do not fit, reported), any
    method quantizes onto it, `eval` measures it, `export gguf` writes its blocks and names no method."""
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(out), "--scheme", "Q4_K_M",
                            "--method", "awq+gptq", "--calib", str(calib), "--calib-windows", "4",
                            "--window-len", "32")
    assert code == 0, err
    doc = json.loads((out / "quantization.json").read_text())
    schemes = {v["scheme"] for v in doc["layers"].values()}
    assert schemes <= {"q4_k", "q5_0", "q6_k", "q8_0", "fp16", "q4_0", "q5_1"} and schemes
    assert "instead" in stdout  # the fallback notes of the layer table
    code, stdout, err = run(capsys, "eval", str(out), "--reference", str(tiny_llama_dir), "--data", str(calib),
                            "--windows", "2", "--window-len", "32", "--no-speed", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["kl_mean"] >= 0 and res["perplexity"] > 0
    gguf = tmp_path / "q.gguf"
    code, stdout, err = run(capsys, "export", "gguf", str(out), "-o", str(gguf))
    assert code == 0, err
    assert gguf.is_file() and "quantized with method" not in stdout  # nothing quantized a second time
    code, stdout, err = run(capsys, "export", "gguf", str(tiny_llama_dir), "-o", str(tmp_path / "one.gguf"),
                            "--calib", str(calib), "--calib-windows", "4", "--window-len", "32")
    assert code == 0, err
    assert "quantized with method awq+gptq (the default with calibration text" in stdout


def test_bad_outputs_and_options_are_one_line_before_the_load(tmp_path, capsys, tiny_llama_dir):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(afile / "out"), "--scheme", "int4-g32")
    assert code == 2 and "is a file, not a folder" in err and err.count("\n") == 1
    code, _, err = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(tmp_path / "o"), "--method", "gptq",
                       "--calib", "random", "--option", "damp=abc")
    assert code == 2 and "option 'damp' must be float" in err and err.count("\n") == 1
    code, _, err = run(capsys, "export", "gguf", str(tiny_llama_dir), "-o", str(tiny_llama_dir), "--force",
                       "--type", "Q8_0")
    assert code == 2 and "overwrite the source" in err


def test_a_rule_that_matches_nothing_is_warned(tmp_path, capsys, tiny_llama_dir):
    code, _, err = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(tmp_path / "q"), "--scheme", "int4-g32",
                       "--rule", "mlp.dwn_proj=int8", "--keep", "lm_head")
    assert code == 0 and "'mlp.dwn_proj' matches no layer" in err and "'lm_head'" not in err


def test_os_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from lowbit.cli import commands

    def full(args):
        raise OSError(28, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(commands, "cmd_inspect", full)  # main() builds its parser after this
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and err == f"error: {tmp_path / 'out'}: No space left on device\n"


def test_quantize_threads(tmp_path, capsys, tiny_llama_dir):
    import torch

    before = torch.get_num_threads()
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "-o", tmp_path / "q", "--scheme", "int8", "--threads", "1")
    assert code == 0, err
    assert torch.get_num_threads() == before  # restored after the run
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "-o", tmp_path / "q2", "--threads", "0")
    assert code == 2 and "--threads 0: must be at least 1" in err and not (tmp_path / "q2").exists()

"""``lowbit export hf`` as a user runs it, on the tiny random Llama folder."""

import json

import pytest
import torch
import transformers

import lowbit
from lowbit.cli.main import main

pytestmark = pytest.mark.usefixtures("reference_kernels")  # exact comparisons with transformers' dequantization


def run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_export_hf_of_a_lowbit_dir_and_of_a_float_model(tmp_path, capsys, tiny_llama_dir):
    q = tmp_path / "q"
    assert run(capsys, "quantize", str(tiny_llama_dir), "-o", str(q), "--scheme", "int4-g32-sym", "--json")[0] == 0
    code, stdout, err = run(capsys, "export", "hf", str(q), "-o", str(tmp_path / "hf"))
    assert code == 0, err
    assert "wrote" in stdout and "15 linear layers packed" in stdout and "model.embed_tokens" in stdout
    qmodel, tok = lowbit.load(q)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = tok("the river leaves the mountains", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (hf(ids).logits - qmodel(ids).logits).abs().max() <= 1e-5

    code, stdout, err = run(capsys, "export", "hf", str(tiny_llama_dir), "-o", str(tmp_path / "hf8"), "--scheme",
                            "int8", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert len(report["layers"]) == 16 and report["packed_bpw"] > 8 and not report["dequantize_on_load"]
    cfg = json.loads((tmp_path / "hf8" / "config.json").read_text())
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8


def test_export_hf_bad_input_is_one_line_exit_2(tmp_path, capsys, tiny_llama_dir):
    q = tmp_path / "q"
    assert run(capsys, "quantize", str(tiny_llama_dir), "-o", str(q), "--scheme", "int3-g32", "--json")[0] == 0
    cases = [
        ([str(tiny_llama_dir), "-o", str(tmp_path / "a")], "pass --scheme"),
        ([str(q), "-o", str(tmp_path / "a"), "--scheme", "int8"], "already quantized by lowbit"),
        ([str(tiny_llama_dir), "-o", str(tmp_path / "a"), "--scheme", "int5-g33x"], "cannot parse scheme"),
        ([str(q), "-o", str(tmp_path / "a"), "--strict"], "int3-g32 cannot be stored"),
        ([str(q), "-o", str(q)], "overwrite the source"),
        ([str(q), "-o", str(tiny_llama_dir)], "already exists"),
    ]
    for argv, needle in cases:
        code, _, err = run(capsys, "export", "hf", *argv)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "a").exists()
    code, stdout, _ = run(capsys, "export", "hf", str(q), "-o", str(tmp_path / "b"))  # int3: written as float
    assert code == 0 and "int3-g32 written as float" in stdout

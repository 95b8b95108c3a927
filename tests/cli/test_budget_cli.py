"""``--budget`` as a user runs it: lowbit plan / quantize / export gguf / size on a tiny Llama folder."""

import json

import pytest

from tests.cli.conftest import run

CALIB_ARGS = ("--calib-windows", "4", "--window-len", "64")






def test_plan_budget_writes_a_plan_and_its_table_then_reuses_it(tmp_path, capsys, tiny_llama_dir, calib):
    out = tmp_path / "plan.json"
    code, _, err = run(capsys, "plan", tiny_llama_dir, "--budget", "4.6bpw", "--method", "gptq", "--calib", calib,
                       *CALIB_ARGS, "-o", out)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["rules"][0]["pattern"] == "*" and doc["budget"]["promised_linear_bpw"] <= 4.6
    assert (tmp_path / "plan.sensitivity.json").is_file() and "budget 4.6bpw →" in err
    # the table is reused: another budget costs no measurement, and the plan quantizes as promised
    code, _, err = run(capsys, "plan", tiny_llama_dir, "--budget", "6bpw", "--method", "gptq", "-o", out,
                       "--table", tmp_path / "plan.sensitivity.json")
    assert code == 0 and "reusing" in err
    six = json.loads(out.read_text())["budget"]
    assert six["promised_linear_bpw"] > doc["budget"]["promised_linear_bpw"]
    assert six["predicted_kl"] < doc["budget"]["predicted_kl"]
    code, stdout, _ = run(capsys, "quantize", tiny_llama_dir, "-o", tmp_path / "q", "--plan", out, "--method", "gptq",
                          "--calib", calib, *CALIB_ARGS, "--json")
    assert code == 0 and json.loads(stdout)["bpw"] == pytest.approx(six["promised_linear_bpw"])


def test_quantize_budget_does_both(tmp_path, capsys, tiny_llama_dir, calib):
    code, stdout, _ = run(capsys, "quantize", tiny_llama_dir, "-o", tmp_path / "q", "--budget", "4.5bpw", "--method",
                          "awq+gptq", "--calib", calib, *CALIB_ARGS, "--schemes", "int2-g64,int3-g64,int4-g64,int8",
                          "--json")
    assert code == 0
    r = json.loads(stdout)
    assert r["bpw"] == pytest.approx(r["budget"]["promised_linear_bpw"]) and r["bpw"] <= 4.5
    assert {x["scheme"] for x in r["report"]["layers"] if x["kind"] == "linear"} > {"int8"}
    saved = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert saved["plan"]["rules"][0]["method"] == "awq+gptq"


def test_export_gguf_budget_writes_per_tensor_types(tmp_path, capsys, tiny_llama_dir, calib):
    from lowbit.io.gguf.reader import read_gguf_index

    out = tmp_path / "m.gguf"
    code, stdout, err = run(capsys, "export", "gguf", tiny_llama_dir, "-o", out, "--budget", "6.5bpw", "--calib",
                            calib, *CALIB_ARGS, "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["budget"]["promised_linear_bpw"] <= 6.5
    types = {t["ggml"] for t in r["tensors"] if len(t["shape"]) == 2 and t["name"].startswith("blk.")}
    assert len(types) > 1 and not [t for t in r["tensors"] if t["ggml"] != t["requested"]]  # no surprise fallbacks
    written = {t.type_name for t in read_gguf_index(out).tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    assert written == types


def test_size_budget_rows(capsys, tiny_llama_dir):
    code, stdout, _ = run(capsys, "size", tiny_llama_dir, "--budget", "3.5bpw", "--budget", "100kB", "--json")
    assert code == 0
    rows = {r["format"]: r for r in json.loads(stdout)["rows"]}
    assert rows["3.5bpw"]["linear_bpw"] == pytest.approx(3.5) and rows["100kB"]["weight_bytes"] == 100_000
    assert rows["3.5bpw"]["weight_bytes"] < rows["int4-g128"]["weight_bytes"]


@pytest.mark.parametrize("argv,needle", [
    (["quantize", "--budget", "3.5"], "--budget '3.5': expected bits per weight"),
    (["quantize", "--budget", "4bpw", "--method", "gptq"], "--budget needs calibration text"),
    (["quantize", "--budget", "4bpw", "--plan", "p.json", "--calib", "CALIB"], "--budget and --plan"),
    (["quantize", "--table", "t.json"], "pass --budget too"),
    (["quantize", "--budget", "4bpw", "--schemes", "int4-g64,int9", "--calib", "CALIB"], "--schemes: cannot parse"),
    (["quantize", "--budget", "1bpw", "--calib", "CALIB", "--schemes", "int4-g64"], "smallest plan these candidates"),
    (["quantize", "--budget", "kl<=1e-12", "--calib", "CALIB", "--schemes", "int4-g64"], "reach a predicted KL"),
    (["export", "gguf", "--budget", "4bpw"], "--budget measures each layer's sensitivity"),
    (["size", "--budget", "kl<=0.1"], "needs a measured sensitivity table"),
])
def test_bad_budget_input_is_one_line_exit_2(tmp_path, capsys, tiny_llama_dir, calib, argv, needle):
    (tmp_path / "p.json").write_text(json.dumps({"rules": []}))
    verb = argv[:2] if argv[0] == "export" else argv[:1]
    rest = [str(calib) if a == "CALIB" else str(tmp_path / a) if a.endswith(".json") else a for a in argv[len(verb):]]
    out = ["-o", str(tmp_path / "o")] if verb[0] != "size" else []
    code, _, err = run(capsys, *verb, tiny_llama_dir, *out, *rest, *CALIB_ARGS[:2] if verb[0] == "quantize" else ())
    assert code == 2
    if "kl<=" in argv[2]:  # a KL bound is judged on the measured table: the error follows the measurement's line
        err = err.splitlines()[-1] + "\n"
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_export_hf_budget_quantizes_first(tmp_path, capsys, tiny_llama_dir, calib):
    code, stdout, err = run(capsys, "export", "hf", tiny_llama_dir, "-o", tmp_path / "hf", "--budget", "6bpw",
                            "--method", "gptq", "--calib", calib, *CALIB_ARGS, "--schemes", "int4-g64,int8", "--json")
    assert code == 0, err
    assert (tmp_path / "hf" / "config.json").is_file()

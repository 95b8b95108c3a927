"""``--device`` on quantize, eval and export hf."""

import json

import pytest
import torch

from lowbit.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def no_cuda(monkeypatch):
    """The machine as CI has it: torch without a usable GPU (whatever this one has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(" ".join(f"the quick brown fox {i} jumps over the lazy dog." for i in range(200)))
    return p


def _one_line_error(code, err, needle):
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err


@pytest.mark.parametrize("device,needle", [("cuda", "--device cuda: CUDA is not available"),
                                           ("cuda:1", "--device cuda:1: CUDA is not available"),
                                           ("tpu", "--device tpu: unknown device")])
def test_quantize_bad_device(no_cuda, tmp_path, capsys, tiny_llama_dir, device, needle):
    code, _, err = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(tmp_path / "o"), "--device", device)
    _one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_export_hf_and_eval_bad_device(no_cuda, tmp_path, capsys, tiny_llama_dir, text):
    code, _, err = run(capsys, "export", "hf", str(tiny_llama_dir), "-o", str(tmp_path / "hf"), "--scheme",
                       "int4-g32", "--device", "cuda")
    _one_line_error(code, err, "--device cuda")
    assert not (tmp_path / "hf").exists()
    code, _, err = run(capsys, "eval", str(tiny_llama_dir), "--data", str(text), "--device", "cuda")
    _one_line_error(code, err, "--device cuda")


def test_device_cpu_works(tmp_path, capsys, tiny_llama_dir, text):
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", str(tiny_llama_dir), "-o", str(out), "--scheme", "int4-g32",
                          "--method", "gptq", "--calib", str(text), "--calib-windows", "2", "--window-len", "32",
                          "--device", "cpu", "--json")
    assert code == 0 and json.loads(stdout)["report"]["calib_windows"] == 2
    code, stdout, _ = run(capsys, "eval", str(out), "--reference", str(tiny_llama_dir), "--data", str(text),
                          "--windows", "2", "--window-len", "32", "--no-speed", "--device", "cpu", "--json")
    assert code == 0 and json.loads(stdout)["kl_mean"] > 0
    code, _, _ = run(capsys, "export", "hf", str(tiny_llama_dir), "-o", str(tmp_path / "hf"), "--scheme", "int4-g32",
                     "--device", "cpu", "--json")
    assert code == 0 and (tmp_path / "hf" / "model.safetensors").is_file()

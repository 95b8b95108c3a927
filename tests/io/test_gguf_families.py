"""GGUF export of every family: what lowbit writes, loaded back by transformers (and llama.cpp where it is
installed), computes what the float model computes. Families the exporter does not write are one clear error.

Quantized with the schemes that have exact GGML twins (int8-g32-sym -> Q8_0, int4-g32-sym -> Q4_0), so the
file holds lowbit's own grid: transformers' dequantized GGUF model must equal the lowbit model (KL < 1e-6)
and stay within the family bounds of tests/model/test_families.py to the float model.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from lowbit.errors import LowbitError
from lowbit.io.gguf.export import export_gguf
from lowbit.model.plan import Plan, Rule
from lowbit.model.quantize import quantize_model
from tests.io.test_gguf_export import tiny_tokenizer  # byte-level BPE, 264 tokens, with merges (llama.cpp needs them)
from tests.model.families import build, mean_kl, outputs, random_ids

pytestmark = pytest.mark.usefixtures("reference_kernels")  # exact comparisons with transformers' dequantization

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EXPORTED = ["llama", "mistral", "qwen2", "qwen3"]  # lowbit.io.gguf.writer.ARCHITECTURES
NOT_EXPORTED = ["gemma2", "gemma3_text", "phi3", "gpt2", "bert"]
BOUNDS = {"int8-g32-sym": 1e-3, "int4-g32-sym": 8e-2}
# transformers' GGUF loader reads no head_dim for qwen3 (its config default, 128, is every real Qwen3's)
OVERRIDES = {"qwen3": dict(head_dim=128)}


def exported(family: str, scheme: str, path):
    model = build(family, **OVERRIDES.get(family, {}))
    ref = outputs(model, random_ids())
    quantize_model(model, Plan((Rule("*", scheme),)), progress=False)
    report = export_gguf(model, tiny_tokenizer(), path, type=None, progress=False)
    assert not report.fallbacks, report.warnings
    return ref, model


@pytest.mark.parametrize("scheme", list(BOUNDS))
@pytest.mark.parametrize("family", EXPORTED)
def test_gguf_export_loads_back_in_transformers(family, scheme, tmp_path):
    out = tmp_path / f"{family}.gguf"
    ref, qmodel = exported(family, scheme, out)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name,
                                                         dtype=torch.float32).eval()
    ids = random_ids()
    got = outputs(back, ids)
    assert mean_kl(outputs(qmodel, ids), got) < 1e-6  # the file holds lowbit's grid, nothing re-quantized
    assert mean_kl(ref, got) < BOUNDS[scheme]


def llama_cpp_kl(path, ref: torch.Tensor, ids: list[int]) -> float:
    """KL(ref ‖ llama.cpp) over one sequence; llama.cpp runs in a child process (lowbit.io.gguf.llamacpp)."""
    from lowbit.io.gguf import llamacpp

    return mean_kl(ref, torch.from_numpy(llamacpp.logprobs(path, ids)).float())


@pytest.mark.parametrize("family", EXPORTED)
def test_gguf_export_runs_in_llama_cpp(family, tmp_path):
    out = tmp_path / f"{family}.gguf"
    _, qmodel = exported(family, "int8-g32-sym", out)
    ids = random_ids(1, 24)
    assert llama_cpp_kl(out, outputs(qmodel, ids)[0], ids[0].tolist()) < 2e-3  # llama.cpp: int8 activations


@pytest.mark.parametrize("family", NOT_EXPORTED)
def test_families_gguf_export_does_not_write_are_one_clear_error(family, tmp_path):
    model = build(family)
    with pytest.raises(LowbitError, match=rf"GGUF export does not support architecture '{model.config.model_type}'"):
        export_gguf(model, tiny_tokenizer(), tmp_path / "x.gguf", "Q8_0", progress=False)
    assert not list(tmp_path.iterdir())

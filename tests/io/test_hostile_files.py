"""Each finding of issue 17 ("loaders that no file can break"), reproduced: a bad file is one LowbitError naming
the file and field, never a traceback, a hang, a huge allocation or a silently different model."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch
from bench.fuzz_loaders import _gguf_kv, _gguf_str, _json_text, gguf_insert_kv
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.core.jsonio import JSONFileError, parse_json
from lowbit.errors import CheckpointError, LowbitError
from lowbit.io.loaders import SourceError, load_float
from lowbit.model.hfconfig import ConfigError, load_config
from lowbit.model.plan import Plan


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


@pytest.fixture
def qdir(tmp_path, tiny_llama):
    model, tok = tiny_llama
    q, report = lowbit.quantize(model, tok, scheme="int4-g32", method="rtn")
    return lowbit.save(q, tmp_path / "q", tokenizer=tok, plan=q.lowbit_plan, report=report)


# -- JSON --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, why", [("[" * 5000 + "]" * 5000, "nested more than 64"),
                                       ('{"shape": [Infinity]}', "Infinity"), ('{"a": NaN}', "NaN"),
                                       ("9" * 5000, "not valid JSON")])
def test_hostile_json_is_one_error(text, why):
    with pytest.raises(JSONFileError, match=why):
        parse_json(text, "f.json")


# -- the lowbit checkpoint ---------------------------------------------------------------------------


def _scales_to_bf16(header):
    for k, v in header.items():
        if k.endswith(".scales"):
            v["dtype"] = "BF16"


def test_checkpoint_scale_dtype_edit_is_refused(tmp_path):
    p = tmp_path / "w.safetensors"
    lowbit.save_tensors(p, {"w": lowbit.quantize_tensor(torch.randn(8, 64), "int4-g32")})
    _rewrite_header(p, _scales_to_bf16)  # same bytes, other numbers: weights off by up to 4 before
    with pytest.raises(CheckpointError, match="scales"):
        lowbit.load_tensors(p)


def test_checkpoint_without_header_checksums_still_checks_dtypes(tmp_path):
    p = tmp_path / "w.safetensors"
    q = lowbit.quantize_tensor(torch.randn(8, 64), "int4-g32")
    lowbit.save_tensors(p, {"w": q})

    def old_style(header):  # as lowbit wrote it before checksums covered dtype and shape
        doc = json.loads(header["__metadata__"]["lowbit"])
        del doc["checksum"]
        for part in doc["tensors"]["w"]["crc32"]:
            t = getattr(q, part)
            doc["tensors"]["w"]["crc32"][part] = zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes())
        header["__metadata__"]["lowbit"] = json.dumps(doc)

    _rewrite_header(p, old_style)
    assert torch.equal(lowbit.load_tensors(p)["w"].dequantize(), q.dequantize())  # old files still load
    _rewrite_header(p, _scales_to_bf16)
    with pytest.raises(CheckpointError, match="scales is stored as bfloat16, scheme int4-g32 stores float16"):
        lowbit.load_tensors(p)


@pytest.mark.parametrize("edit, why", [
    (lambda t: t.update(shape=["__BIG__"]), "not valid JSON"),
    (lambda t: t.update(shape="x"), "field 'shape' must be a list"),
    (lambda t: t.update(shape=[True, 64]), "not a list of sizes"),
    (lambda t: t.update(kind=7), "field 'kind' must be a string"),
    (lambda t: t.update(crc32=[1]), "field 'crc32' must be an object"),
    (lambda t: t.update(scheme="__DEEP__"), "not valid JSON"),
])
def test_checkpoint_hostile_fields(tmp_path, edit, why):
    p = tmp_path / "w.safetensors"
    lowbit.save_tensors(p, {"w": lowbit.quantize_tensor(torch.randn(8, 64), "int4-g32")})

    def apply(header):
        doc = json.loads(header["__metadata__"]["lowbit"])
        edit(doc["tensors"]["w"])
        header["__metadata__"]["lowbit"] = _json_text(doc)  # "__DEEP__" / "__BIG__" as raw JSON

    _rewrite_header(p, apply)
    with pytest.raises(CheckpointError, match=why) as e:
        lowbit.load_tensors(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


# -- the lowbit model directory -----------------------------------------------------------------------


def _edit_json(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("edit, why", [
    (lambda d: d.update(num_hidden_layers=40000), "num_hidden_layers' is 40000"),
    (lambda d: d.update(vocab_size=100_000_000), "vocab_size' is 100000000"),
    (lambda d: d.update(vocab_size=1000), "model.embed_tokens"),  # shapes checked on meta, before allocating
    (lambda d: d.update(hidden_size="64"), "config.json.*hidden_size"),
    (lambda d: d.update(architectures=["AutoTokenizer"]), "not a model class"),
    (lambda d: d.update(architectures=[3]), "architectures"),
])
def test_lowbit_dir_config_checked_before_the_model_is_built(qdir, edit, why):
    _edit_json(qdir / "config.json", edit)
    t0 = time.perf_counter()
    with pytest.raises(LowbitError, match=why):
        lowbit.load(qdir)
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("edit, why", [
    (lambda d: d["layers"]["model.layers.0.mlp.up_proj"].update(kind="embedding"), "is a embedding there"),
    (lambda d: d["layers"]["model.layers.0.mlp.up_proj"].update(kind=1), "field 'kind' must be a string"),
    (lambda d: d["tied"].update({"model.layers.0.mlp.down_proj": "model.layers.0.mlp.up_proj"}),
     "tied to 'model.layers.0.mlp.up_proj'"),
    (lambda d: d["layers"]["model.layers.0.mlp.up_proj"].update(act_scheme="int9"), "unknown activation scheme"),
    (lambda d: d["layers"]["model.embed_tokens"].update(padding_idx=10**6), "padding_idx"),
    (lambda d: d.update(layers=[]), "field 'layers' must be an object"),
])
def test_lowbit_dir_layers_validated_at_load(qdir, edit, why):
    _edit_json(qdir / "quantization.json", edit)
    with pytest.raises(CheckpointError, match=why):
        lowbit.load(qdir)


def test_lowbit_dir_broken_tokenizer_is_one_error(qdir):
    (qdir / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(CheckpointError, match="cannot load its tokenizer"):
        lowbit.load(qdir)


# -- Hugging Face folders and GGUF files -------------------------------------------------------------


def test_missing_weight_in_hf_folder_is_an_error(tmp_path, tiny_llama_dir):
    import shutil

    d = tmp_path / "hf"
    shutil.copytree(tiny_llama_dir, d)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    for lazy in (False, True):
        with pytest.raises(SourceError, match="no weights for 1 .*model.layers.1.mlp.down_proj.weight"):
            load_float(d, lazy=lazy)


def test_remote_code_never_runs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    code = ("import sys; from lowbit.io.loaders import load_float\n"
            f"try:\n    load_float({str(tmp_path)!r})\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.startswith("SourceError"), out.stdout + out.stderr
    assert not marker.exists()


def test_gguf_unsupported_architecture_is_refused(tmp_path, tiny_gguf):
    p = tmp_path / "m.gguf"  # the same tensors under an architecture whose tensors they are not (same length)
    p.write_bytes(tiny_gguf.path.read_bytes().replace(b"llama", b"mamba"))
    with pytest.raises(SourceError, match="mamba"):
        load_float(p, cache=False)


def test_gguf_with_many_metadata_keys_is_refused_quickly(tmp_path, tiny_gguf):
    p = tmp_path / "m.gguf"
    p.write_bytes(gguf_insert_kv(tiny_gguf.path.read_bytes(),
                                 [_gguf_kv(f"x.k{i}", 4, struct.pack("<I", i)) for i in range(100_000)]))
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match="metadata keys"):
        load_float(p, cache=False)
    assert time.perf_counter() - t0 < 10
    from lowbit.io.inspect import inspect_path

    assert len(inspect_path(p)) == 21  # inspect reads it: a valid, if odd, file


@pytest.mark.parametrize("kv", [_gguf_kv("general.alignment", 4, struct.pack("<I", 0)),
                                _gguf_kv("general.alignment", 6, struct.pack("<f", float("nan"))),
                                _gguf_kv("general.alignment", 8, _gguf_str("32")),
                                _gguf_kv("x.deep", 9, struct.pack("<IQ", 9, 1) * 10000 + struct.pack("<IQ", 4, 0))])
def test_gguf_hostile_header_fields(tmp_path, tiny_gguf, kv):
    from lowbit.io.inspect import inspect_path

    p = tmp_path / "m.gguf"
    p.write_bytes(gguf_insert_kv(tiny_gguf.path.read_bytes(), [kv]))
    with pytest.raises(LowbitError, match="m.gguf: .*(alignment|nested)"):
        inspect_path(p)


def test_damaged_float_cache_is_detected_and_rebuilt(tmp_path, tiny_gguf, monkeypatch, caplog):
    from lowbit.io.loaders import float_cache_path

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    first, _ = load_float(tiny_gguf.path)
    weights = next(float_cache_path(tiny_gguf.path).glob("*.safetensors"))
    for damage in ("flip", "truncate"):
        raw = bytearray(weights.read_bytes())
        if damage == "flip":
            raw[-3] ^= 0x40
        else:
            raw = raw[: len(raw) // 2]
        weights.write_bytes(bytes(raw))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lowbit.io.loaders"):
            again, _ = load_float(tiny_gguf.path)
        said = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
        assert len(said) == 1 and str(float_cache_path(tiny_gguf.path)) in said[0]
        for k, v in first.state_dict().items():
            assert torch.equal(v, again.state_dict()[k]), k
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lowbit.io.loaders"):
            load_float(tiny_gguf.path)  # rebuilt: said once, not on every run
        assert not [r for r in caplog.records if "damaged" in r.getMessage()]


# -- Plan JSON and config.json ------------------------------------------------------------------------


@pytest.mark.parametrize("doc, why", [
    ({"rules": [{"pattern": 3}]}, "rule 0: field 'pattern' must be a string"),
    ({"rules": [{"pattern": "*", "scheme": "int8", "method": None}]}, "field 'method' must be a string"),
    ({"rules": [{"pattern": "*", "scheme": "int8", "config": {"options": 1}}]}, "field 'options' must be an object"),
    ({"rules": {"a": 1}}, "field 'rules' must be a list"),
])
def test_plan_json_wrong_types(tmp_path, doc, why):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(LowbitError, match=why):
        Plan.from_json(p)


@pytest.mark.parametrize("edit, why", [({"hidden_size": "64"}, "hidden_size"), ({"vocab_size": 1e8}, "vocab_size"),
                                       ({"num_attention_heads": 0}, "model config"), ({"use_cache": 0}, "use_cache")])
def test_config_json_wrong_types(tmp_path, edit, why):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4} | edit))
    with pytest.raises(ConfigError, match=why):
        load_config(p)

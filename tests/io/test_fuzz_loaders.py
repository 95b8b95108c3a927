"""Fuzzing the readers within a CI budget: hypothesis on the byte-level readers (in-process: pure Python), and
the seeded mutation corpus of bench/fuzz_loaders.py (each case in a forked child with a memory cap and a
timeout; the bench runs the same with 10k cases per loader)."""

from __future__ import annotations

import struct

import pytest
from bench.fuzz_loaders import OUTCOMES, fuzz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.core.jsonio import JSONFileError, parse_json
from lowbit.errors import LowbitError
from lowbit.io.gguf.reader import read_gguf_index
from lowbit.io.safetensors_header import read_safetensors_header

FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.text(alphabet='[]{}",:0123456789.eE-+ntrufalsINaNfiy \\', max_size=400))
def test_parse_json_never_raises_another_error(text):
    try:
        parse_json(text, "f.json")
    except JSONFileError:
        pass


@FAST
@given(st.binary(max_size=300), st.integers(0, 2**64 - 1))
def test_safetensors_header_reader_on_any_bytes(tmp_path, body, n):
    p = tmp_path / "x.safetensors"
    for prefix in (struct.pack("<Q", len(body)), struct.pack("<Q", n)):
        p.write_bytes(prefix + body)
        try:
            read_safetensors_header(p)
        except LowbitError:
            pass


@FAST
@given(st.binary(max_size=400), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_gguf_reader_on_any_bytes(tmp_path, body, n_tensors, n_kv):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors % 64, n_kv % 64) + body)
    try:
        read_gguf_index(p)
    except LowbitError:
        pass


@pytest.mark.parametrize("loader, cases", [("checkpoint", 60), ("lowbit-dir", 40), ("safetensors", 60),
                                           ("gguf", 60), ("plan", 60), ("config", 60)])
def test_mutation_corpus(loader, cases):
    r = fuzz([loader], cases, seed=1, timeout=10, mem_mb=1024)[loader]
    assert sum(r[o] for o in OUTCOMES) == cases
    assert r["LowbitError"] > 0  # the mutations do break the files
    assert r["other"] + r["hang"] + r["oom"] + r["crash"] == 0, r["examples"]

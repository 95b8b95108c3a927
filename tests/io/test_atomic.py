import os
import subprocess
import sys

from lowbit.io.atomic import atomic_dir, atomic_file, remove_leftovers


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_runs_temp_files_are_removed_by_the_next_write(tmp_path):
    dest = tmp_path / "model.safetensors"
    dead = tmp_path / f".model.safetensors.{_dead_pid()}.abc.tmp"
    dead.write_bytes(b"x" * 100)
    live = tmp_path / f".model.safetensors.{os.getppid()}.def.tmp"  # a concurrent writer, still running
    live.write_bytes(b"y")
    other = tmp_path / f".other.{_dead_pid()}.x.tmp"
    other.write_bytes(b"z")
    with atomic_file(dest) as tmp:
        assert str(os.getpid()) in tmp.name
        tmp.write_bytes(b"ok")
    assert dest.read_bytes() == b"ok" and not dead.exists() and live.exists() and other.exists()


def test_a_killed_runs_temp_folder_is_removed(tmp_path):
    dead = tmp_path / f".out.{_dead_pid()}.q1.tmp"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "w.bin").write_bytes(b"x")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("1")
    assert not dead.exists() and (tmp_path / "out" / "f").read_text() == "1"
    assert remove_leftovers(tmp_path / "out") == []
